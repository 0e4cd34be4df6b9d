"""The optimiser a run declares (`optim.name`): LARS (BYOL, SoCo, SCRL) or SGD with momentum (MoCo family)."""

from __future__ import annotations

import torch

from soco.config.schema import OptimConfig
from soco.engine.lars import LARS
from soco.errors import ConfigError

OPTIMIZERS = ("lars", "sgd")


def build_optimizer(optim: OptimConfig, parameter_groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """The optimiser over a method's parameter groups (each group's own weight decay is kept)."""
    if optim.name == "lars":
        if optim.nesterov:
            raise ConfigError("optim.nesterov applies to optim.name=sgd only")
        return LARS(parameter_groups, lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                    trust_coefficient=optim.trust_coefficient, denominator=optim.lars_denominator, eps=optim.lars_eps)
    if optim.name == "sgd":
        return torch.optim.SGD(parameter_groups, lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                               nesterov=optim.nesterov)
    raise ConfigError(f"optim.name must be one of {', '.join(OPTIMIZERS)}, not {optim.name!r}")
