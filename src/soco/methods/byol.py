"""BYOL: bootstrap your own latent, as DeepMind released it (Grill et al., NeurIPS 2020; deepmind-research/byol).

The image-level method the detection methods are compared against: two random resized crops of each image
(`byol_transform`), a ResNet whose C5 map is averaged over space (utils/networks.py:150), a projector and a
predictor (Linear with bias, BatchNorm, ReLU, Linear without bias: networks.py:40-45; 4096 hidden, 256 out:
configs/byol.py:40-42), the BYOL regression 2 - 2 cos of each view's prediction against the other view's target
projection, summed over both directions and averaged over the batch (byol_experiment.py:243-250,
utils/helpers.py:109-112), and a target network that follows the online one by an EMA whose momentum rises from
`ema_base` to 1 by a cosine over the run (utils/schedules.py:20-24, byol_experiment.py:338-343). The optimiser is
the preset's `optim:` section (LARS: configs/byol.py:57-65, utils/optimizers.py, utils/schedules.py:27-43).
Only the backbone transfers to a detector.

This is not SoCo's `byol_image` study arm, which is SoCo's Table 4 row 1: image-level BYOL inside SoCo's own
settings (V1 the whole image, V2 a crop of area 0.5-1, SoCo's learning rate and weight decay; presets
`byol_image_*`).

Where this differs from the release, on purpose or because it cannot be done here:
- the target starts as a copy of the online network (the original paper's initialisation); the release
  initialises it from its own random draw (byol_experiment.py:368-385, whose comment found no difference);
- each view goes through the networks as its own batch, as the release does (byol_experiment.py:183-184), so
  BatchNorm normalises each view apart; the target runs in training mode too (byol_experiment.py:232-236);
- the release trains a linear classifier on the stopped-gradient embedding with ImageNet's labels to monitor
  training (byol_experiment.py:163-164, 256-276); the images here have no labels, so there is none;
- torchvision's ResNet and its initialisation (Kaiming normal convolutions) stand for Haiku's (truncated-normal
  fan-in; 'SAME' padding); each block's last BatchNorm starts at zero, as the release's code does through Haiku's
  BlockV1 (README.md:101-111: the paper's runs kept gamma = 1; `model.zero_init_residual=false`).
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
from soco.methods.byol_transform import VIEWS, BYOLTransform, BYOLViewsConfig
from soco.methods.losses import box_pair_loss
from soco.methods.momentum import MomentumMethod
from soco.models.backbone import RESNET_BUILDERS, ResNetBody, build_resnet
from soco.models.heads import MLP
from soco.registry import register_method


@config_rules(depth=one_of(*sorted(RESNET_BUILDERS)), projector_hidden=at_least(1), projection_dim=at_least(1),
              predictor_hidden=at_least(1))
@dataclass
class BYOLModelConfig:
    """BYOL's networks: a ResNet pooled globally, projector and predictor MLPs (configs/byol.py:39-46)."""

    depth: int = 50  # configs/byol.py:43: ResNet50 (resnet_v2=False, width 1: 45-46)
    projector_hidden: int = 4096  # configs/byol.py:40
    projection_dim: int = 256  # configs/byol.py:41: projector_output_size, the predictor's output too
    predictor_hidden: int = 4096  # configs/byol.py:42
    output_bias: bool = False  # networks.py:44: the MLPs' last Linear has no bias (the first has: 41)
    zero_init_residual: bool = True  # the release's Haiku BlockV1 zeroes each block's last BN gamma (README.md:101-111)


@config_rules(name=one_of("byol"), ema_base=PROBABILITY)
@dataclass
class BYOLConfig:
    """The `method:` section of a BYOL run."""

    name: str = "byol"
    views: BYOLViewsConfig = field(default_factory=BYOLViewsConfig)
    model: BYOLModelConfig = field(default_factory=BYOLModelConfig)
    ema_base: float = 0.99  # configs/byol.py:23, 38: 0.99 for 100 and 300 epochs (0.97 for 40, 0.996 for 1000)


class GlobalImageEncoder(nn.Module):
    """ResNet trunk to C5, global average pooling, projector: images (B, 3, S, S) -> (B, projection_dim).

    The state dict reads backbone.body.* (the ResNet, as every backbone-only method's) and projector.*.
    """

    def __init__(self, model: BYOLModelConfig):
        super().__init__()
        self.backbone = ResNetBody(build_resnet(model.depth, zero_init_residual=model.zero_init_residual), "layer4")
        self.projector = MLP(self.backbone.out_channels, model.projector_hidden, model.projection_dim,
                             last_bias=model.output_bias)

    def representations(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C5 channels): the mean of C5 over space (networks.py:150)."""
        return self.backbone(images)["0"].mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, projection_dim) projections."""
        return self.projector(self.representations(images))


@register_method
class BYOL(MomentumMethod):
    """Online encoder + predictor, and a target encoder that follows by EMA (cosine schedule from `ema_base`)."""

    name = "byol"
    config_class = BYOLConfig
    presets = MethodPresets(tiny="byol_tiny", small="byol_small", r50="byol_r50_100ep")
    # right after SoCo's byol_image (order 10): the image-level arms first, then the object-level ones
    study_arms = (StudyArm("byol", "BYOL as DeepMind released it: backbone only (global pooling of two random crops)",
                           order=15),)
    transform_class = BYOLTransform  # two random resized crops, asymmetric colour

    def __init__(self, config: BYOLConfig):
        super().__init__(config, momentum_base=config.ema_base, momentum_schedule="cosine")
        self.online = GlobalImageEncoder(config.model)
        dim = config.model.projection_dim
        self.predictor = MLP(dim, config.model.predictor_hidden, dim, last_bias=config.model.output_bias)
        self.make_target("online", "target")

    @classmethod
    def smallest_batch_size(cls, config: BYOLConfig, world_size: int = 1) -> tuple[int, str]:
        """Two images: the projector's and predictor's BatchNorm1d normalise over the images of a view."""
        return 2, ("BatchNorm in BYOL's backbone, projector and predictor normalises over the images of each "
                   "process's micro-batch and needs two")

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """{"loss": mean over images of l(q1, z2) + l(q2, z1), l = 2 - 2 cos} (byol_experiment.py:243-250)."""
        views = batch["views"]
        predictions, targets = {}, {}
        for name in VIEWS:  # one batch per view, as the release (byol_experiment.py:183-184)
            predictions[name] = self.predictor(self.online(views[name]))
            with torch.no_grad():
                targets[name] = self.target(views[name])
        first, second = VIEWS
        loss = box_pair_loss((predictions[first], predictions[second]), (targets[first], targets[second]))
        return {"loss": loss}

    def encoder_layout(self) -> EncoderLayout:
        """BYOL pretrains the backbone only (C5, pooled globally)."""
        return backbone_only_layout(self.config.model.depth, "projector.")

    def draw_batch(self, batch: dict, path: Path) -> Path:
        """Both views of the batch's first images."""
        return draw_views(dict(batch["views"]), None, path, batch.get("paths"))
