"""Parameter groups of a method: BYOL's rule (biases and norm parameters neither decayed nor adapted) or MoCo's (all decayed)."""

from __future__ import annotations

from torch import nn


def is_excluded_from_lars(name: str, param: nn.Parameter, norm_parameter_ids: set[int]) -> bool:
    """Biases and normalisation-layer parameters get no weight decay and no trust ratio."""
    return param.ndim <= 1 or name.endswith(".bias") or id(param) in norm_parameter_ids


def lars_param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Two parameter groups: LARS-adapted weights with decay, and excluded biases and norm parameters."""
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    norm_ids = {id(p) for m in module.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
    adapted, excluded = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (excluded if is_excluded_from_lars(name, param, norm_ids) else adapted).append(param)
    return [
        {"params": adapted, "weight_decay": weight_decay, "lars": True},
        {"params": excluded, "weight_decay": 0.0, "lars": False},
    ]


def decay_everything(module: nn.Module, weight_decay: float) -> list[dict]:
    """One group: every trainable parameter decayed, BatchNorm and biases included (MoCo's SGD, as released)."""
    return [{"params": [p for p in module.parameters() if p.requires_grad], "weight_decay": weight_decay,
             "lars": False}]
