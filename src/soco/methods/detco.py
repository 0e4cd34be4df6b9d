"""DetCo: contrastive learning at every ResNet stage between global views and local patch sets (Xie et al., ICCV 2021).

The authors never released the pretraining code, so this is the only public implementation that runs;
docs/methods.md lists every guess. What DetCo adds to the shared plumbing: its views (`detco_transform`),
a ResNet whose four stages res2-res5 each feed a global head (global average pool, MLP C-C-128) and a
local head (the nine patches' pooled features concatenated, MLP 9C-C-128), a key encoder by
constant-momentum EMA (0.999) run with shuffle-BN, a global and a local queue per stage (`queue.KeyQueue`,
levels 0-3 global, 4-7 local, one pointer), and three InfoNCE terms per stage at temperature 0.2:
global-to-global, local-to-local and local-to-global, weighted by stage (0.1, 0.4, 0.7, 1.0, the
reading of the paper). Only the backbone transfers to a detector.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from soco.config.validation import at_least, config_rules, each, one_of
from soco.data.batch_drawing import draw_views
from soco.declarations import MethodPresets, StudyArm
from soco.methods.base import EncoderLayout, backbone_only_layout
from soco.methods.detco_transform import GRID, DetCoTransform, DetCoViewsConfig
from soco.methods.losses import info_nce
from soco.methods.moco import MoCoConfig, MoCoMethod, MoCoModelConfig
from soco.models.backbone import ResNetStages, build_resnet
from soco.registry import register_method

STAGES = ("res2", "res3", "res4", "res5")
PATCHES = GRID * GRID


@config_rules(name=one_of("detco"), stage_weights=each(at_least(0.0), length=len(STAGES)))
@dataclass
class DetCoConfig(MoCoConfig):
    """The `method:` section of a DetCo run (the MoCo keys: MoCoConfig; the model's: MoCoModelConfig)."""

    name: str = "detco"
    views: DetCoViewsConfig = field(default_factory=DetCoViewsConfig)
    # a ResNet with a global and a local MLP head per stage: nothing beyond the MoCo model keys
    model: MoCoModelConfig = field(default_factory=MoCoModelConfig)
    stage_weights: list[float] = field(default_factory=lambda: [0.1, 0.4, 0.7, 1.0])  # res2..res5


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """MoCo v2's head: Linear, ReLU, Linear (no BatchNorm)."""
    return nn.Sequential(OrderedDict(fc1=nn.Linear(in_dim, hidden_dim), relu=nn.ReLU(inplace=True),
                                     fc2=nn.Linear(hidden_dim, out_dim)))


class MultiLevelEncoder(nn.Module):
    """ResNet stages with a global and a local head each: unit vectors of global views and of patch sets."""

    def __init__(self, model: MoCoModelConfig):
        super().__init__()
        self.backbone = ResNetStages(build_resnet(model.depth, zero_init_residual=model.zero_init_residual))
        channels = self.backbone.out_channels
        self.global_heads = nn.ModuleList(mlp(c, c, model.embedding_dim) for c in channels)
        self.local_heads = nn.ModuleList(mlp(PATCHES * c, c, model.embedding_dim) for c in channels)

    def pooled_stages(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Global average pools (N, C) of res2..res5."""
        return [feature.mean(dim=(2, 3)) for feature in self.backbone(images).values()]

    def global_vectors(self, views: torch.Tensor) -> torch.Tensor:
        """(stages, B, D) of global views (B, 3, G, G)."""
        pooled = self.pooled_stages(views)
        return torch.stack([F.normalize(head(p), dim=-1) for head, p in zip(self.global_heads, pooled)])

    def local_vectors(self, patch_sets: torch.Tensor) -> torch.Tensor:
        """(stages, B, D) of patch sets (B, 9, 3, P, P): each patch through the trunk on its own, then concatenated."""
        batch = patch_sets.shape[0]
        pooled = self.pooled_stages(patch_sets.flatten(0, 1))
        return torch.stack([F.normalize(head(p.reshape(batch, -1)), dim=-1) for head, p in zip(self.local_heads, pooled)])

    def forward(self, views: torch.Tensor, patch_sets: torch.Tensor) -> torch.Tensor:
        """(2 x stages, B, D): the global vectors of every stage, then the local ones."""
        return torch.cat([self.global_vectors(views), self.local_vectors(patch_sets)])


def detco_losses(queries: torch.Tensor, keys: torch.Tensor, queue_keys: torch.Tensor, weights: list[float],
                 temperature: float) -> dict[str, torch.Tensor]:
    """DetCo's loss from (2S, B, D) query and key vectors (S global levels, then S local) and the 2S queues.

    Per stage s: g2g = InfoNCE(q_global, k_global, global queue), l2l = InfoNCE(q_local, k_local, local
    queue), l2g = InfoNCE(q_local, k_global, global queue); loss = sum_s w_s (g2g + l2l + l2g). Returns the
    loss and each term summed over the stages without weights.
    """
    stages = len(weights)
    terms = {"loss_g2g": 0.0, "loss_l2l": 0.0, "loss_l2g": 0.0}
    total = queries.new_zeros((), dtype=torch.float32)
    for stage, weight in enumerate(weights):
        glob, local = stage, stages + stage
        g2g = info_nce(queries[glob], keys[glob], queue_keys[glob], temperature)
        l2l = info_nce(queries[local], keys[local], queue_keys[local], temperature)
        l2g = info_nce(queries[local], keys[glob], queue_keys[glob], temperature)
        total = total + weight * (g2g + l2l + l2g)
        terms["loss_g2g"] = terms["loss_g2g"] + g2g.detach()
        terms["loss_l2l"] = terms["loss_l2l"] + l2l.detach()
        terms["loss_l2g"] = terms["loss_l2g"] + l2g.detach()
    return {"loss": total, **terms}


@register_method
class DetCo(MoCoMethod):
    """Query encoder, key encoder by constant-momentum EMA, eight queues, three contrasts per stage."""

    name = "detco"
    config_class = DetCoConfig
    presets = MethodPresets(tiny="detco_tiny", small="detco_small", r50="detco_r50_200ep")
    # cpu budget: queues shorter than an epoch of its ~300 pretraining images, as InsLoc's
    study_arms = (StudyArm("detco", "DetCo: backbone only", order=50,
                           budget_overrides={"cpu": ("method.queue_size=256",)}),)
    transform_class = DetCoTransform  # two global views and two local patch sets

    def __init__(self, config: DetCoConfig):
        super().__init__(config, MultiLevelEncoder(config.model), queues=2 * len(STAGES))

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """{"loss", "loss_g2g", "loss_l2l", "loss_l2g"}; then the keys are queued."""
        queries = self.online(batch["global_q"], batch["local_q"])
        keys = self.shuffled_keys(batch["global_k"], batch["local_k"])
        negatives = torch.stack([self.queue.negatives(level) for level in range(2 * len(STAGES))])
        outputs = detco_losses(queries, keys, negatives, list(self.config.stage_weights), self.config.temperature)
        self.queue.enqueue(keys)
        return outputs


    def encoder_layout(self) -> EncoderLayout:
        """DetCo pretrains the backbone only."""
        return backbone_only_layout(self.config.model.depth, "global_heads.")

    def draw_batch(self, batch: dict, path: Path) -> Path:
        """The global views and the first three patches of each local set."""
        views = {"global q": batch["global_q"], "global k": batch["global_k"]}
        for number in range(3):
            views[f"patch q{number}"] = batch["local_q"][:, number]
        return draw_views(views, None, path, batch.get("paths"))
