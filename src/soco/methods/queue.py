"""MoCo's queue of negative keys: one ring buffer of unit vectors per feature level, sharing one write pointer.

Shared by the MoCo-style methods (InsLoc: one queue per FPN level; DetCo: global and local queues per
ResNet stage). Under DDP every process writes the keys of all processes, gathered in rank order, so the
queues stay identical everywhere. The queues and the pointer are buffers: a checkpoint holds them and a
resume continues with the same negatives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def gather_from_all_processes(tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The tensors of every process concatenated along `dim` in rank order (no gradient); itself alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=dim)


class KeyQueue(nn.Module):
    """`levels` queues of `size` unit `dim`-vectors (random at the start), written in turn at one pointer."""

    def __init__(self, levels: int, dim: int, size: int, seed: int = 0):
        super().__init__()
        if min(levels, dim, size) < 1:
            raise ValueError(f"a queue needs levels, dim and size >= 1, got {levels}, {dim}, {size}")
        generator = torch.Generator().manual_seed(seed)
        start = F.normalize(torch.randn(levels, size, dim, generator=generator), dim=-1)
        self.register_buffer("keys", start)
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        """Entries per queue."""
        return self.keys.shape[1]

    def negatives(self, level: int) -> torch.Tensor:
        """(size, dim) a copy of one level's keys as they are now: the write after the loss must not touch
        what the backward pass reads."""
        return self.keys[level].clone()

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write (levels, B, dim) keys of this process, after those of every process before it, at the pointer.

        The write wraps around the end, so the queue size need not be a multiple of the batch; a batch
        larger than the queue keeps its last `size` keys.
        """
        if keys.ndim != 3 or keys.shape[0] != self.keys.shape[0] or keys.shape[2] != self.keys.shape[2]:
            raise ValueError(f"keys must be (levels={self.keys.shape[0]}, B, dim={self.keys.shape[2]}), "
                             f"got {tuple(keys.shape)}")
        keys = gather_from_all_processes(keys.detach().to(self.keys.dtype), dim=1)[:, -self.size:]
        count = keys.shape[1]
        rows = (self.pointer + torch.arange(count, device=self.keys.device)) % self.size
        self.keys[:, rows] = keys
        self.pointer.copy_((self.pointer + count) % self.size)
