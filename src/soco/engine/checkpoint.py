"""Atomic checkpoints that load with torch.load(weights_only=True)."""

from __future__ import annotations

from pathlib import Path

import torch

from soco.errors import SocoError
from soco.files import atomic_write

# 1: SoCo-only entries (model, predictor, target). 2: any method (method, method_state, encoder,
# encoder_target, encoder_layout); export still reads format 1.
CHECKPOINT_FORMAT = 2


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write `state` to a temporary file, sync it, then rename: a kill never leaves a torn checkpoint."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint on the CPU with the safe (weights-only) unpickler."""
    path = Path(path)
    if not path.is_file():
        raise SocoError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise SocoError(f"checkpoint {path} cannot be read: {error}") from None


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Keep only the newest `keep` periodic checkpoints (step-*.pt); last.pt is never removed."""
    periodic = sorted(folder.glob("step-*.pt"))
    for old in periodic[: max(0, len(periodic) - keep)]:
        old.unlink(missing_ok=True)
