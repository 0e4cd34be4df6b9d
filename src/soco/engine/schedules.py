"""Per-iteration learning-rate schedule: linear warm-up then cosine, and the linear scaling rule."""

from __future__ import annotations

import math


def learning_rate_at(
    step: int, total_steps: int, warmup_steps: int, peak_lr: float, final_lr: float, warmup_start_factor: float
) -> float:
    """Learning rate at `step` (0-based): linear from peak*start_factor to peak, then cosine to final."""
    if warmup_steps > 0 and step < warmup_steps:
        fraction = step / warmup_steps
        return peak_lr * (warmup_start_factor + (1.0 - warmup_start_factor) * fraction)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final_lr + (peak_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scaled_learning_rate(base_lr: float, total_batch_size: int) -> float:
    """The linear scaling rule of the paper: lr = base_lr * batch / 256."""
    return base_lr * total_batch_size / 256.0
