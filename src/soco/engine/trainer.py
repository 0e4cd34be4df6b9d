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

`pretrain` runs in phases: `_set_up` (checks, the checkpoint to resume read and compared, then the method, data,
schedule, optimiser and step runner built), `_resume`, `_open_records`, `_train_loop` (one `_train_step` per
update) and `_finish`. The checkpoint format is `soco.engine.checkpoint`'s; seed, DDP and the precision line are
`soco.engine.run_setup`'s, shared with `soco.transfer.finetune`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from collections.abc import Sequence
from contextlib import ExitStack
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
from soco.engine.checkpoint import LAST_CHECKPOINT, CheckpointWriteError, check_resumable, checkpoint_report
from soco.engine.checkpoint import checkpoint_state, compare_settings, load_newest_checkpoint, periodic_checkpoint_name
from soco.engine.checkpoint import periodic_checkpoints, prune_checkpoints, restore_checkpoint, save_checkpoint
from soco.engine.compiling import compile_backbones
from soco.engine.distributed import DistributedContext, all_reduce_sum, init_distributed
from soco.engine.hooks import StepHook, hook_due
from soco.engine.optimizers import build_optimizer
from soco.engine.run_log import RunLog, plot_loss_curve
from soco.engine.run_setup import data_parallel, precision_line, refuse_a_second_run, run_folder_lock, seed_run
from soco.engine.sampler import RunBatchSampler, batches_per_epoch
from soco.engine.schedules import learning_rate_at, scaled_learning_rate
from soco.engine.step import EmptyStep, StepResult, StepRunner, TrainingDiverged
from soco.errors import ConfigError, SocoError
from soco.files import atomic_write_text
from soco.methods.base import Method
from soco.registry import build_method, method_class
from soco.run_folder import describe_changes, mark_run_folder

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
    """The data set of a folder (and its proposal store, when given) through the method's sample transform.

    DataError when no image of it can be read: refused here, before a run writes anything.
    """
    store = ProposalStore(store_dir) if store_dir is not None else None
    dataset = ImageDataset(images_root, store, method.sample_transform(), seed=seed)
    dataset.check_readable()
    return dataset


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
    resumable = RESUMABLE_SETTINGS
    if "data" in state:
        recorded["data"] = {**recorded.get("data", {}), **state["data"]}
        current["data"] = {**current["data"], **data}
    else:  # a checkpoint of an older soco: the configuration may not name the folder it read
        resumable += ("data.images",)
    if not method_class(config.method.name).uses_proposals(config.method):
        # A method that reads no proposals trains the same with or without a store named.
        resumable += ("data.proposals",)
    recorded_method = (recorded.get("method") or {}).get("name")
    if recorded_method is not None and recorded_method != config.method.name:
        # Another method's section has other keys: its name says it all.
        recorded["method"], current["method"] = {"name": recorded_method}, {"name": config.method.name}
    refused, changed = compare_settings(recorded, current, resumable)
    if refused:
        raise SocoError(f"{path} was made with other settings: {describe_changes(refused)}; resume with the run's "
                        f"settings (only {', '.join(RESUMABLE_SETTINGS)} may change), or start a new run in "
                        "another --out")
    return changed


def left_out_images(dataset: ImageDataset) -> str | None:
    """The line on the images the proposal store has no proposals for (the data set leaves them out), or None."""
    return left_out_message(dataset.store) if dataset.store is not None else None


@dataclass
class _Session:
    """What the phases of one pretraining session share; the counters move as it trains."""

    config: Config
    run_dir: Path
    context: DistributedContext
    data: dict  # data_identity: what a resume compares
    resumed: tuple[Path, dict, list[str]] | None  # (path, state, files passed over) of the checkpoint resumed
    notes: list[str]  # lines for the log on how the resume went
    method: Method
    dataset: ImageDataset
    schedule: Schedule
    optimizer: torch.optim.Optimizer
    runner: StepRunner
    log: RunLog | None = None
    step: int = 0  # updates done
    start_step: int = 0  # updates done when this session started
    skipped: int = 0  # unreadable images replaced, by this process
    last_loss: float = float("nan")
    good_checkpoint: tuple[Path, int] | None = None  # the newest checkpoint a resume could start from
    data_seconds: float = 0.0
    model_seconds: float = 0.0
    precision: str | None = None  # what the first micro-batch of the session computed in

    @property
    def checkpoint_dir(self) -> Path:
        """checkpoints/ of the run folder."""
        return self.run_dir / "checkpoints"


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
    with ExitStack() as held:  # the run folder's lock, from the set-up to the end, whatever ends the run
        session = _set_up(config, Path(run_dir), images_root, store_dir, resume, held)
        if session.resumed is not None:
            _resume(session)
            if session.step >= session.schedule.total_steps:
                return _already_finished(session, started)
        _open_records(session)
        _train_loop(session, hooks, progress)
        return _finish(session, started)


def _set_up(config: Config, run_dir: Path, images_root: str | Path, store_dir: str | Path | None,
            resume: bool, held: ExitStack) -> _Session:
    """Check and lock the folder (held until `held` closes), read and compare the checkpoint to resume from, then
    build what trains (nothing is written)."""
    refuse_run_inside_images(run_dir, images_root)
    context = init_distributed(config.train.device)
    held.enter_context(run_folder_lock(run_dir, RUN_KIND, "soco pretrain", context))
    checkpoint_dir = run_dir / "checkpoints"
    holds_run = (checkpoint_dir / LAST_CHECKPOINT).exists() or bool(periodic_checkpoints(checkpoint_dir))
    refuse_a_second_run(run_dir, "a run (checkpoints/)", holds_run, resume)
    data = data_identity(images_root, store_dir)
    # Read and compare before anything is built or written: a refused resume leaves the folder as it was.
    resumed, notes = _read_checkpoint_to_resume(config, checkpoint_dir, data) if resume else (None, [])

    # The order of seeding, model construction and loader creation fixes every random stream.
    seed_run(config.train.seed)
    method = build_model(config, context)
    dataset = build_dataset(method, images_root, store_dir, config.train.seed)
    schedule = make_schedule(config, len(dataset), context.world_size)
    optimizer = build_optimizer(config.optim, method.parameter_groups(config.optim.weight_decay), schedule.peak_lr)
    runner = StepRunner(method, data_parallel(method, context), optimizer, context, config.train.precision,
                        config.train.channels_last)
    return _Session(config, run_dir, context, data, resumed, notes, method, dataset, schedule, optimizer, runner)


def _read_checkpoint_to_resume(config: Config, checkpoint_dir: Path,
                               data: dict) -> tuple[tuple[Path, dict, list[str]] | None, list[str]]:
    """(newest readable checkpoint or None, notes for the log); SocoError when it cannot resume with `config`."""
    resumed, notes = load_newest_checkpoint(checkpoint_dir), []
    if resumed is not None:
        path, state, passed_over = resumed
        check_resumable(state, path)
        if passed_over:
            notes.append(f"{'; '.join(passed_over)}: resuming from {path} (step {state.get('step')})")
        changes = resume_changes(state, config, data, path)
        if changes:
            notes.append(f"resumed with other settings that may change: {describe_changes(changes)}")
    return resumed, notes


def _resume(session: _Session) -> None:
    """Load the checkpoint into what was built: weights, optimiser, random states, grad scaler, counters."""
    path, state, _ = session.resumed
    restore_checkpoint(state, path, session.method, session.optimizer)
    session.step = session.start_step = int(state["step"])
    session.skipped = int(state.get("skipped_images", 0))
    session.last_loss = float(state.get("loss", float("nan")))
    session.good_checkpoint = (path, session.step)
    scaler = session.runner.scaler
    if scaler is not None and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    if state.get("total_steps") != session.schedule.total_steps:
        raise SocoError(
            f"{path} was made for {state.get('total_steps')} steps, this configuration gives "
            f"{session.schedule.total_steps}: resume with the same data, batch size and length"
        )


def _already_finished(session: _Session, started: float) -> PretrainSummary:
    """The summary of a resumed run that had finished: its config.yaml, metrics and summary.json stay as they are."""
    return PretrainSummary(
        run_dir=str(session.run_dir), steps=session.step, steps_this_run=0, seconds=time.perf_counter() - started,
        images_per_second=0.0, final_loss=session.last_loss, peak_memory_mib=peak_memory_mib(session.context.device),
        skipped_images=session.skipped, rank_checksums=gather_weight_checksums(session.method, session.context),
    )


def _open_records(session: _Session) -> None:
    """Warn of left-out images and resume notes, open the run's log, mark the folder, save config.yaml."""
    context, run_dir, schedule = session.context, session.run_dir, session.schedule
    left_out = left_out_images(session.dataset)
    if left_out and context.is_main:
        _log.warning(left_out)
    for note in session.notes:
        if context.is_main:
            _log.warning(note)
    session.log = RunLog(run_dir, enabled=context.is_main, start_step=session.step)
    if context.is_main:
        mark_run_folder(run_dir, RUN_KIND)
        if session.step == 0 or not (run_dir / "config.yaml").exists():
            save_config(session.config, run_dir / "config.yaml")
        session.log.text(f"soco {soco.__version__}; method {session.method.name}; {context.world_size} process(es) "
                         f"on {context.device}; {len(session.dataset)} images; {schedule.total_steps} steps of "
                         f"{schedule.images_per_step} images; peak lr {schedule.peak_lr:.4g}; starting at step "
                         f"{session.step}")
        for line in [left_out, *session.notes]:
            if line:
                session.log.text(line)


def _train_loop(session: _Session, hooks: Sequence[StepHook], progress: bool) -> None:
    """Train from the session's step to the last one through one long-lived loader; the log closes on any error."""
    context, config, schedule = session.context, session.config, session.schedule
    hooks = list(hooks) if context.is_main else []
    workers = resolve_loader_workers(config.train.workers, context)
    accumulate = config.train.accumulate
    session.method.train()
    bar = tqdm(total=schedule.total_steps, initial=session.step, unit="step",
               disable=not (progress and context.is_main), dynamic_ncols=True, desc=f"pretrain {session.method.name}")
    try:
        for hook in hooks:
            hook.start(session.step, session.method, session.log)
        sampler = RunBatchSampler(
            len(session.dataset), config.train.batch_size, config.train.seed, context.rank, context.world_size,
            batches_used_per_epoch=schedule.steps_per_epoch * accumulate, start_batch=session.step * accumulate,
            total_batches=schedule.total_steps * accumulate,
        )
        # The loader draws its workers' base seed from a generator of its own: from the global one, a
        # resumed run would draw it after restoring the random state, and every later global draw of a
        # method's step (MoCo's key shuffle) would differ from the uninterrupted run's.
        loader = torch.utils.data.DataLoader(
            session.dataset, batch_sampler=sampler, num_workers=workers, collate_fn=session.dataset.collate,
            pin_memory=context.device.type == "cuda", prefetch_factor=2 if workers else None,
            generator=torch.Generator().manual_seed(config.train.seed),
        )
        batches = iter(loader)
        while session.step < schedule.total_steps:
            _train_step(session, batches, hooks, bar)
        del batches, loader
    except BaseException:
        session.log.close()
        raise
    finally:
        bar.close()


def _train_step(session: _Session, batches, hooks: list[StepHook], bar) -> None:
    """One update: its micro-batches, the step, its metrics, the hooks due and the checkpoints due."""
    config, schedule, step = session.config, session.schedule, session.step
    epoch = step // schedule.steps_per_epoch
    lr = learning_rate_at(schedule_position(step, schedule, config.optim.cosine_per), schedule.total_steps,
                          schedule.warmup_steps, schedule.peak_lr, config.optim.final_lr,
                          config.optim.warmup_start_factor)
    step_started = time.perf_counter()
    micro_batches = _next_micro_batches(session, batches)
    step_data_seconds = time.perf_counter() - step_started
    if step == session.start_step:
        records_started = time.perf_counter()
        _first_batch_records(session, micro_batches)
        step_started += time.perf_counter() - records_started  # the picture is neither data nor model time
    result = _run_step(session, micro_batches, lr)
    session.step = step = step + 1
    session.last_loss = result.loss
    step_seconds = time.perf_counter() - step_started
    session.data_seconds += step_data_seconds
    session.model_seconds += step_seconds - step_data_seconds
    images_per_second = schedule.images_per_step / max(step_seconds, 1e-9)
    bar.update(1)
    bar.set_postfix(loss=f"{result.loss:.3f}", img_s=f"{images_per_second:.1f}")
    if step % config.train.log_every == 0 or step == schedule.total_steps or step == session.start_step + 1:
        session.log.metrics(step, {
            **result.metrics, "epoch": epoch, "loss": result.loss, "lr": lr,  # the engine's names win
            "images_per_second": images_per_second, "data_seconds": step_data_seconds,
            "step_seconds": step_seconds, "skipped_images": session.skipped,
        })
    # Before the checkpoint: a run killed in a hook resumes before this step and calls it again.
    for hook in hooks:
        if hook_due(hook, step, schedule.total_steps):
            hook.after_step(step, session.method, session.log)
    if session.context.is_main and (step % config.train.checkpoint_every == 0 or step == schedule.total_steps):
        _save_checkpoints(session, result.loss)


def _next_micro_batches(session: _Session, batches) -> list[dict]:
    """The `train.accumulate` micro-batches of the next step, less those whose every image was unreadable."""
    micro_batches = []
    for _ in range(session.config.train.accumulate):
        batch = next(batches)
        session.skipped += int(batch["skipped"])
        if not batch["paths"]:  # every image of this micro-batch was unreadable
            if session.context.is_distributed:  # the other processes would wait for this one forever
                raise SocoError(f"every image of a micro-batch at step {session.step + 1} is unreadable: "
                                f"{batch['skipped_paths']}")
            continue
        micro_batches.append(batch)
    return micro_batches


def _first_batch_records(session: _Session, micro_batches: list[dict]) -> None:
    """On the session's first step: the precision it computes in (train.log), and a new run's views.png."""
    if not micro_batches:
        return
    session.precision = session.runner.precision_for(micro_batches[0])
    session.log.text(precision_line(session.precision, "train.precision", session.config.train.precision))
    if session.step == 0 and session.context.is_main:
        session.method.draw_batch(micro_batches[0], session.run_dir / "views.png")


def _run_step(session: _Session, micro_batches: list[dict], lr: float) -> StepResult:
    """The step runner's update; a divergence or an empty step is told with its step and the checkpoint to resume at."""
    try:
        return session.runner.run(micro_batches, session.step, session.schedule.total_steps, lr)
    except (TrainingDiverged, EmptyStep) as error:
        # The runner counts steps from 0; the logs and checkpoints name step k after k updates, so
        # the step that failed is the next one.
        problem = str(error).split(" at step ")[0]
        message = (f"{problem} at step {session.step + 1} (lr {lr:.4g}); stopped: "
                   f"{checkpoint_report(session.good_checkpoint, session.checkpoint_dir)}")
        session.log.text(message)
        raise type(error)(message) from None


def _save_checkpoints(session: _Session, loss: float) -> None:
    """last.pt, and step-N.pt every train.checkpoint_every steps; a refused write stops the run in one line."""
    config, step, checkpoint_dir = session.config, session.step, session.checkpoint_dir
    last_path = checkpoint_dir / LAST_CHECKPOINT
    state = checkpoint_state(session.method, session.optimizer, session.runner, config, step, loss,
                             session.schedule.total_steps, session.skipped, session.data)
    try:
        save_checkpoint(state, last_path)
        session.good_checkpoint = (last_path, step)
        if step % config.train.checkpoint_every == 0:
            save_checkpoint(state, checkpoint_dir / periodic_checkpoint_name(step))
            prune_checkpoints(checkpoint_dir, config.train.keep_checkpoints)
    except CheckpointWriteError as error:
        message = f"stopped at step {step}: {error}; {checkpoint_report(session.good_checkpoint, checkpoint_dir)}"
        try:
            session.log.text(message)
        except OSError:  # the disk that refused the checkpoint may refuse the log line too
            pass
        raise CheckpointWriteError(message) from None


def _finish(session: _Session, started: float) -> PretrainSummary:
    """Gather the processes' counts and checksums; the loss curve, summary.json (with the precision) and last lines."""
    context, run_dir, log = session.context, session.run_dir, session.log
    skipped_total = int(all_reduce_sum(torch.tensor(session.skipped, device=context.device), context))
    checksums = gather_weight_checksums(session.method, context)
    if len(set(checksums)) > 1:
        log.text(f"warning: the processes' weights differ at the end: {checksums}")
    seconds = time.perf_counter() - started
    steps_this_run = session.step - session.start_step
    busy_seconds = session.data_seconds + session.model_seconds
    summary = PretrainSummary(
        run_dir=str(run_dir), steps=session.step, steps_this_run=steps_this_run, seconds=seconds,
        images_per_second=steps_this_run * session.schedule.images_per_step / max(busy_seconds, 1e-9),
        final_loss=session.last_loss, peak_memory_mib=peak_memory_mib(context.device), skipped_images=skipped_total,
        rank_checksums=checksums,
    )
    if context.is_main:
        if (run_dir / "metrics.jsonl").exists():
            plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png",
                            title=f"{session.method.name} pretraining loss")
        atomic_write_text(run_dir / "summary.json", json.dumps(
            {**asdict(summary), "data_seconds": session.data_seconds, "model_seconds": session.model_seconds,
             "precision": session.precision}, indent=2))
        for line in summary.lines():
            log.text(line)
    log.close()
    return summary
