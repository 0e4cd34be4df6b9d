"""What both training entry points (`pretrain`, `finetune`) set up alike: the folder check, seed, DDP, precision."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from soco.engine.distributed import DistributedContext
from soco.errors import SocoError


def refuse_a_second_run(out: Path, what: str, holds_run: bool, resume: bool) -> None:
    """SocoError when `out` already holds a run (`what` names it and its files) that this call does not resume."""
    if holds_run and not resume:
        raise SocoError(f"{out} already holds {what}: pass --resume to continue it, or choose another --out")


def seed_run(seed: int) -> None:
    """Seed torch's global generator, first: the order of what a run builds after it fixes every random stream."""
    torch.manual_seed(seed)


def data_parallel(model: nn.Module, context: DistributedContext) -> nn.Module:
    """The network that trains: DDP around `model` when several processes train together, else `model` itself."""
    if not context.is_distributed:
        return model
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def precision_line(resolved: str, setting: str | None = None, requested: str | None = None) -> str:
    """The line a run logs on the precision it trains in (`setting`=`requested`: what the configuration asked)."""
    asked = f" ({setting}={requested})" if setting is not None else ""
    return f"precision: {resolved}{asked}"
