"""ObjectEncoder: images and their object boxes -> one vector per box, the online or target network of SoCo."""

from __future__ import annotations

import torch
from torch import nn

from soco.config.schema import ModelConfig
from soco.errors import ConfigError
from soco.models.backbone import (
    FPN_STRIDES,
    ResNetBody,
    build_resnet,
    build_resnet_fpn,
    c4_channels,
    c5_channels,
    fpn_levels,
)
from soco.models.heads import MLP, C4Head, GlobalAveragePool, build_box_head
from soco.models.roi_pooling import assign_levels, pool_boxes_all_levels, pool_boxes_per_level, pool_boxes_single_level

VARIANTS = ("fpn", "c4")
FPN_POOLED_SIZE = 7
C4_POOLED_SIZE = 14  # res5 halves it to 7x7, as in Detectron2's C4 RoI head


def validate_model_config(config: ModelConfig) -> None:
    """Raise ConfigError for model settings the encoder cannot build."""
    if config.variant not in VARIANTS:
        raise ConfigError(f"model.variant: {config.variant!r} is not one of {list(VARIANTS)}")
    if not 2 <= config.fixed_level <= 5:
        raise ConfigError(f"model.fixed_level: {config.fixed_level} is not a pyramid level 2..5")
    thresholds = list(config.level_thresholds)
    if len(thresholds) != len(FPN_STRIDES) - 1 or any(b <= a for a, b in zip(thresholds, thresholds[1:])):
        raise ConfigError(f"model.level_thresholds: need 3 increasing values, got {thresholds}")
    for key in ("fpn_channels", "head_fc_dim", "projector_hidden", "projection_dim"):
        if getattr(config, key) <= 0:
            raise ConfigError(f"model.{key}: must be positive, got {getattr(config, key)}")
    if config.head_convs < 0:
        raise ConfigError(f"model.head_convs: must be >= 0, got {config.head_convs}")


class ObjectEncoder(nn.Module):
    """Backbone, RoIAlign, box head and projector: (images B x 3 x H x W, boxes B x K x 4) -> (B*K, projection_dim).

    Boxes are (x1, y1, x2, y2) in the pixels of the images given; outputs are image-major (box k of image b
    is row b*K + k). Variant "c4" has no pyramid, so `fpn`, `scale_aware`, `fixed_level`,
    `level_thresholds` and `pool_all_levels` do not apply to it; neither do the last four with `fpn` off.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        validate_model_config(config)
        self.variant = config.variant
        self.uses_fpn = config.variant == "fpn" and config.fpn
        self.scale_aware = config.scale_aware
        self.fixed_level_index = config.fixed_level - 2  # P2 is index 0
        self.level_thresholds = tuple(float(t) for t in config.level_thresholds)
        self.pool_all_levels = config.pool_all_levels

        if self.uses_fpn:
            self.backbone = build_resnet_fpn(config.depth, config.fpn_channels)
            self.strides: tuple[int, ...] = FPN_STRIDES
            self.pooled_size = FPN_POOLED_SIZE
            pooled_channels = config.fpn_channels
        elif config.variant == "fpn":  # FPN off: boxes pooled on C5
            self.backbone = ResNetBody(build_resnet(config.depth), "layer4")
            self.strides = (self.backbone.stride,)
            self.pooled_size = FPN_POOLED_SIZE
            pooled_channels = self.backbone.out_channels
        else:  # C4: the trunk up to layer3; layer4 becomes the head
            network = build_resnet(config.depth)
            self.backbone = ResNetBody(network, "layer3")
            self.strides = (self.backbone.stride,)
            self.pooled_size = C4_POOLED_SIZE
            pooled_channels = c4_channels(network)

        if not config.head:
            self.box_head: nn.Module = GlobalAveragePool()
            self.representation_dim = pooled_channels
        elif config.variant == "c4":
            self.box_head = C4Head(network.layer4)
            self.representation_dim = c5_channels(network)
        else:
            self.box_head = build_box_head(pooled_channels, config.head_convs, config.head_fc_dim, self.pooled_size)
            self.representation_dim = config.head_fc_dim

        self.projector = MLP(self.representation_dim, config.projector_hidden, config.projection_dim)
        self.projection_dim = config.projection_dim

    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The maps boxes are pooled on: P2..P5 with the FPN, else the single C4 or C5 map."""
        if self.uses_fpn:
            return fpn_levels(self.backbone, images)
        return [self.backbone(images)["0"]]

    def box_levels(self, boxes: torch.Tensor) -> torch.Tensor:
        """(B*K,) pyramid level index (0 = P2) each box is pooled on."""
        flat_boxes = boxes.reshape(-1, 4)
        if self.scale_aware:
            return assign_levels(flat_boxes, self.level_thresholds)
        return torch.full((flat_boxes.shape[0],), self.fixed_level_index, dtype=torch.long, device=boxes.device)

    def representations(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """(B*K, representation_dim) object features before the projector: what the detector's box head computes."""
        if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != images.shape[0]:
            raise ValueError(f"boxes must be (B, K, 4) for {images.shape[0]} images, got {tuple(boxes.shape)}")
        features = self.feature_maps(images)
        if not self.uses_fpn:
            pooled = pool_boxes_single_level(features[0], boxes, self.strides[0], self.pooled_size)
            return self.box_head(pooled)
        levels = self.box_levels(boxes)
        if not self.pool_all_levels:
            # One head call over all boxes of the view, each pooled on its own level: a detector's box head.
            pooled = pool_boxes_per_level(features, boxes, self.strides, self.pooled_size, levels=levels)
            return self.box_head(pooled)
        # The release's way: one head call per level over every box, then each box keeps its own level's output.
        # The pooled features and the weights are the same, so in eval mode the result equals the per-level
        # path. In training mode the head's BatchNorm normalises each call with that call's batch statistics:
        # here over all B*K boxes pooled at one level (three quarters of them at a level they do not belong
        # to), there over the B*K boxes each at its own level. The outputs, and the running statistics the
        # detector inherits, therefore differ slightly between the two ways.
        pooled_all, _ = pool_boxes_all_levels(features, boxes, self.strides, self.pooled_size, levels=levels)
        per_level = torch.stack([self.box_head(pooled_level) for pooled_level in pooled_all])
        return per_level[levels, torch.arange(levels.numel(), device=levels.device)]

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """(B*K, projection_dim) projected object vectors."""
        return self.projector(self.representations(images, boxes))
