"""Atomic checkpoints that load with torch.load(weights_only=True)."""

from __future__ import annotations

from pathlib import Path

import torch

from soco.errors import SocoError
from soco.files import atomic_write

# 1: SoCo-only entries (model, predictor, target). 2: any method (method, method_state, encoder,
# encoder_target, encoder_layout); export still reads format 1.
CHECKPOINT_FORMAT = 2
LAST_CHECKPOINT = "last.pt"


class CheckpointWriteError(SocoError):
    """A checkpoint could not be written (a full disk, a lost mount); the file it would replace is intact."""


def periodic_checkpoint_name(step: int) -> str:
    """The file name of the periodic checkpoint of a step (zero-padded, so that names sort by step)."""
    return f"step-{step:08d}.pt"


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write `state` to a temporary file, sync it, then rename: a kill or a full disk never leaves a torn checkpoint.

    Raises CheckpointWriteError naming the file when the system refuses the write.
    """
    try:
        return atomic_write(path, lambda tmp: torch.save(state, tmp))
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
