"""InsLoc: instance localization (Yang, Wu, Zhou, Lin, CVPR 2021).

A crop of an image is pasted onto two other images (`insloc_transform`); the network must recognise the
pasted instance from its box alone, pooled on every FPN level, against a MoCo queue of other instances.
What InsLoc adds to the shared plumbing: the composites, a ResNet-FPN whose P2-P5 each pool the box
(RoIAlign 7x7, aligned), one head shared by the levels (4 conv with BN, fc 1024, fc 1024, linear 128,
L2-normalised) and run once over the boxes of all levels stacked, as released, so that its BatchNorm
sees 4B boxes; a key encoder by constant-momentum EMA (0.999) run with shuffle-BN, one queue of keys per
level (`queue.KeyQueue`) and InfoNCE at temperature 0.2 per level, summed.

The detector receives the backbone, the FPN and the head's 4 convs and first fc (as a 4conv1fc box
head); the second fc and the 128-d layer are left out.
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
from soco.methods.base import EncoderLayout
from soco.methods.insloc_transform import InsLocTransform, InsLocViewsConfig
from soco.methods.losses import info_nce
from soco.methods.moco import MoCoConfig, MoCoMethod, MoCoModelConfig
from soco.models.backbone import FPN_LEVEL_NAMES, FPN_STRIDES, build_resnet_fpn
from soco.models.heads import build_box_head
from soco.models.roi_pooling import ADAPTIVE_SAMPLING, pool_rois
from soco.registry import register_method

POOLED_SIZE = 7


@config_rules(fpn_channels=at_least(1), head_convs=at_least(0), head_conv_channels=at_least(1), head_fc_dim=at_least(1))
@dataclass
class InsLocModelConfig(MoCoModelConfig):
    """InsLoc's network: ResNet-FPN, RoIAlign of each box on every level, the shared head, the embedding."""

    fpn_channels: int = 256
    head_convs: int = 4
    head_conv_channels: int = 256  # the head's conv width (torchvision's 4conv1fc: 256)
    head_fc_dim: int = 1024


@config_rules(name=one_of("insloc"), level_weights=each(at_least(0.0), length=len(FPN_LEVEL_NAMES)))
@dataclass
class InsLocConfig(MoCoConfig):
    """The `method:` section of an InsLoc run (the MoCo keys: MoCoConfig)."""

    name: str = "insloc"
    views: InsLocViewsConfig = field(default_factory=InsLocViewsConfig)
    model: InsLocModelConfig = field(default_factory=InsLocModelConfig)
    level_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])  # P2..P5


def xavier_init(layer: nn.Module) -> None:
    """Xavier-uniform weights (gain 1) and zero bias, as mmcv's xavier_init of the release."""
    nn.init.xavier_uniform_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class InstanceEncoder(nn.Module):
    """ResNet-FPN, each image's one box pooled on every level, the shared head once over all: (levels, B, D)."""

    def __init__(self, model: InsLocModelConfig):
        super().__init__()
        self.backbone = build_resnet_fpn(model.depth, model.fpn_channels, zero_init_residual=model.zero_init_residual)
        self.box_head = build_box_head(model.fpn_channels, model.head_convs, model.head_fc_dim, POOLED_SIZE,
                                       model.head_conv_channels)
        self.embed = nn.Sequential(OrderedDict(
            fc=nn.Linear(model.head_fc_dim, model.head_fc_dim), relu=nn.ReLU(inplace=True),
            projection=nn.Linear(model.head_fc_dim, model.embedding_dim)))
        # The release's initialisation where torchvision's differs: xavier-uniform FPN convs (mmdet's FPN.init_weights,
        # necks/fpn.py:159-162; torchvision: kaiming-uniform a=1, the same bound only where fan-in = fan-out) and
        # xavier-uniform fcs with zero biases (convfc_bbox_inscls_head.py:97-104; torchvision: PyTorch's default).
        for conv in (m for m in self.backbone.fpn.modules() if isinstance(m, nn.Conv2d)):
            xavier_init(conv)
        for fc in [m for m in self.box_head.modules() if isinstance(m, nn.Linear)] + [self.embed.fc]:
            xavier_init(fc)
        nn.init.normal_(self.embed.projection.weight, std=0.01)
        nn.init.zeros_(self.embed.projection.bias)

    def forward(self, images: torch.Tensor, boxes_per_level: list[torch.Tensor]) -> torch.Tensor:
        """Unit vectors (levels, B, D) of each image's box (B, 4), one box tensor per level (P2..P5)."""
        outputs = self.backbone(images)
        batch = images.shape[0]
        image_index = torch.arange(batch, device=images.device)
        pooled = torch.stack([pool_rois(outputs[name], boxes, image_index, stride, POOLED_SIZE, aligned=True)
                              for name, stride, boxes in zip(FPN_LEVEL_NAMES, FPN_STRIDES, boxes_per_level)], dim=1)
        # One head call over the B x levels rows, box-major (box 0's P2..P5, then box 1's), so the head's
        # BatchNorm normalises the boxes of every level together, as released (MomentumRoIPool._bbox_forward,
        # mmdet/models/roi_heads/moco_standard_roi_head.py:92-101, and InsLocFPN.forward_train's
        # view(batch, levels, -1), mmdet/models/detectors/insloc_fpn.py:292 and 333).
        rows = self.embed(self.box_head(pooled.flatten(0, 1)))
        return F.normalize(rows, dim=-1).view(batch, len(boxes_per_level), -1).transpose(0, 1)


@register_method
class InsLoc(MoCoMethod):
    """Query encoder, key encoder by constant-momentum EMA, one queue per level, InfoNCE per level."""

    name = "insloc"
    config_class = InsLocConfig
    presets = MethodPresets(tiny="insloc_tiny", small="insloc_small", r50="insloc_r50_fpn_200ep")
    # cpu budget: a queue shorter than an epoch of its ~300 pretraining images (the presets' 4,096 would hold each
    # image about 14 times, stale copies of a query's own image among its negatives)
    study_arms = (StudyArm("insloc", "InsLoc: backbone, FPN and box head", pretrains_fpn_and_head=True, order=40,
                           budget_overrides={"cpu": ("method.queue_size=256",)}),)
    transform_class = InsLocTransform  # query and key composites with their pasted boxes

    def __init__(self, config: InsLocConfig):
        super().__init__(config, InstanceEncoder(config.model), queues=len(FPN_LEVEL_NAMES))

    def target_keys(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """The key encoder's (levels, B, D) vectors: each key image's one box pooled on every level."""
        return self.target(images, [boxes] * len(FPN_LEVEL_NAMES))

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """{"loss": the weighted sum over levels of InfoNCE, "loss_p2".."loss_p5"}; then the keys are queued."""
        query_boxes = [batch["query_box"]] * 3 + [batch["query_box_p5"]]
        queries = self.online(batch["query"], query_boxes)
        keys = self.shuffled_keys(batch["key"], batch["key_box"])
        losses = {}
        total = queries.new_zeros((), dtype=torch.float32)
        for level, weight in enumerate(self.config.level_weights):
            losses[f"loss_p{level + 2}"] = info_nce(queries[level], keys[level], self.queue.negatives(level),
                                                    self.config.temperature)
            total = total + weight * losses[f"loss_p{level + 2}"]
        self.queue.enqueue(keys)
        return {"loss": total, **{name: value.detach() for name, value in losses.items()}}


    def encoder_layout(self) -> EncoderLayout:
        """Backbone, FPN and the 4conv1fc part of the head; the second fc and the 128-d layer stay behind."""
        return EncoderLayout(
            kind="fpn",
            parts=("backbone", "fpn", "box_head"),
            depth=self.config.model.depth,
            prefixes={"backbone": "backbone.body.", "fpn": "backbone.fpn.", "box_head": "box_head.",
                      "projector": "embed."},
            pooler={"output_size": POOLED_SIZE, "strides": list(FPN_STRIDES), "level_thresholds": None,
                    "every_level": True, "aligned": True, "sampling_ratio": ADAPTIVE_SAMPLING},
        )

    def draw_batch(self, batch: dict, path: Path) -> Path:
        """Query and key composites with their boxes (the query's P5 box second)."""
        boxes = {"query": torch.stack([batch["query_box"], batch["query_box_p5"]], dim=1),
                 "key": batch["key_box"][:, None]}
        return draw_views({"query": batch["query"], "key": batch["key"]}, boxes, path, batch.get("paths"))
