"""Shuffle-BN for MoCo-style key encoders, and its one-process substitute.

A key encoder with BatchNorm must not normalise a sample with the statistics of the very batch its
query was normalised with: the network could match query and key through the batch statistics instead
of their content (MoCo, He et al. 2020). Under DDP the key inputs of all processes are gathered,
shuffled by one permutation shared by every process, each process encodes its slice, and the outputs
are gathered and put back in order. On one process there is nothing to shuffle across, so the batch is
permuted and split into `splits` sub-batches that the key encoder sees one at a time (BatchNorm over
split sub-batches, as MoCo's one-GPU demo does).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from soco.errors import ConfigError
from soco.methods.queue import gather_from_all_processes


def _world() -> tuple[int, int]:
    """(rank, world size) of the process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def shuffled_forward(encode: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], splits: int = 2,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """`encode(*inputs)` with BatchNorm statistics from shuffled sub-batches; outputs in the inputs' order.

    Every input and the output have the batch on dim 0. With several processes the sub-batches are the
    processes' slices of the shuffled global batch; alone, `splits` slices of a shuffled batch (each must
    hold at least 2 samples for BatchNorm).
    """
    rank, world = _world()
    batch = inputs[0].shape[0]
    if world > 1:
        gathered = [gather_from_all_processes(tensor) for tensor in inputs]
        order = torch.randperm(batch * world, generator=generator).to(inputs[0].device)
        dist.broadcast(order, src=0)  # every process must use the same permutation
        mine = order[rank * batch:(rank + 1) * batch]
        encoded = encode(*(tensor[mine] for tensor in gathered))
        everything = gather_from_all_processes(encoded)
        restored = torch.empty_like(everything)
        restored[order] = everything
        return restored[rank * batch:(rank + 1) * batch]
    if splits < 1 or batch < 2 * splits:
        raise ConfigError(f"the key encoder's batch of {batch} cannot be split into {splits} sub-batches of at least "
                          "2 for BatchNorm: raise train.batch_size or lower method.key_bn_splits")
    order = torch.randperm(batch, generator=generator).to(inputs[0].device)
    chunks = [encode(*(tensor[part] for tensor in inputs)) for part in torch.tensor_split(order, splits)]
    encoded = torch.cat(chunks)
    restored = torch.empty_like(encoded)
    restored[order] = encoded
    return restored
