"""Two-process DDP on the CPU (gloo): both ranks train and end with identical weights."""

import json
import socket
import subprocess
import sys

import pytest
import torch

WORKER = """
import json, sys
import soco
from soco.config.loading import load_config
from soco.engine.distributed import shutdown_distributed
from soco.engine.trainer import pretrain
config = load_config(sys.argv[4], ["train.device=cpu", "train.steps=3", "train.batch_size=2", "train.accumulate=2"])
summary = pretrain(config, sys.argv[3], sys.argv[1], sys.argv[2] or None, progress=False)
import torch.distributed as dist
with open(f"{sys.argv[3]}-rank{dist.get_rank()}.json", "w") as handle:  # stdout lines of two processes interleave
    json.dump({"rank": dist.get_rank(), "checksums": summary.rank_checksums, "steps": summary.steps}, handle)
shutdown_distributed()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "uses_proposals"),
                         [("soco_tiny", True), ("scrl_tiny", False), ("insloc_tiny", False), ("detco_tiny", False)])
def test_two_cpu_processes_end_with_the_same_weights(tiny_data, tmp_path, preset, uses_proposals):
    images, store = tiny_data
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={free_port()}", str(script), str(images), str(store) if uses_proposals else "",
         str(tmp_path / "run"), preset],
        capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", **__import__("os").environ},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = [json.loads((tmp_path / f"run-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(r["rank"] for r in results) == [0, 1]
    checksums = results[0]["checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert all(r["steps"] == 3 for r in results)
    # only rank 0 writes checkpoints
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 3
