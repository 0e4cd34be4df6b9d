"""Process-group set-up for torchrun: NCCL on GPUs, gloo on CPUs; a no-op for a single process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistributedContext:
    """Who this process is among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, checkpoints and pictures."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1


def resolve_device(requested: str, setting: str = "train.device") -> torch.device:
    """'auto' picks CUDA when available; asking for CUDA on a machine without it is an error."""
    from soco.errors import ConfigError

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting}=cuda but no CUDA device is available; use {setting}=cpu or auto")
    if requested not in ("cpu", "cuda"):
        raise ConfigError(f"{setting} must be auto, cpu or cuda, not {requested!r}")
    return torch.device(requested)


def init_distributed(requested_device: str, setting: str = "train.device") -> DistributedContext:
    """Join the torchrun process group if launched by torchrun (WORLD_SIZE > 1), else run alone."""
    device = resolve_device(requested_device, setting)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return DistributedContext(device=device)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def all_reduce_mean(value: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Mean of a tensor over all processes (identity for one process)."""
    if not context.is_distributed:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / context.world_size


def all_reduce_sum(value: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Sum of a tensor over all processes (identity for one process)."""
    if not context.is_distributed:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def shutdown_distributed() -> None:
    """Leave the process group, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
