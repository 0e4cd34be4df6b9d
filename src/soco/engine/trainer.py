"""The pretraining loop of any method: one process or many (torchrun), resumable to the bit, stopping on NaN.

The engine knows no method by name: it builds the method named by `method.name` from the registry,
the data set from the method's sample transform, and runs every step through the Method contract
(`soco.engine.step`). The run folder holds soco-run.json (what kind of folder it is), config.yaml,
metrics.jsonl, train.log, tensorboard/, checkpoints/last.pt (and periodic step-N.pt), views.png (one
batch as the method sees it), loss.png and summary.json.

The records stay those of one run: a resume must use the run's settings (but for RESUMABLE_SETTINGS),
continues the metrics from its checkpoint's step, and a resume of a finished run writes nothing.
Step hooks (`soco.engine.hooks`, e.g. the box probe of `soco pretrain --probe-labels`) add work on the
main process every N steps without the engine knowing what it is.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import soco
from soco.config.loading import config_to_dict, save_config
from soco.config.schema import Config
from soco.data.dataset import ImageDataset
from soco.data.proposals.store import ProposalStore, left_out_message
from soco.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    LAST_CHECKPOINT,
    CheckpointWriteError,
    load_newest_checkpoint,
    periodic_checkpoint_name,
    periodic_checkpoints,
    prune_checkpoints,
    save_checkpoint,
)
from soco.engine.compiling import compile_backbones
from soco.engine.distributed import DistributedContext, all_reduce_sum, init_distributed
from soco.engine.hooks import StepHook, hook_due
from soco.engine.optimizers import build_optimizer
from soco.engine.rng import restore_rng_state, rng_state
from soco.engine.run_log import RunLog, plot_loss_curve
from soco.engine.sampler import RunBatchSampler, batches_per_epoch
from soco.engine.schedules import learning_rate_at, scaled_learning_rate
from soco.engine.step import (  # noqa: F401
    StepRunner,
    TrainingDiverged,
    autocast_context,
    gradients_finite,
)
from soco.errors import ConfigError, SocoError
from soco.files import atomic_write_text
from soco.methods.base import Method
from soco.registry import build_method, method_class
from soco.run_folder import (
    changed_settings,
    check_run_folder,
    describe_changes,
    mark_run_folder,
)

RUN_KIND = "pretrain"
# What a resume may change: where, with how many workers, in which memory layout and whether compiled it
# runs, how often it reports and keeps checkpoints, where caches live. Every other setting changes what is
# trained, and a resume that differs in one is refused. The image folder and the proposal store are compared as the
# absolute paths the run read (`data.images`, `data.proposals`), whatever the configuration spelled.
RESUMABLE_SETTINGS = (
    "data.cache_dir", "proposals.workers", "train.workers", "train.device", "train.channels_last",
    "train.compile", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
)

_log = logging.getLogger(__name__)


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
        if self.steps_this_run == 0:
            return [(f"nothing to train: the run in {self.run_dir} had already finished its {self.steps} steps "
                     f"(final loss {self.final_loss:.4f}); its records are unchanged")]
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


def schedule_position(step: int, schedule: Schedule, cosine_per: str) -> int:
    """The step the learning-rate schedule is read at: the step itself, or the first step of its epoch."""
    if cosine_per == "step":
        return step
    if cosine_per == "epoch":
        return (step // schedule.steps_per_epoch) * schedule.steps_per_epoch
    raise ConfigError(f"optim.cosine_per must be step or epoch, not {cosine_per!r}")


def resolve_loader_workers(requested: int, context: DistributedContext) -> int:
    """Data-loader workers per process: the request, or the cores left per process (at least 1)."""
    if requested >= 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // context.world_size)


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process: GPU allocations on CUDA, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_model(config: Config, context: DistributedContext) -> Method:
    """The configured method on its device, with SyncBN when several GPUs train together."""
    method = build_method(config.method).to(context.device)
    if config.train.channels_last:
        # before DDP wraps it: DDP's gradient buckets take the parameters' layout when it is built
        method = method.to(memory_format=torch.channels_last)
    if config.train.compile:
        compile_backbones(method)
    if context.is_distributed and context.device.type == "cuda" and config.train.sync_bn:
        method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
    return method


def weight_checksum(method: nn.Module) -> torch.Tensor:
    """A float64 checksum of the trainable weights, position-weighted so that swapped values change it."""
    with torch.no_grad():
        parameters = [p for p in method.parameters() if p.requires_grad]
        return sum(
            (p.double() * (1.0 + (torch.arange(p.numel(), device=p.device) % 7).view(p.shape).double())).sum()
            for p in parameters
        )


def gather_weight_checksums(method: nn.Module, context: DistributedContext) -> list[float]:
    """The trainable weights' checksum on every process (rank order); all equal when the ranks are in sync."""
    local = weight_checksum(method)
    if not context.is_distributed:
        return [float(local)]
    import torch.distributed as dist

    gathered = [torch.zeros((), dtype=torch.float64, device=context.device) for _ in range(context.world_size)]
    dist.all_gather(gathered, local.reshape(()).to(context.device))
    return [float(value) for value in gathered]


def build_dataset(method: Method, images_root: str | Path, store_dir: str | Path | None, seed: int) -> ImageDataset:
    """The data set of a folder (and its proposal store, when given) through the method's sample transform."""
    store = ProposalStore(store_dir) if store_dir is not None else None
    return ImageDataset(images_root, store, method.sample_transform(), seed=seed)


def data_identity(images_root: str | Path, store_dir: str | Path | None) -> dict:
    """The image folder and proposal store a run reads, as absolute paths (how a resume recognises its data)."""
    return {
        "images": str(Path(images_root).expanduser().resolve()),
        "proposals": str(Path(store_dir).expanduser().resolve()) if store_dir is not None else None,
    }


def refuse_run_inside_images(run_dir: Path, images_root: str | Path) -> None:
    """SocoError when the run folder is the image folder or inside it: its pictures would become training images."""
    run, images = run_dir.expanduser().resolve(), Path(images_root).expanduser().resolve()
    if run == images or run.is_relative_to(images):
        raise SocoError(f"--out {run_dir} is inside the image folder {images_root}: the run's pictures (views.png, "
                        "loss.png) would be read as training images; choose a folder outside it")


def resume_changes(state: dict, config: Config, data: dict, path: Path) -> list[tuple[str, object, object]]:
    """The settings a resume changes among RESUMABLE_SETTINGS; SocoError naming every other one that differs."""
    recorded, current = dict(state.get("config") or {}), config_to_dict(config)
    ignored = RESUMABLE_SETTINGS
    if "data" in state:
        recorded["data"] = {**recorded.get("data", {}), **state["data"]}
        current["data"] = {**current["data"], **data}
    else:  # a checkpoint of an older soco: the configuration may not name the folder it read
        ignored += ("data.images",)
    if not method_class(config.method.name).uses_proposals(config.method):
        # A method that reads no proposals trains the same with or without a store named.
        ignored += ("data.proposals",)
    recorded_method = (recorded.get("method") or {}).get("name")
    if recorded_method is not None and recorded_method != config.method.name:
        # Another method's section has other keys: its name says it all.
        recorded["method"], current["method"] = {"name": recorded_method}, {"name": config.method.name}
    refused = changed_settings(recorded, current, ignored)
    if refused:
        raise SocoError(f"{path} was made with other settings: {describe_changes(refused)}; resume with the run's "
                        f"settings (only {', '.join(RESUMABLE_SETTINGS)} may change), or start a new run in "
                        "another --out")
    return changed_settings(recorded, current)


def checkpoint_report(good: tuple[Path, int] | None, checkpoint_dir: Path) -> str:
    """Which checkpoints a stopped run leaves to resume from, in words."""
    if good is None:
        return "no checkpoint was written yet"
    path, step = good
    others = [p.name for p in periodic_checkpoints(checkpoint_dir) if p != path]
    return (f"the last good checkpoint is {path} (step {step})"
            + (f"; periodic checkpoints: {', '.join(others)}" if others else ""))


def left_out_images(dataset: ImageDataset) -> str | None:
    """The line on the images the proposal store has no proposals for (the data set leaves them out), or None."""
    return left_out_message(dataset.store) if dataset.store is not None else None


def checkpoint_state(method: Method, optimizer, runner: StepRunner, config: Config, step: int, loss: float,
                     total_steps: int, skipped: int, data: dict | None = None) -> dict:
    """Everything a resume and an export need, loadable with torch.load(weights_only=True).

    The encoder entries share their tensors with method_state, so torch.save stores them once.
    """
    target = method.target_encoder()
    state = {
        "format_version": CHECKPOINT_FORMAT,
        "method": method.name,
        "method_state": method.state_dict(),
        "encoder": method.encoder().state_dict(),
        "encoder_layout": method.encoder_layout().to_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "loss": loss,
        "total_steps": total_steps,
        "skipped_images": skipped,
        "rng": rng_state(),
        "grad_scaler": runner.scaler.state_dict() if runner.scaler is not None else {},
        "config": config_to_dict(config),
        "soco_version": soco.__version__,
    }
    if data is not None:
        state["data"] = data
    if target is not None:
        state["encoder_target"] = target.state_dict()
    return state


def check_resumable(state: dict, path: Path) -> None:
    """SocoError for a checkpoint that no resume can read (format 1)."""
    if "method_state" not in state:
        raise SocoError(f"{path} was written by soco before the Method redesign (format 1): it cannot be resumed, "
                        "but `soco export` still reads it")


def restore_checkpoint(state: dict, path: Path, method: Method, optimizer) -> dict:
    """Load a checkpoint of this run (read from `path`) into the method and optimiser; returns the checkpoint."""
    check_resumable(state, path)
    if state.get("method") != method.name:
        raise SocoError(f"{path} is a {state.get('method')!r} run, this configuration trains {method.name!r}")
    method.load_state_dict(state["method_state"])
    optimizer.load_state_dict(state["optimizer"])
    restore_rng_state(state["rng"])
    return state


def pretrain(
    config: Config,
    run_dir: str | Path,
    images_root: str | Path,
    store_dir: str | Path | None,
    resume: bool = False,
    progress: bool = True,
    hooks: Sequence[StepHook] = (),
) -> PretrainSummary:
    """Train the configured method on the images of `images_root` (with the proposals of `store_dir`).

    `hooks` run on the main process only, every `hook.every` steps and after the last (`soco.engine.hooks`): e.g.
    the box probe.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    refuse_run_inside_images(run_dir, images_root)
    check_run_folder(run_dir, RUN_KIND)
    context = init_distributed(config.train.device)
    checkpoint_dir = run_dir / "checkpoints"
    last_path = checkpoint_dir / LAST_CHECKPOINT
    if not resume and (last_path.exists() or periodic_checkpoints(checkpoint_dir)):
        raise SocoError(f"{run_dir} already holds a run (checkpoints/): pass --resume to continue it, "
                        "or choose another --out")
    data = data_identity(images_root, store_dir)

    # Read and compare before anything is built or written: a refused resume leaves the folder as it was.
    resumed, notes = None, []
    if resume:
        resumed = load_newest_checkpoint(checkpoint_dir)
    if resumed is not None:
        resumed_path, state, passed_over = resumed
        check_resumable(state, resumed_path)
        if passed_over:
            notes.append(f"{'; '.join(passed_over)}: resuming from {resumed_path} (step {state.get('step')})")
        changes = resume_changes(state, config, data, resumed_path)
        if changes:
            notes.append(f"resumed with other settings that may change: {describe_changes(changes)}")

    # The order of seeding, model construction and loader creation fixes every random stream.
    torch.manual_seed(config.train.seed)
    method = build_model(config, context)
    dataset = build_dataset(method, images_root, store_dir, config.train.seed)
    schedule = make_schedule(config, len(dataset), context.world_size)
    optimizer = build_optimizer(config.optim, method.parameter_groups(config.optim.weight_decay), schedule.peak_lr)
    trained = method
    if context.is_distributed:
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        trained = nn.parallel.DistributedDataParallel(method, device_ids=device_ids)
    runner = StepRunner(method, trained, optimizer, context, config.train.precision, config.train.accumulate,
                        config.train.channels_last)

    step, skipped, resumed_loss = 0, 0, float("nan")
    good_checkpoint: tuple[Path, int] | None = None  # the newest checkpoint a resume could start from
    if resumed is not None:
        restore_checkpoint(state, resumed_path, method, optimizer)
        step, skipped = int(state["step"]), int(state.get("skipped_images", 0))
        resumed_loss = float(state.get("loss", float("nan")))
        good_checkpoint = (resumed_path, step)
        if runner.scaler is not None and state.get("grad_scaler"):
            runner.scaler.load_state_dict(state["grad_scaler"])
        if state.get("total_steps") != schedule.total_steps:
            raise SocoError(
                f"{resumed_path} was made for {state.get('total_steps')} steps, this configuration gives "
                f"{schedule.total_steps}: resume with the same data, batch size and length"
            )
        if step >= schedule.total_steps:
            # A finished run: its config.yaml, metrics and summary.json stay those of the run that trained it.
            return PretrainSummary(
                run_dir=str(run_dir), steps=step, steps_this_run=0, seconds=time.perf_counter() - started,
                images_per_second=0.0, final_loss=resumed_loss, peak_memory_mib=peak_memory_mib(context.device),
                skipped_images=skipped, rank_checksums=gather_weight_checksums(method, context),
            )

    left_out = left_out_images(dataset)
    if left_out and context.is_main:
        _log.warning(left_out)
    for note in notes:
        if context.is_main:
            _log.warning(note)
    log = RunLog(run_dir, enabled=context.is_main, start_step=step)
    if context.is_main:
        mark_run_folder(run_dir, RUN_KIND)
        if step == 0 or not (run_dir / "config.yaml").exists():
            save_config(config, run_dir / "config.yaml")
        log.text(f"soco {soco.__version__}; method {method.name}; {context.world_size} process(es) on "
                 f"{context.device}; {len(dataset)} images; {schedule.total_steps} steps of "
                 f"{schedule.images_per_step} images; peak lr {schedule.peak_lr:.4g}; starting at step {step}")
        for line in [left_out, *notes]:
            if line:
                log.text(line)

    hooks = list(hooks) if context.is_main else []
    workers = resolve_loader_workers(config.train.workers, context)
    accumulate = config.train.accumulate
    start_step, last_loss = step, resumed_loss
    data_seconds = model_seconds = 0.0
    method.train()
    bar = tqdm(total=schedule.total_steps, initial=step, unit="step", disable=not (progress and context.is_main),
               dynamic_ncols=True, desc=f"pretrain {method.name}")
    try:
        for hook in hooks:
            hook.start(step, method, log)
        sampler = RunBatchSampler(
            len(dataset), config.train.batch_size, config.train.seed, context.rank, context.world_size,
            batches_used_per_epoch=schedule.steps_per_epoch * accumulate, start_batch=step * accumulate,
            total_batches=schedule.total_steps * accumulate,
        )
        # The loader draws its workers' base seed from a generator of its own: from the global one, a
        # resumed run would draw it after restoring the random state, and every later global draw of a
        # method's step (MoCo's key shuffle) would differ from the uninterrupted run's.
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=workers, collate_fn=dataset.collate,
            pin_memory=context.device.type == "cuda", prefetch_factor=2 if workers else None,
            generator=torch.Generator().manual_seed(config.train.seed),
        )
        batches = iter(loader)
        while step < schedule.total_steps:
            epoch = step // schedule.steps_per_epoch
            lr = learning_rate_at(schedule_position(step, schedule, config.optim.cosine_per), schedule.total_steps,
                                  schedule.warmup_steps, schedule.peak_lr, config.optim.final_lr,
                                  config.optim.warmup_start_factor)
            step_started = time.perf_counter()
            micro_batches = []
            for micro in range(accumulate):
                batch = next(batches)
                skipped += int(batch["skipped"])
                if not batch["paths"]:  # every image of this micro-batch was unreadable
                    if context.is_distributed:  # the other processes would wait for this one forever
                        raise SocoError(f"every image of a micro-batch at step {step + 1} is unreadable: "
                                        f"{batch['skipped_paths']}")
                    continue
                micro_batches.append(batch)
            step_data_seconds = time.perf_counter() - step_started
            if step == start_step == 0 and micro_batches and context.is_main:
                drawing_started = time.perf_counter()
                method.draw_batch(micro_batches[0], run_dir / "views.png")
                step_started += time.perf_counter() - drawing_started  # the picture is neither data nor model time
            try:
                result = runner.run(micro_batches, step, schedule.total_steps, lr)
            except TrainingDiverged as error:
                # The runner counts steps from 0; the logs and checkpoints name step k after k updates, so
                # the step that failed is the next one.
                problem = str(error).split(" at step ")[0]
                message = (f"{problem} at step {step + 1} (lr {lr:.4g}); stopped: "
                           f"{checkpoint_report(good_checkpoint, checkpoint_dir)}")
                log.text(message)
                raise TrainingDiverged(message) from None
            step += 1
            last_loss = result.loss
            step_seconds = time.perf_counter() - step_started
            data_seconds += step_data_seconds
            model_seconds += step_seconds - step_data_seconds
            images_per_second = schedule.images_per_step / max(step_seconds, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.3f}", img_s=f"{images_per_second:.1f}")
            if step % config.train.log_every == 0 or step == schedule.total_steps or step == start_step + 1:
                log.metrics(step, {
                    **result.metrics, "epoch": epoch, "loss": result.loss, "lr": lr,  # the engine's names win
                    "images_per_second": images_per_second, "data_seconds": step_data_seconds,
                    "step_seconds": step_seconds, "skipped_images": skipped,
                })
            # Before the checkpoint: a run killed in a hook resumes before this step and calls it again.
            for hook in hooks:
                if hook_due(hook, step, schedule.total_steps):
                    hook.after_step(step, method, log)
            if context.is_main and (step % config.train.checkpoint_every == 0 or step == schedule.total_steps):
                state = checkpoint_state(method, optimizer, runner, config, step, result.loss,
                                         schedule.total_steps, skipped, data)
                try:
                    save_checkpoint(state, last_path)
                    good_checkpoint = (last_path, step)
                    if step % config.train.checkpoint_every == 0:
                        save_checkpoint(state, checkpoint_dir / periodic_checkpoint_name(step))
                        prune_checkpoints(checkpoint_dir, config.train.keep_checkpoints)
                except CheckpointWriteError as error:
                    message = f"stopped at step {step}: {error}; {checkpoint_report(good_checkpoint, checkpoint_dir)}"
                    try:
                        log.text(message)
                    except OSError:  # the disk that refused the checkpoint may refuse the log line too
                        pass
                    raise CheckpointWriteError(message) from None
        del batches, loader
    except BaseException:
        log.close()
        raise
    finally:
        bar.close()

    skipped_total = int(all_reduce_sum(torch.tensor(skipped, device=context.device), context))
    checksums = gather_weight_checksums(method, context)
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
            plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png", title=f"{method.name} pretraining loss")
        atomic_write_text(run_dir / "summary.json", json.dumps(
            {**asdict(summary), "data_seconds": data_seconds, "model_seconds": model_seconds}, indent=2))
        for line in summary.lines():
            log.text(line)
    log.close()
    return summary
