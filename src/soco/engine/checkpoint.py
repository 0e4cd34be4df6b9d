"""Checkpoints of both training loops: the pretraining state, atomic saves, the newest readable file, restoring, and
the comparison of a resume's settings with the checkpoint's; every file loads with torch.load(weights_only=True)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import soco
from soco.config.loading import config_to_dict
from soco.engine.rng import restore_rng_state, rng_state
from soco.errors import FileWriteError, SocoError
from soco.files import atomic_write, torch_save
from soco.run_folder import changed_settings

if TYPE_CHECKING:
    from soco.config.schema import Config
    from soco.methods.base import Method

# 1: SoCo-only entries (model, predictor, target). 2: any method (method, method_state, encoder,
# encoder_target, encoder_layout); export still reads format 1.
CHECKPOINT_FORMAT = 2
LAST_CHECKPOINT = "last.pt"


class CheckpointWriteError(FileWriteError):
    """A checkpoint could not be written (a full disk, a lost mount); the file it would replace is intact."""


def periodic_checkpoint_name(step: int) -> str:
    """The file name of the periodic checkpoint of a step (zero-padded, so that names sort by step)."""
    return f"step-{step:08d}.pt"


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write `state` to a temporary file, sync it, then rename: a kill or a full disk never leaves a torn checkpoint.

    Raises CheckpointWriteError naming the file when the system refuses the write or cuts it short.
    """
    try:
        return atomic_write(path, lambda tmp: torch_save(state, tmp))
    except OSError as error:
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {error.strerror or error}") from error


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint on the CPU with the safe (weights-only) unpickler."""
    path = Path(path)
    if not path.is_file():
        raise SocoError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise SocoError(f"checkpoint {path} cannot be read: {error}") from None


def periodic_checkpoints(folder: Path) -> list[Path]:
    """The periodic checkpoints (step-*.pt) of a folder, newest first."""
    return sorted(Path(folder).glob("step-*.pt"), reverse=True)


def load_newest_checkpoint(folder: Path) -> tuple[Path, dict, list[str]] | None:
    """(path, state, passed over) of the newest readable checkpoint: last.pt, else the newest periodic one.

    `passed over` holds one line per newer file that could not be read. None when the folder holds no
    checkpoint at all; SocoError naming every file when none of them can be read.
    """
    candidates = [path for path in [Path(folder) / LAST_CHECKPOINT] if path.is_file()]
    candidates += periodic_checkpoints(folder)
    if not candidates:
        return None
    problems = []
    for path in candidates:
        try:
            state = load_checkpoint(path)
        except SocoError as error:
            problems.append(str(error))
            continue
        return path, state, problems
    raise SocoError(f"no checkpoint of {folder} can be read: {'; '.join(problems)}")


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Keep only the newest `keep` periodic checkpoints (step-*.pt); last.pt is never removed."""
    for old in periodic_checkpoints(folder)[max(0, keep):]:
        old.unlink(missing_ok=True)


def checkpoint_report(good: tuple[Path, int] | None, checkpoint_dir: Path) -> str:
    """Which checkpoints a stopped run leaves to resume from, in words."""
    if good is None:
        return "no checkpoint was written yet"
    path, step = good
    others = [p.name for p in periodic_checkpoints(checkpoint_dir) if p != path]
    return (f"the last good checkpoint is {path} (step {step})"
            + (f"; periodic checkpoints: {', '.join(others)}" if others else ""))


def checkpoint_state(method: Method, optimizer, runner, config: Config, step: int, loss: float,
                     total_steps: int, skipped: int, data: dict | None = None) -> dict:
    """Everything a pretraining resume and an export need (format 2); `runner` is the step runner (its grad scaler).

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
    """SocoError for a pretraining checkpoint that no resume can read (format 1)."""
    if "method_state" not in state:
        raise SocoError(f"{path} was written by soco before the Method redesign (format 1): it cannot be resumed, "
                        "but `soco export` still reads it")


def restore_training(state: dict, parts: Mapping[str, Any]) -> None:
    """Load each part (network, optimiser, scheduler) from its checkpoint entry, in order, then the random states."""
    for key, part in parts.items():
        part.load_state_dict(state[key])
    restore_rng_state(state["rng"])


def restore_checkpoint(state: dict, path: Path, method: Method, optimizer) -> dict:
    """Load a pretraining checkpoint of this run (read from `path`) into the method and optimiser; returns it."""
    check_resumable(state, path)
    if state.get("method") != method.name:
        raise SocoError(f"{path} is a {state.get('method')!r} run, this configuration trains {method.name!r}")
    restore_training(state, {"method_state": method, "optimizer": optimizer})
    return state


def compare_settings(recorded: dict, current: dict, resumable: Sequence[str]) -> tuple[list, list]:
    """(refused, changed) of a resume: the settings that differ outside `resumable` (the keys, or sections, each
    caller declares a resume may change), and every setting that differs; each as (key, recorded, current)."""
    return changed_settings(recorded, current, tuple(resumable)), changed_settings(recorded, current)
