"""The CUDA paths on a GPU: bf16 and fp16 steps, SyncBN, DDP over NCCL, torchrun, and a resume after a kill.

Skipped without CUDA. `benchmarks/gpu_check.sh` runs this file on a lent GPU; on one GPU the two-GPU test
skips too. Tiny data (tests/conftest.py: 12 scenes of 96x72) and the `soco_tiny` preset (R18-FPN, 64 px views).
"""

import json
import math
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

from soco.config.loading import load_config
from soco.engine.bench import bench_dataset, first_batch
from soco.engine.distributed import DistributedContext
from soco.engine.optimizers import build_optimizer
from soco.engine.step import StepRunner
from soco.engine.trainer import build_model, pretrain
from tests.killed_run import run_killed_after_step_2

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.timeout(150),
]

# CUDA kernels are not bitwise deterministic (RoIAlign's backward adds with atomics; some cuDNN backward
# algorithms too), so two runs agree to rounding, not to the bit as on the CPU. The distance allowed is a
# share of how far the two resumed steps moved the weights: a resume that dropped the optimiser's momentum
# is off by 0.83 of it (encoder; 0.64 for the target; measured on the CPU in fp32, where a good resume is
# off by 0); rounding differences should stay far below 0.02 of it.
RESUME_TOLERANCE = 0.02


TWO_GPU_WORKER = """
import json, sys
import torch.distributed as dist
from torch import nn
from soco.config.loading import load_config
from soco.engine.distributed import shutdown_distributed
from soco.engine.trainer import pretrain
import soco.engine.trainer as trainer
real_build = trainer.build_model
def build_and_count(config, context):
    method = real_build(config, context)
    build_and_count.sync_bn = sum(isinstance(m, nn.SyncBatchNorm) for m in method.modules())
    return method
trainer.build_model = build_and_count
config = load_config("soco_tiny", ["train.device=cuda", "train.steps=3"])
summary = pretrain(config, sys.argv[3], sys.argv[1], sys.argv[2], progress=False)
with open(f"{sys.argv[3]}-rank{dist.get_rank()}.json", "w") as handle:
    json.dump({"checksums": summary.rank_checksums, "steps": summary.steps, "sync_bn": build_and_count.sync_bn,
               "backend": dist.get_backend()}, handle)
shutdown_distributed()
"""


def tiny_cuda(*overrides):
    return load_config("soco_tiny", ["train.device=cuda", *overrides])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_batch(config, tiny_data) -> dict:
    images, store = tiny_data
    return first_batch(bench_dataset(config, images, store), config.train.batch_size)


def trainable(method: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in method.named_parameters() if p.requires_grad}


def runner_for(method: nn.Module, trained: nn.Module, config, precision: str) -> StepRunner:
    optimizer = build_optimizer(config.optim, method.parameter_groups(config.optim.weight_decay), lr=0.05)
    return StepRunner(method, trained, optimizer, DistributedContext(device=torch.device("cuda", 0)), precision)


def is_statistic(name: str) -> bool:
    """BatchNorm's running statistics: they follow the data, not the optimiser."""
    return name.endswith(("running_mean", "running_var"))


def difference_norm(first: dict, second: dict, statistics: bool = False) -> float:
    """The L2 norm of the difference of two state dicts' weights (or of their BatchNorm statistics)."""
    return math.sqrt(sum(float((tensor.double() - second[name].double()).pow(2).sum())
                         for name, tensor in first.items()
                         if tensor.is_floating_point() and is_statistic(name) == statistics))


@pytest.fixture
def nccl_group():
    """A real NCCL process group of this one process on GPU 0, taken down after the test."""
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_a_step_on_cuda_trains_in_reduced_precision(tiny_data, precision, dtype):
    config = tiny_cuda(f"train.precision={precision}")
    torch.manual_seed(0)
    method = build_model(config, DistributedContext(device=torch.device("cuda", 0)))
    method.train()
    runner = runner_for(method, method, config, config.train.precision)
    assert (runner.scaler is not None) == (precision == "fp16")  # fp16 scales its loss, bf16 needs not
    convolution = next(m for m in method.modules() if isinstance(m, nn.Conv2d))
    seen = []
    convolution.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    batch = tiny_batch(config, tiny_data)
    before = trainable(method)

    # fp16's scaler skips the update of a step whose scaled gradients overflow (and halves the scale),
    # so a few steps are given; the first scale, 65536, overflows on some first steps.
    losses = [runner.run([batch], step, 3, lr=0.05).loss for step in range(3)]

    assert seen and set(seen) == {dtype}
    assert all(math.isfinite(loss) for loss in losses), losses
    after = trainable(method)
    assert all(tensor.dtype == torch.float32 for tensor in after.values())  # the weights stay fp32
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert len(changed) >= 0.9 * len(before), sorted(set(before) - set(changed))
    assert all(torch.isfinite(tensor).all() for tensor in after.values())
    if runner.scaler is not None:
        scale = runner.scaler.get_scale()
        assert math.isfinite(scale) and 0 < scale <= 65536.0


def test_sync_bn_replaces_every_batch_norm_when_several_gpus_train(tiny_data, nccl_group):
    config = tiny_cuda("train.precision=fp32")
    device = torch.device("cuda", 0)

    def norms(method):
        return [type(m) for m in method.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    torch.manual_seed(0)
    alone = build_model(config, DistributedContext(device=device))
    torch.manual_seed(0)
    several = build_model(config, DistributedContext(rank=0, world_size=2, device=device))
    without = build_model(tiny_cuda("train.sync_bn=false"), DistributedContext(rank=0, world_size=2, device=device))
    assert norms(alone) and nn.SyncBatchNorm not in norms(alone)
    assert norms(several) == [nn.SyncBatchNorm] * len(norms(alone))
    assert nn.SyncBatchNorm not in norms(without)
    assert all(p.is_cuda for p in several.parameters())

    # The converted method keeps the weights and statistics: in a group of one process SyncBN normalises
    # as BN does, so one step of each gives the same loss and the same updated weights.
    batch = tiny_batch(config, tiny_data)
    results = {}
    for name, method in (("alone", alone), ("several", several)):
        method.train()
        loss = runner_for(method, method, config, "fp32").run([batch], 0, 1, lr=0.05).loss
        results[name] = (loss, trainable(method))
    assert math.isfinite(results["alone"][0])
    assert results["several"][0] == pytest.approx(results["alone"][0], rel=1e-4)
    for name, tensor in results["alone"][1].items():
        torch.testing.assert_close(results["several"][1][name], tensor, rtol=1e-3, atol=1e-5)


def test_ddp_over_nccl_with_one_process_trains_as_the_method_alone(tiny_data, nccl_group):
    config = tiny_cuda("train.precision=fp32")
    batch = tiny_batch(config, tiny_data)
    results = {}
    for wrapped in (False, True):
        torch.manual_seed(0)
        method = build_model(config, DistributedContext(device=torch.device("cuda", 0)))
        method.train()
        # as the trainer wraps it: the gradients are all-reduced over NCCL in the backward pass
        trained = nn.parallel.DistributedDataParallel(method, device_ids=[0]) if wrapped else method
        runner = runner_for(method, trained, config, "fp32")
        losses = [runner.run([batch], step, 2, lr=0.05).loss for step in range(2)]
        results[wrapped] = (losses, trainable(method))
    assert dist.get_backend() == "nccl"
    assert all(math.isfinite(loss) for loss in results[True][0])
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-4)
    for name, tensor in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], tensor, rtol=1e-3, atol=1e-5)


def test_torchrun_with_one_process_pretrains_on_cuda(tiny_data, tmp_path):
    # With WORLD_SIZE=1 the trainer runs alone (engine/distributed.py: no process group, no DDP wrapper);
    # DDP over NCCL with one process is the test above.
    images, store = tiny_data
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_addr=127.0.0.1",
         f"--master_port={free_port()}", "-m", "soco", "pretrain", "--config", "soco_tiny", "--data", str(images),
         "--proposals", str(store), "--out", str(run), "--steps", "3", "--device", "cuda", "--quiet"],
        check=False, capture_output=True, text=True, timeout=140,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "steps: 3 (3 this run)" in result.stdout
    assert "1 process(es) on cuda:0" in (run / "train.log").read_text()
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
    assert state["step"] == 3 and math.isfinite(state["loss"])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_train_in_step_with_sync_bn_over_nccl(tiny_data, tmp_path):
    images, store = tiny_data
    script = tmp_path / "worker.py"
    script.write_text(TWO_GPU_WORKER)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={free_port()}", str(script), str(images), str(store), str(tmp_path / "run")],
        check=False, capture_output=True, text=True, timeout=140,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"run-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(r["backend"] == "nccl" and r["steps"] == 3 and r["sync_bn"] > 0 for r in ranks)
    assert ranks[0]["checksums"] == ranks[1]["checksums"] and len(ranks[0]["checksums"]) == 2


@pytest.mark.parametrize("precision", ["auto", "fp16"])
def test_resume_after_a_kill_on_cuda_continues_the_run(tiny_data, tmp_path, precision):
    images, store = tiny_data
    setting = f"train.precision={precision}"  # auto is bf16 on a GPU; fp16 also resumes the grad scaler
    pretrain(tiny_cuda("train.steps=4", setting), tmp_path / "whole", images, store, progress=False)

    killed = tmp_path / "killed"
    process = run_killed_after_step_2(images, store, killed, "soco_tiny", ["train.device=cuda", setting], timeout=140)
    assert process.returncode == -signal.SIGKILL
    last = killed / "checkpoints" / "last.pt"
    half = torch.load(last, weights_only=True, map_location="cpu")
    assert half["step"] == 2

    resumed_run = subprocess.run(
        [sys.executable, "-m", "soco", "pretrain", "--config", "soco_tiny", "--data", str(images), "--proposals",
         str(store), "--out", str(killed), "--steps", "4", "--device", "cuda", "--resume", "--quiet",
         "train.checkpoint_every=1", setting],
        check=False, capture_output=True, text=True, timeout=140,
    )
    assert resumed_run.returncode == 0, resumed_run.stderr[-3000:]
    assert "steps: 4 (2 this run)" in resumed_run.stdout

    whole = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
    resumed = torch.load(last, weights_only=True, map_location="cpu")
    assert resumed["step"] == whole["step"] == 4
    for part in ("encoder", "encoder_target"):
        for statistics in (False, True):
            moved = difference_norm(whole[part], half[part], statistics)
            off = difference_norm(whole[part], resumed[part], statistics)
            what = f"{part} {'statistics' if statistics else 'weights'}"
            assert moved > 0, what
            assert off <= RESUME_TOLERANCE * moved, f"{what}: {off:.3g} from the whole run, which moved {moved:.3g}"
    if precision == "fp16":
        assert whole["grad_scaler"] and resumed["grad_scaler"]["scale"] == whole["grad_scaler"]["scale"]
        assert resumed["grad_scaler"]["_growth_tracker"] == whole["grad_scaler"]["_growth_tracker"]
    records = {name: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
               for name, run in (("whole", tmp_path / "whole"), ("resumed", killed))}
    assert [r["step"] for r in records["resumed"]] == [r["step"] for r in records["whole"]] == [1, 2, 3, 4]
    for mine, theirs in zip(records["resumed"], records["whole"]):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-2)
