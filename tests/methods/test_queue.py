import pytest
"""MoCo's key queue: contents and pointer after a few writes equal a hand simulation, wrap-around, DDP order."""

import json
import socket
import subprocess
import sys

import torch

from soco.methods.queue import KeyQueue


def test_queue_starts_with_unit_vectors_and_writes_in_turn_with_one_pointer():
    queue = KeyQueue(levels=2, dim=3, size=5, seed=0)
    torch.testing.assert_close(queue.keys.norm(dim=-1), torch.ones(2, 5))
    simulated = queue.keys.clone()
    pointer = 0
    for step in range(4):  # batches of 2: slots 0-1, 2-3, 4-0 (wraps), 1-2
        keys = torch.full((2, 2, 3), float(step + 1))
        keys[1] *= -1  # the second level gets its own keys
        for row in range(2):
            simulated[:, (pointer + row) % 5] = keys[:, row]
        pointer = (pointer + 2) % 5
        queue.enqueue(keys)
        assert int(queue.pointer) == pointer
        torch.testing.assert_close(queue.keys, simulated)
    assert queue.keys[0, :, 0].tolist() == [3.0, 4.0, 4.0, 2.0, 3.0]
    assert queue.keys[1, :, 0].tolist() == [-3.0, -4.0, -4.0, -2.0, -3.0]


def test_queue_state_is_in_the_state_dict_for_an_exact_resume():
    queue = KeyQueue(levels=1, dim=2, size=4)
    queue.enqueue(torch.ones(1, 3, 2))
    restored = KeyQueue(levels=1, dim=2, size=4, seed=9)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.keys, queue.keys) and int(restored.pointer) == 3


WORKER = """
import json, sys, torch, torch.distributed as dist
from soco.methods.queue import KeyQueue
from soco.methods.shuffle_bn import shuffled_forward
dist.init_process_group("gloo")
rank = dist.get_rank()
queue = KeyQueue(levels=1, dim=2, size=6, seed=0)
for step in range(2):
    queue.enqueue(torch.full((1, 2, 2), 10.0 * step + rank))
# shuffle-BN across processes: each process encodes a slice of the shuffled global batch
inputs = torch.arange(4.0).view(4, 1) + 100 * rank
seen = []
def encode(x):
    seen.append(x.flatten().tolist())
    return x * 2
out = shuffled_forward(encode, (inputs,), generator=torch.Generator().manual_seed(rank))
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as handle:  # not stdout: two processes' lines can interleave
    json.dump({"rank": rank, "keys": queue.keys[0, :, 0].tolist(), "pointer": int(queue.pointer),
               "out": out.flatten().tolist(), "seen": seen[0]}, handle)
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_write_every_processes_keys_in_rank_order(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={free_port()}", str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert len(results) == 2
    # step 0 writes rank 0's two keys (0, 0), then rank 1's (1, 1), at slots 0-3; step 1 writes
    # (10, 10, 11, 11) at slots 4, 5, 0, 1 (wrapping): the pointer ends at 2
    expected = [11.0, 11.0, 1.0, 1.0, 10.0, 10.0]
    for r in results:
        assert r["keys"] == expected and r["pointer"] == 2
    by_rank = {r["rank"]: r for r in results}
    for rank, r in by_rank.items():
        assert r["out"] == [2.0 * (v + 100 * rank) for v in range(4)]  # back in each process's own order
    # the processes encoded one shuffled partition of the global batch (rank 0's permutation, broadcast)
    encoded = sorted(by_rank[0]["seen"] + by_rank[1]["seen"])
    assert encoded == [0.0, 1.0, 2.0, 3.0, 100.0, 101.0, 102.0, 103.0]
    assert by_rank[0]["seen"] != [0.0, 1.0, 2.0, 3.0] or by_rank[1]["seen"] != [100.0, 101.0, 102.0, 103.0]
