"""SoCo: object-level BYOL between views, with an EMA target network (Wei et al., NeurIPS 2021)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from soco.config.schema import ModelConfig, ViewsConfig
from soco.methods.losses import symmetric_pair_loss
from soco.models.encoder import ObjectEncoder
from soco.models.heads import MLP


def view_pairs(model_config: ModelConfig, views_config: ViewsConfig) -> list[tuple[str, str]]:
    """The view pairs contrasted: (V1,V2), (V1,V3) and SoCo*'s (V1,V4); C4 keeps (V1,V2) only."""
    pairs = [("v1", "v2")]
    if model_config.variant == "c4":
        return pairs
    if views_config.use_v3:
        pairs.append(("v1", "v3"))
    if views_config.use_v4:
        pairs.append(("v1", "v4"))
    return pairs


class SoCo(nn.Module):
    """Online encoder + predictor, and a target encoder that follows the online one by EMA."""

    def __init__(self, model_config: ModelConfig, views_config: ViewsConfig):
        super().__init__()
        self.online = ObjectEncoder(model_config)
        self.predictor = MLP(model_config.projection_dim, model_config.projector_hidden, model_config.projection_dim)
        self.target = copy.deepcopy(self.online)
        for param in self.target.parameters():
            param.requires_grad_(False)
        self.pairs = view_pairs(model_config, views_config)

    def views_used(self) -> list[str]:
        """Names of the views this method reads from a batch."""
        return sorted({name for pair in self.pairs for name in pair})

    def forward(self, views: dict[str, torch.Tensor], boxes: dict[str, torch.Tensor]) -> torch.Tensor:
        """The symmetrised SoCo loss of one batch: views (B,3,S,S) and boxes (B,K,4) per view name."""
        predictions, targets = {}, {}
        for name in self.views_used():
            predictions[name] = self.predictor(self.online(views[name], boxes[name]))
            with torch.no_grad():
                targets[name] = self.target(views[name], boxes[name])
        return symmetric_pair_loss(predictions, targets, self.pairs)

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """target = momentum * target + (1 - momentum) * online, over parameters.

        BN running statistics are not averaged: the target runs in training mode, so they come from its
        own batches, as in BYOL and the SoCo release.
        """
        online_params = list(self.online.parameters())
        target_params = list(self.target.parameters())
        torch._foreach_mul_(target_params, momentum)
        torch._foreach_add_(target_params, online_params, alpha=1.0 - momentum)
