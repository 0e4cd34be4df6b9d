"""SCRL: spatially consistent representation learning (Roh et al., CVPR 2021).

BYOL on box pairs instead of whole images: the boxes come from the geometry of two random crops
(`scrl_transform`), each pair covering the same region of the image in both views. What SCRL adds to
the shared plumbing: those views and boxes, a ResNet whose C5 map is pooled 1x1 per box (RoIAlign with
`aligned=False`, as released), projector and predictor (2048-4096-256, no bias on the output layers, as
released), and the symmetric BYOL loss averaged over the box pairs of the batch. Only the backbone is
pretrained; a detector's FPN and heads start from random weights.

Where this differs from the release, on purpose: the target starts as a copy of the online network
(BYOL; the release initialises it from its own random weights), and LARS excludes biases and every
norm parameter by module type (the release's name filter misses the stem, downsample and MLP BatchNorms and
squares the learning rate of the ones it catches).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from soco.config.validation import PROBABILITY, at_least, config_rules, one_of
from soco.data.batch_drawing import draw_views
from soco.declarations import MethodPresets, StudyArm
from soco.methods.base import EncoderLayout, backbone_only_layout
from soco.methods.losses import box_pair_loss
from soco.methods.momentum import MomentumMethod
from soco.methods.scrl_transform import SCRLTransform, SCRLViewsConfig
from soco.models.backbone import C5_STRIDE, RESNET_BUILDERS, ResNetBody, build_resnet
from soco.models.encoder import BoxListEncoder
from soco.models.heads import MLP
from soco.models.roi_pooling import ADAPTIVE_SAMPLING
from soco.registry import register_method


@config_rules(depth=one_of(*sorted(RESNET_BUILDERS)), projector_hidden=at_least(1), projection_dim=at_least(1))
@dataclass
class SCRLModelConfig:
    """SCRL's network: a ResNet trunk, 1x1 RoIAlign on C5, projector and predictor."""

    depth: int = 50
    projector_hidden: int = 4096
    projection_dim: int = 256
    aligned: bool = False  # the release's RoIAlign (torchvision's default); SoCo pools with aligned=True
    zero_init_residual: bool = False  # the release keeps torchvision's default initialisation


@config_rules(name=one_of("scrl"), ema_base=PROBABILITY)
@dataclass
class SCRLConfig:
    """The `method:` section of an SCRL run."""

    name: str = "scrl"
    views: SCRLViewsConfig = field(default_factory=SCRLViewsConfig)
    model: SCRLModelConfig = field(default_factory=SCRLModelConfig)
    ema_base: float = 0.97  # 200-epoch release; 0.996 for 1000 epochs. Cosine schedule to 1


def build_encoder(model: SCRLModelConfig) -> BoxListEncoder:
    """ResNet trunk to C5, 1x1 RoIAlign per box, projector without output bias."""
    backbone = ResNetBody(build_resnet(model.depth, zero_init_residual=model.zero_init_residual), "layer4")
    projector = MLP(backbone.out_channels, model.projector_hidden, model.projection_dim, last_bias=False)
    return BoxListEncoder(backbone, C5_STRIDE, projector, output_size=1, aligned=model.aligned)


def uses_sync_batchnorm(module: nn.Module) -> bool:
    """Whether any BatchNorm of a module is synchronised across processes."""
    return any(isinstance(m, nn.SyncBatchNorm) for m in module.modules())


@register_method
class SCRL(MomentumMethod):
    """Online encoder + predictor on box pairs, and a target encoder that follows by EMA (cosine schedule)."""

    name = "scrl"
    config_class = SCRLConfig
    presets = MethodPresets(tiny="scrl_tiny", small="scrl_small", r50="scrl_r50_200ep")
    study_arms = (StudyArm("scrl", "SCRL: backbone only", order=30),)
    transform_class = SCRLTransform  # two views and the box pairs of their common region (maybe none)

    def __init__(self, config: SCRLConfig):
        super().__init__(config, momentum_base=config.ema_base, momentum_schedule="cosine")
        self.online = build_encoder(config.model)
        dim = config.model.projection_dim
        self.predictor = MLP(dim, config.model.projector_hidden, dim, last_bias=False)
        self.make_target("online", "target")

    def _zero_loss(self) -> torch.Tensor:
        """A zero loss that still reaches every trainable parameter, so DDP finds a gradient for each."""
        return sum(p.reshape(-1)[0] for p in self.parameters() if p.requires_grad) * 0.0

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """{"loss": the symmetric BYOL loss averaged over the batch's box pairs, "box_pairs", "images_with_boxes"}.

        Both views go through each network as one 2B batch (the release's way, so BatchNorm sees both);
        a batch without a single pair gives a zero loss (with plain BatchNorm the networks are skipped:
        it cannot normalise zero boxes; synchronised BatchNorm takes part with zero boxes instead).
        """
        views, boxes = batch["views"], batch["boxes"]
        pairs = boxes["v1"].shape[0]
        metrics = {"box_pairs": torch.tensor(float(pairs)),
                   "images_with_boxes": (batch["boxes_per_image"] > 0).sum().float()}
        if pairs == 0 and not uses_sync_batchnorm(self):
            return {"loss": self._zero_loss(), **metrics}
        images = torch.cat([views["v1"], views["v2"]])
        image_index = torch.cat([batch["box_image"], batch["box_image"] + views["v1"].shape[0]])
        all_boxes = torch.cat([boxes["v1"], boxes["v2"]])
        predictions = self.predictor(self.online(images, all_boxes, image_index))
        with torch.no_grad():
            targets = self.target(images, all_boxes, image_index)
        loss = box_pair_loss((predictions[:pairs], predictions[pairs:]), (targets[:pairs], targets[pairs:]))
        return {"loss": loss, **metrics}



    def encoder_layout(self) -> EncoderLayout:
        """SCRL pretrains the backbone only."""
        pooler = {"output_size": 1, "strides": [C5_STRIDE], "level_thresholds": None,
                  "aligned": self.config.model.aligned, "sampling_ratio": ADAPTIVE_SAMPLING}
        return backbone_only_layout(self.config.model.depth, "projector.", pooler)

    def draw_batch(self, batch: dict, path: Path) -> Path:
        """Both views with their box pairs (pair k in colour k), up to 10 pairs per image."""
        counts = batch["boxes_per_image"].tolist()
        largest = max(counts) if counts else 0
        padded = {}
        for name in ("v1", "v2"):
            rows = torch.split(batch["boxes"][name], counts)
            padded[name] = torch.stack([torch.cat([r, r.new_zeros((largest - len(r), 4))]) for r in rows]) \
                if largest else torch.zeros((len(counts), 0, 4))
        return draw_views(batch["views"], padded, path, batch.get("paths"))
