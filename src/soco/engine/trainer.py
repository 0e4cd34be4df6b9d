"""The pretraining loop: one process or many (torchrun), resumable to the bit, stopping on NaN.

The run folder holds config.yaml, metrics.jsonl, train.log, tensorboard/, checkpoints/last.pt (and
periodic step-N.pt), views.png (one batch's views and boxes), loss.png and summary.json.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import soco
from soco.config.loading import config_to_dict, save_config
from soco.config.schema import Config
from soco.data.dataset import SoCoDataset, collate_views, draw_batch_views
from soco.data.proposals.store import ProposalStore
from soco.engine.checkpoint import load_checkpoint, prune_checkpoints, save_checkpoint
from soco.engine.distributed import DistributedContext, all_reduce_mean, all_reduce_sum, init_distributed
from soco.engine.lars import LARS, lars_param_groups
from soco.engine.run_log import RunLog, plot_loss_curve
from soco.engine.sampler import RunBatchSampler, batches_per_epoch
from soco.engine.schedules import ema_momentum_at, learning_rate_at, scaled_learning_rate
from soco.errors import ConfigError, SocoError
from soco.methods.soco import SoCo

LAST_CHECKPOINT = "last.pt"


class TrainingDiverged(SocoError):
    """The loss became NaN or infinite."""


@dataclass
class PretrainSummary:
    """What a finished (or resumed-and-finished) run did."""

    run_dir: str
    steps: int
    steps_this_run: int
    seconds: float
    images_per_second: float
    final_loss: float
    peak_memory_mib: float
    skipped_images: int
    rank_checksums: list  # a checksum of each process's weights; all equal when the ranks are in sync

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        return [
            f"steps: {self.steps} ({self.steps_this_run} this run) in {self.seconds:.1f} s",
            f"throughput: {self.images_per_second:.1f} images/s; peak memory {self.peak_memory_mib:.0f} MiB",
            f"final loss: {self.final_loss:.4f}; corrupt images skipped: {self.skipped_images}",
            f"run folder: {self.run_dir} (checkpoints/last.pt, metrics.jsonl, loss.png, views.png)",
        ]


@dataclass
class Schedule:
    """Step counts derived from the data size and the configuration."""

    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float
    images_per_step: int


def make_schedule(config: Config, dataset_size: int, world_size: int) -> Schedule:
    """Steps per epoch, total and warm-up steps, and the scaled peak learning rate."""
    train = config.train
    if train.accumulate < 1:
        raise ConfigError("train.accumulate must be at least 1")
    micro = batches_per_epoch(dataset_size, train.batch_size, world_size)
    steps_per_epoch = max(1, micro // train.accumulate)
    total = train.steps if train.steps > 0 else max(1, math.ceil(train.epochs * steps_per_epoch))
    warmup = min(total, round(config.optim.warmup_epochs * steps_per_epoch))
    images_per_step = train.batch_size * train.accumulate * world_size
    return Schedule(micro, steps_per_epoch, total, warmup,
                    scaled_learning_rate(config.optim.base_lr, images_per_step), images_per_step)


def resolve_loader_workers(requested: int, context: DistributedContext) -> int:
    """Data-loader workers per process: the request, or the cores left per process (at least 1)."""
    if requested >= 0:
        return requested
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // context.world_size)


def autocast_context(precision: str, device: torch.device):
    """Mixed precision: bf16 on GPU by default, fp32 on CPU unless asked."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext(), None
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16), None
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError("train.precision=fp16 needs a GPU; use bf16 or fp32 on the CPU")
        return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")
    raise ConfigError(f"train.precision must be auto, fp32, bf16 or fp16, not {precision!r}")


def gradients_finite(model: nn.Module) -> bool:
    """Whether every gradient is finite (after DDP's all-reduce the answer is the same on every rank)."""
    gradients = [p.grad for p in model.parameters() if p.grad is not None]
    if not gradients:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(gradients))).all())


def apply_gradients(optimizer: torch.optim.Optimizer, scaler) -> None:
    """One optimiser step (through the fp16 grad scaler when there is one), then clear the gradients."""
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process: GPU allocations on CUDA, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rng_state() -> dict:
    """Global random states (the data pipeline seeds its own generators; these cover everything else)."""
    import random

    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Undo rng_state()."""
    import random

    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_model(config: Config, context: DistributedContext) -> SoCo:
    """The SoCo model on its device, with SyncBN when several GPUs train together."""
    model = SoCo(config.model, config.views).to(context.device)
    if context.is_distributed and context.device.type == "cuda" and config.model.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def gather_weight_checksums(model: SoCo, context: DistributedContext) -> list[float]:
    """A float64 checksum of the online network and predictor on every process (rank order)."""
    with torch.no_grad():
        parameters = [*model.online.parameters(), *model.predictor.parameters()]
        local = sum(
            (p.double() * (1.0 + (torch.arange(p.numel(), device=p.device) % 7).view(p.shape).double())).sum()
            for p in parameters
        )
    if not context.is_distributed:
        return [float(local)]
    import torch.distributed as dist

    gathered = [torch.zeros((), dtype=torch.float64, device=context.device) for _ in range(context.world_size)]
    dist.all_gather(gathered, local.reshape(()).to(context.device))
    return [float(value) for value in gathered]


def _batch_to_device(batch: dict, device: torch.device) -> tuple[dict, dict]:
    """Views and boxes of a collated batch on the training device."""
    names = batch["view_names"]
    views = {name: tensor.to(device, non_blocking=True) for name, tensor in zip(names, batch["views"])}
    boxes = {name: tensor.to(device, non_blocking=True) for name, tensor in zip(names, batch["boxes"])}
    return views, boxes


def pretrain(
    config: Config,
    run_dir: str | Path,
    images_root: str | Path,
    store_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
) -> PretrainSummary:
    """Train SoCo on the images of `images_root` with the proposals of `store_dir`."""
    started = time.perf_counter()
    run_dir = Path(run_dir)
    context = init_distributed(config.train.device)
    checkpoint_dir = run_dir / "checkpoints"
    last_path = checkpoint_dir / LAST_CHECKPOINT
    if not resume and last_path.exists():
        raise SocoError(f"{run_dir} already holds a run (checkpoints/last.pt): pass --resume to continue it, "
                        "or choose another --out")

    torch.manual_seed(config.train.seed)
    store = ProposalStore(store_dir)
    dataset = SoCoDataset(images_root, store, config.views, seed=config.train.seed)
    schedule = make_schedule(config, len(dataset), context.world_size)
    model = build_model(config, context)
    optimizer = LARS(
        lars_param_groups(model, config.optim.weight_decay),
        lr=schedule.peak_lr, momentum=config.optim.momentum,
        weight_decay=config.optim.weight_decay, trust_coefficient=config.optim.trust_coefficient,
    )
    step, skipped, resumed_loss, resumed_scaler_state = 0, 0, float("nan"), None
    if resume and last_path.exists():
        state = load_checkpoint(last_path)
        model.online.load_state_dict(state["model"])
        model.predictor.load_state_dict(state["predictor"])
        model.target.load_state_dict(state["target"])
        optimizer.load_state_dict(state["optimizer"])
        step, skipped = int(state["step"]), int(state.get("skipped_images", 0))
        resumed_loss = float(state.get("loss", float("nan")))
        restore_rng_state(state["rng"])
        resumed_scaler_state = state.get("grad_scaler")
        if state.get("total_steps") != schedule.total_steps:
            raise SocoError(
                f"{last_path} was made for {state.get('total_steps')} steps, this configuration gives "
                f"{schedule.total_steps}: resume with the same data, batch size and length"
            )

    log = RunLog(run_dir, enabled=context.is_main)
    if context.is_main:
        save_config(config, run_dir / "config.yaml")
        log.text(f"soco {soco.__version__}; {context.world_size} process(es) on {context.device}; "
                 f"{len(dataset)} images; {schedule.total_steps} steps of {schedule.images_per_step} images; "
                 f"peak lr {schedule.peak_lr:.4g}; starting at step {step}")

    trained = model
    if context.is_distributed:
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        trained = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    autocast, scaler = autocast_context(config.train.precision, context.device)
    if scaler is not None and resumed_scaler_state:
        scaler.load_state_dict(resumed_scaler_state)
    workers = resolve_loader_workers(config.train.workers, context)
    accumulate = config.train.accumulate
    start_step, last_loss = step, resumed_loss
    data_seconds = model_seconds = 0.0
    model.train()
    bar = tqdm(total=schedule.total_steps, initial=step, unit="step", disable=not (progress and context.is_main),
               dynamic_ncols=True, desc="pretrain")
    try:
        sampler = RunBatchSampler(
            len(dataset), config.train.batch_size, config.train.seed, context.rank, context.world_size,
            batches_used_per_epoch=schedule.steps_per_epoch * accumulate, start_batch=step * accumulate,
            total_batches=schedule.total_steps * accumulate,
        )
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_views,
            pin_memory=context.device.type == "cuda", prefetch_factor=2 if workers else None,
        )
        batches = iter(loader)
        while step < schedule.total_steps:
            epoch = step // schedule.steps_per_epoch
            lr = learning_rate_at(step, schedule.total_steps, schedule.warmup_steps, schedule.peak_lr,
                                  config.optim.final_lr, config.optim.warmup_start_factor)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_started = time.perf_counter()
            loss_sum = torch.zeros((), device=context.device)
            step_data_seconds = 0.0
            for micro in range(accumulate):
                waited = time.perf_counter()
                batch = next(batches)
                step_data_seconds += time.perf_counter() - waited
                skipped += int(batch["skipped"])
                if not batch["views"]:  # every image of this micro-batch was unreadable
                    if context.is_distributed:  # the other processes would wait for this one forever
                        raise SocoError(f"every image of a micro-batch at step {step} is unreadable: "
                                        f"{batch['skipped_paths']}")
                    continue
                if step == 0 and micro == 0 and context.is_main:
                    draw_batch_views(batch, run_dir / "views.png")
                views, boxes = _batch_to_device(batch, context.device)
                sync = contextlib.nullcontext()
                if context.is_distributed and micro < accumulate - 1:
                    sync = trained.no_sync()
                with sync:
                    with autocast:
                        loss = trained(views, boxes) / accumulate
                    (scaler.scale(loss) if scaler else loss).backward()
                loss_sum += loss.detach()
            mean_loss = float(all_reduce_mean(loss_sum, context))
            problem = None
            if not math.isfinite(mean_loss):
                problem = f"loss became {mean_loss}"
            elif scaler is None and not gradients_finite(model):
                problem = f"a gradient became non-finite (loss {mean_loss:.4f})"
            if problem:
                message = (f"{problem} at step {step} (lr {lr:.4g}); stopped. "
                           f"The last good checkpoint is kept: {last_path if last_path.exists() else 'none yet'}")
                log.text(message)
                raise TrainingDiverged(message)
            apply_gradients(optimizer, scaler)
            momentum = ema_momentum_at(step, schedule.total_steps, config.optim.ema_base)
            model.update_target(momentum)
            step += 1
            last_loss = mean_loss
            step_seconds = time.perf_counter() - step_started
            data_seconds += step_data_seconds
            model_seconds += step_seconds - step_data_seconds
            images_per_second = schedule.images_per_step / max(step_seconds, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.3f}", img_s=f"{images_per_second:.1f}")
            if step % config.train.log_every == 0 or step == schedule.total_steps or step == start_step + 1:
                log.metrics(step, {
                    "epoch": epoch, "loss": mean_loss, "lr": lr, "ema_momentum": momentum,
                    "images_per_second": images_per_second, "data_seconds": step_data_seconds,
                    "step_seconds": step_seconds, "skipped_images": skipped,
                })
            if context.is_main and (step % config.train.checkpoint_every == 0 or step == schedule.total_steps):
                state = {
                    "model": model.online.state_dict(),
                    "predictor": model.predictor.state_dict(),
                    "target": model.target.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                    "loss": mean_loss,
                    "total_steps": schedule.total_steps,
                    "skipped_images": skipped,
                    "rng": rng_state(),
                    "grad_scaler": scaler.state_dict() if scaler is not None else {},
                    "config": config_to_dict(config),
                    "soco_version": soco.__version__,
                }
                save_checkpoint(state, last_path)
                if step % config.train.checkpoint_every == 0:
                    save_checkpoint(state, checkpoint_dir / f"step-{step:08d}.pt")
                    prune_checkpoints(checkpoint_dir, config.train.keep_checkpoints)
        del batches, loader
    finally:
        bar.close()

    skipped_total = int(all_reduce_sum(torch.tensor(skipped, device=context.device), context))
    checksums = gather_weight_checksums(model, context)
    if len(set(checksums)) > 1:
        log.text(f"warning: the processes' weights differ at the end: {checksums}")
    seconds = time.perf_counter() - started
    steps_this_run = step - start_step
    summary = PretrainSummary(
        run_dir=str(run_dir), steps=step, steps_this_run=steps_this_run, seconds=seconds,
        images_per_second=steps_this_run * schedule.images_per_step / max(data_seconds + model_seconds, 1e-9),
        final_loss=last_loss, peak_memory_mib=peak_memory_mib(context.device), skipped_images=skipped_total,
        rank_checksums=checksums,
    )
    if context.is_main:
        if (run_dir / "metrics.jsonl").exists():
            plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png")
        (run_dir / "summary.json").write_text(json.dumps(
            {**asdict(summary), "data_seconds": data_seconds, "model_seconds": model_seconds}, indent=2))
        for line in summary.lines():
            log.text(line)
    log.close()
    return summary
