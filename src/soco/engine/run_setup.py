"""What both training entry points (`pretrain`, `finetune`) set up alike: the folder's lock and check, seed, DDP,
precision."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from torch import nn

from soco.engine.distributed import DistributedContext, all_reduce_sum
from soco.errors import SocoError
from soco.files import folder_lock
from soco.run_folder import check_run_folder


@contextmanager
def run_folder_lock(out: Path, kind: str, command: str, context: DistributedContext) -> Iterator[None]:
    """Check `out` is a `kind` run's folder, hold its lock for the run and check again; SocoError otherwise.

    One soco process writes a folder at a time. The first check comes before the lock, so a folder that is not a
    run's gets no lock file; the second after it, since only then can no other soco process change the folder.
    The processes of one torchrun share the folder: the main one takes the lock (the kernel drops it when that
    process dies, SIGKILL included), and every process learns whether it could, so all of them stop together.
    """
    check_run_folder(out, kind)
    with ExitStack() as held:
        refusal = None
        if context.is_main:
            try:
                held.enter_context(folder_lock(out, command, advice="wait for it to end, or choose another --out"))
            except SocoError as error:
                refusal = error
        if context.is_distributed:
            refused = all_reduce_sum(torch.tensor(float(refusal is not None), device=context.device), context)
            if refusal is None and refused.item() > 0:
                refusal = SocoError(f"{out} is in use by another soco process: the main process could not lock it")
        if refusal is not None:
            raise refusal
        check_run_folder(out, kind)
        yield


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
