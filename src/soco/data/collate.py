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


def move_to_device(batch: Any, device: torch.device) -> Any:
    """The same nested structure with every tensor on `device` (non-blocking from pinned memory)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: move_to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, list):
        return [move_to_device(value, device) for value in batch]
    if isinstance(batch, tuple):
        return tuple(move_to_device(value, device) for value in batch)
    return batch


def to_channels_last(batch: Any) -> Any:
    """The same nested structure with every 4-D floating tensor (a stack of views) in NHWC memory format."""
    if isinstance(batch, torch.Tensor):
        if batch.ndim == 4 and batch.is_floating_point():
            return batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, dict):
        return {key: to_channels_last(value) for key, value in batch.items()}
    if isinstance(batch, list):
        return [to_channels_last(value) for value in batch]
    if isinstance(batch, tuple):
        return tuple(to_channels_last(value) for value in batch)
    return batch
