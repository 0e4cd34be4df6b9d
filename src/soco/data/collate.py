"""Batching of method samples: nested dicts of equally shaped tensors are stacked along a new batch axis."""

from __future__ import annotations

from typing import Any

import torch


def stack_samples(samples: list[Any]) -> Any:
    """Stack a list of samples with the same structure (dicts, lists, tensors, numbers) into one batch.

    Tensors are stacked into (B, ...); numbers become a tensor of B; strings a list. Samples whose
    tensors differ in shape (a variable number of boxes) need a method's own collate.
    """
    first = samples[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(samples)
    if isinstance(first, dict):
        return {key: stack_samples([sample[key] for sample in samples]) for key in first}
    if isinstance(first, (list, tuple)):
        return [stack_samples(list(items)) for items in zip(*samples)]
    if isinstance(first, (bool, int, float)):
        return torch.tensor(samples)
    return list(samples)


def map_tensors(batch: Any, function) -> Any:
    """The same nested structure (dicts, lists, tuples) with `function` applied to every tensor."""
    if isinstance(batch, torch.Tensor):
        return function(batch)
    if isinstance(batch, dict):
        return {key: map_tensors(value, function) for key, value in batch.items()}
    if isinstance(batch, list):
        return [map_tensors(value, function) for value in batch]
    if isinstance(batch, tuple):
        return tuple(map_tensors(value, function) for value in batch)
    return batch


def move_to_device(batch: Any, device: torch.device) -> Any:
    """The same nested structure with every tensor on `device` (non-blocking from pinned memory)."""
    return map_tensors(batch, lambda tensor: tensor.to(device, non_blocking=True))


def to_channels_last(batch: Any) -> Any:
    """The same nested structure with every 4-D floating tensor (a stack of views) in NHWC memory format."""
    return map_tensors(batch, lambda tensor: tensor.contiguous(memory_format=torch.channels_last)
                       if tensor.ndim == 4 and tensor.is_floating_point() else tensor)
