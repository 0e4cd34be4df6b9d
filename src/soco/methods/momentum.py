"""Momentum methods: online networks with target copies that follow them by an exponential moving average.

Shared by every method with a target (SoCo, BYOL, SCRL by cosine schedule; MoCo-style InsLoc and DetCo
by a constant momentum), following solo-learn's BaseMomentumMethod.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from soco.methods.base import Method

MOMENTUM_SCHEDULES = ("cosine", "constant")


def ema_momentum_at(step: int, total_steps: int, base_momentum: float) -> float:
    """Target-network momentum at `step`: 1 - (1 - base) * (cos(pi * step / total) + 1) / 2."""
    progress = min(1.0, step / max(1, total_steps))
    return 1.0 - (1.0 - base_momentum) * (math.cos(math.pi * progress) + 1.0) / 2.0


def momentum_at(step: int, total_steps: int, base: float, schedule: str) -> float:
    """The target momentum at `step`: BYOL's cosine from `base` to 1, or `base` throughout."""
    if schedule == "constant":
        return base
    return ema_momentum_at(step, total_steps, base)


class MomentumMethod(Method):
    """A Method whose targets follow their online networks: target = m * target + (1 - m) * online."""

    def __init__(self, config: Any, momentum_base: float, momentum_schedule: str = "cosine"):
        # The base momentum is a key of the method's section, whose rule checked it when it was loaded.
        super().__init__(config)
        if momentum_schedule not in MOMENTUM_SCHEDULES:
            raise ValueError(f"momentum_schedule must be one of {MOMENTUM_SCHEDULES}, not {momentum_schedule!r}")
        self.momentum_base = float(momentum_base)
        self.momentum_schedule = momentum_schedule
        self._pairs: list[tuple[str, str]] = []

    def make_target(self, online_name: str, target_name: str) -> nn.Module:
        """Register `target_name` as a frozen copy of the submodule `online_name` (BYOL starts them equal)."""
        target = copy.deepcopy(getattr(self, online_name))
        for param in target.parameters():
            param.requires_grad_(False)
        setattr(self, target_name, target)
        self._pairs.append((online_name, target_name))
        return target

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, target) module pairs, in registration order."""
        return [(getattr(self, online), getattr(self, target)) for online, target in self._pairs]

    def encoder(self) -> nn.Module:
        """The first registered online network: the detector-aligned encoder that export writes out."""
        return getattr(self, self._pairs[0][0])

    def target_encoder(self) -> nn.Module:
        """The first registered target network."""
        return getattr(self, self._pairs[0][1])

    @torch.no_grad()
    def update_targets(self, momentum: float) -> None:
        """Every target's parameters move towards its online network's by 1 - momentum.

        BN running statistics are not averaged: a target runs in training mode, so they come from its
        own batches, as in BYOL and the SoCo release.
        """
        online_params, target_params = [], []
        for online, target in self.momentum_pairs():
            online_params += list(online.parameters())
            target_params += list(target.parameters())
        torch._foreach_mul_(target_params, momentum)
        torch._foreach_add_(target_params, online_params, alpha=1.0 - momentum)

    def after_optimizer_step(self, step: int, total_steps: int) -> dict[str, float]:
        """The EMA update with this step's momentum; logs it as ema_momentum."""
        momentum = momentum_at(step, total_steps, self.momentum_base, self.momentum_schedule)
        self.update_targets(momentum)
        return {"ema_momentum": momentum}
