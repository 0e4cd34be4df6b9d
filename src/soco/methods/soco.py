"""SoCo: object-level BYOL between views, with an EMA target network (Wei et al., NeurIPS 2021).

What SoCo adds to the shared plumbing: its views (V1-V4 with proposal boxes, `soco_transform`), a
detector-aligned encoder (ResNet + FPN + scale-aware RoIAlign + 4conv1fc head, or C4 with res5), a
predictor, and the BYOL loss summed over the view pairs. The image-level BYOL baseline of the paper's
Table 4 (row 1, the `byol_image` arm) and every other row are this method with parts turned off (presets
`byol_image_*`, `table4_*`); BYOL as DeepMind released it is its own method, `byol` (methods/byol.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from soco.config.validation import POSITIVE, PROBABILITY, at_least, between, config_rules, each, one_of
from soco.data.batch_drawing import draw_views
from soco.declarations import MethodPresets, StudyArm
from soco.errors import ConfigError
from soco.methods.base import EncoderLayout
from soco.methods.losses import symmetric_pair_loss
from soco.methods.momentum import MomentumMethod
from soco.methods.soco_transform import SoCoTransform, SoCoViewsConfig, pair_box_sets
from soco.models.backbone import FPN_LEVEL_NAMES, FPN_STRIDES, RESNET_BUILDERS, ResNetBody, build_resnet
from soco.models.backbone import build_resnet_fpn, c4_channels, c5_channels
from soco.models.encoder import ObjectEncoder
from soco.models.heads import MLP, C4Head, GlobalAveragePool, build_box_head
from soco.models.roi_pooling import ADAPTIVE_SAMPLING, BoxPooler
from soco.registry import register_method

VARIANTS = ("fpn", "c4")
INITS = ("release", "torchvision")
FPN_POOLED_SIZE = 7
C4_POOLED_SIZE = 14  # res5 halves it to 7x7, as in Detectron2's C4 RoI head
# The paper's level thresholds (sqrt box area, pixels) for 224-pixel views: <= 48 P2, <= 96 P3, <= 192 P4.
PAPER_THRESHOLDS = (48.0, 96.0, 192.0)
PAPER_VIEW_SIZE = 224


@config_rules(
    variant=one_of(*VARIANTS), depth=one_of(*sorted(RESNET_BUILDERS)), level_thresholds=each(POSITIVE),
    fixed_level=between(2, 5), fpn_channels=at_least(1), head_convs=at_least(0), head_conv_channels=at_least(1),
    head_fc_dim=at_least(1), projector_hidden=at_least(1), projection_dim=at_least(1), init=one_of(*INITS),
)
@dataclass
class SoCoModelConfig:
    """SoCo's detector-aligned network: backbone, neck, RoI head, projector and predictor."""

    variant: str = "fpn"  # "fpn" (R50-FPN, 4conv1fc head) or "c4" (RoIAlign on C4, res5 head)
    depth: int = 50  # ResNet depth: 18, 34, 50, 101, 152
    fpn: bool = True  # Table 4 "FPN"; off pools boxes on C5
    head: bool = True  # Table 4 "Head"; off replaces the box head by global average pooling
    scale_aware: bool = True  # Table 4 "scale-aware assignment"; off pools every box on `fixed_level`
    # sqrt(area) boundaries P2|P3|P4|P5 in view pixels; empty: the paper's 48/96/192 scaled by v1_size/224
    level_thresholds: list[float] = field(default_factory=list)
    fixed_level: int = 5  # pyramid level (2..5) used when scale_aware is off
    # The release's way (SoCo_FPN.py 157-167): every box pooled on all four levels, the head, projector and predictor
    # run once per level, each box keeping its own level's output. False: each box pooled on its own level only, one
    # head call per box set (a detector's box head; a quarter of the head's work, BatchNorm over the real boxes).
    pool_all_levels: bool = True
    fpn_channels: int = 256
    head_convs: int = 4
    head_conv_channels: int = 256  # the head's conv width (torchvision's and Detectron2's 4conv1fc: 256)
    head_fc_dim: int = 1024
    projector_hidden: int = 4096
    projection_dim: int = 256
    # The FPN's and box head's first weights. "release": mmcv's ConvModule init of the release's FPN convs (kaiming
    # normal, fan-out; contrast/models/fpn.py 73-89, its xavier init_weights never called) and PyTorch's defaults in
    # its own 4conv1fc head (fast_rcnn_conv_fc_head.py 12-32). "torchvision": those modules' own init
    # (FPN kaiming-uniform a=1, head convs kaiming-normal), as detectors built from them start.
    init: str = "release"

    def check_values(self) -> None:
        """The level thresholds: none (the scaled defaults) or three, increasing (each one's range is a rule)."""
        thresholds = list(self.level_thresholds)
        if thresholds and (len(thresholds) != len(FPN_STRIDES) - 1
                           or any(b <= a for a, b in zip(thresholds, thresholds[1:]))):
            raise ConfigError("method.model.level_thresholds: need 3 increasing values (or [] for the scaled "
                              f"defaults), got {thresholds}")


@config_rules(name=one_of("soco"), ema_base=PROBABILITY)
@dataclass
class SoCoConfig:
    """The `method:` section of a SoCo run."""

    name: str = "soco"
    views: SoCoViewsConfig = field(default_factory=SoCoViewsConfig)
    model: SoCoModelConfig = field(default_factory=SoCoModelConfig)
    ema_base: float = 0.99  # target momentum, raised to 1 by a cosine schedule

    def check_values(self) -> None:
        """The C4 variant contrasts (V1, V2) only, as the release's SoCo_C4 and its two-view data set do."""
        if self.model.variant == "c4" and (self.views.use_v3 or self.views.use_v4):
            extra = "use_v3" if self.views.use_v3 else "use_v4"
            raise ConfigError(f"method.views.{extra}: the C4 variant contrasts V1 and V2 only (the release's "
                              f"SoCo_C4); set method.views.{extra}=false")


def level_thresholds(model: SoCoModelConfig, views: SoCoViewsConfig) -> tuple[float, ...]:
    """The level thresholds in use: the configured ones, or the paper's scaled to the V1 size.

    Scaling keeps the share of boxes per level of the paper's 224-pixel views at any view size, so
    that small (CPU) views still train P4 and P5.
    """
    if model.level_thresholds:
        return tuple(float(t) for t in model.level_thresholds)
    return tuple(t * views.v1_size / PAPER_VIEW_SIZE for t in PAPER_THRESHOLDS)


def encoder_kind(model: SoCoModelConfig) -> str:
    """'fpn', 'c4', or 'c5' (variant fpn with the FPN off: boxes pooled on C5)."""
    if model.variant == "c4":
        return "c4"
    return "fpn" if model.fpn else "c5"


def release_init(fpn_backbone: nn.Module | None, box_head: nn.Module | None) -> None:
    """The release's first weights of the FPN convs (kaiming-normal fan-out, zero bias) and of the 4conv1fc head
    (PyTorch's default of every conv and linear layer); the ResNet's init is torchvision's, as the release's."""
    if fpn_backbone is not None:
        for conv in (m for m in fpn_backbone.fpn.modules() if isinstance(m, nn.Conv2d)):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
    if box_head is not None:
        for layer in (m for m in box_head.modules() if isinstance(m, (nn.Conv2d, nn.Linear))):
            layer.reset_parameters()


def build_encoder(model: SoCoModelConfig, thresholds: tuple[float, ...]) -> ObjectEncoder:
    """SoCo's online encoder from its parts; the construction order fixes the random initialisation."""
    kind = encoder_kind(model)
    if kind == "fpn":
        backbone: nn.Module = build_resnet_fpn(model.depth, model.fpn_channels)
        feature_names = FPN_LEVEL_NAMES
        fixed = None if model.scale_aware else model.fixed_level - 2  # P2 is index 0
        pooler = BoxPooler(FPN_STRIDES, FPN_POOLED_SIZE, thresholds if model.scale_aware else None, fixed)
        pooled_channels = model.fpn_channels
    elif kind == "c5":
        backbone = ResNetBody(build_resnet(model.depth), "layer4")
        feature_names = ("0",)
        pooler = BoxPooler((backbone.stride,), FPN_POOLED_SIZE)
        pooled_channels = backbone.out_channels
    else:  # C4: the trunk up to layer3; layer4 becomes the head
        network = build_resnet(model.depth)
        backbone = ResNetBody(network, "layer3")
        feature_names = ("0",)
        pooler = BoxPooler((backbone.stride,), C4_POOLED_SIZE)
        pooled_channels = c4_channels(network)

    if not model.head:
        box_head: nn.Module = GlobalAveragePool()
        representation_dim = pooled_channels
    elif kind == "c4":
        box_head = C4Head(network.layer4)
        representation_dim = c5_channels(network)
    else:
        box_head = build_box_head(pooled_channels, model.head_convs, model.head_fc_dim, FPN_POOLED_SIZE,
                                  model.head_conv_channels)
        representation_dim = model.head_fc_dim
    projector = MLP(representation_dim, model.projector_hidden, model.projection_dim)
    if model.init == "release":
        release_init(backbone if kind == "fpn" else None, box_head if model.head and kind != "c4" else None)
    return ObjectEncoder(backbone, feature_names, pooler, box_head, projector, model.pool_all_levels)


def view_pairs(model: SoCoModelConfig, views: SoCoViewsConfig) -> list[tuple[str, str]]:
    """The box sets contrasted, as (V1's set, the other view's set): V1 with V2, V3 and SoCo*'s V4; C4 with V2 only.

    Each pair names its own V1 box set ("v1:v2", "v1:v3", ...), see `soco_transform.pair_box_sets`.
    """
    pairs = pair_box_sets(views)
    return pairs[:1] if model.variant == "c4" else pairs


@register_method
class SoCo(MomentumMethod):
    """Online encoder + predictor, and a target encoder that follows the online one by EMA (cosine schedule)."""

    name = "soco"
    config_class = SoCoConfig
    presets = MethodPresets(tiny="soco_tiny", small="soco_small", r50="soco_r50_fpn")
    study_arms = (
        # SoCo's Table 4, row 1: image-level BYOL in SoCo's own settings (V1 the whole image, V2 a crop of area
        # 0.5-1, SoCo's lr and weight decay), not BYOL as released (that is the method `byol`, methods/byol.py)
        StudyArm("byol_image", "SoCo's Table 4 row 1, image-level BYOL in SoCo's settings: backbone only (global "
                 "pooling of the whole image and a 0.5-1 crop)", order=10,
                 presets=MethodPresets(tiny="byol_image_tiny", small="byol_image_small", r50="byol_image_r50")),
        StudyArm("soco", "SoCo: backbone, FPN and box head", pretrains_fpn_and_head=True, order=20),
    )
    transform_class = SoCoTransform  # V1-V4 with proposals_per_image boxes each

    def __init__(self, config: SoCoConfig):
        super().__init__(config, momentum_base=config.ema_base, momentum_schedule="cosine")
        self.thresholds = level_thresholds(config.model, config.views)
        self.online = build_encoder(config.model, self.thresholds)
        dim = config.model.projection_dim
        self.predictor = MLP(dim, config.model.projector_hidden, dim)
        self.make_target("online", "target")
        self.pairs = view_pairs(config.model, config.views)
        self.view_sets = self.sets_by_view()  # fixed by the configuration: not rebuilt every step

    @classmethod
    def smallest_batch_size(cls, config: SoCoConfig, world_size: int = 1) -> tuple[int, str]:
        """Two images: BatchNorm normalises over the images of a micro-batch, and one whole view is one sample."""
        return 2, ("BatchNorm in SoCo's backbone, box head and projector normalises over the images of each "
                   "process's micro-batch and needs two")

    def sets_by_view(self) -> dict[str, list[str]]:
        """{view name: the box sets of that view this method reads}, V1's sets in pair order."""
        by_view: dict[str, list[str]] = {}
        for pair in self.pairs:
            for set_name in pair:
                sets = by_view.setdefault(set_name.split(":")[0], [])
                if set_name not in sets:
                    sets.append(set_name)
        return by_view

    def loss(self, views: dict[str, torch.Tensor], boxes: dict[str, torch.Tensor],
             box_ids: dict[str, torch.Tensor]) -> torch.Tensor:
        """The symmetrised SoCo loss: views (B,3,S,S) by view name, boxes (B, K, 4) and ids (B, K) by box set name.

        Each view runs through the backbone once and through the head once per box set it carries; boxes of a
        pair meet by id (`losses.matched_box_loss`).
        """
        predictions, targets = {}, {}
        for view, set_names in self.view_sets.items():
            box_sets = [boxes[name] for name in set_names]
            batch, count = box_sets[0].shape[:2]
            online = self.online(views[view], box_sets, predictor=self.predictor)
            with torch.no_grad():
                target = self.target(views[view], box_sets)
            for name, online_set, target_set in zip(set_names, online, target):
                predictions[name] = online_set.reshape(batch, count, -1)
                targets[name] = target_set.reshape(batch, count, -1)
        if self.config.views.box_sets == "shared":
            # The earlier design contrasts row i with row i (its padding cycles the picks, so ids repeat).
            box_ids = {name: torch.arange(ids.shape[1], device=ids.device).expand_as(ids) for name, ids in box_ids.items()}
        return symmetric_pair_loss(predictions, targets, box_ids, self.pairs)

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """{"loss": the symmetrised BYOL loss over every matched box pair of every view pair}."""
        return {"loss": self.loss(batch["views"], batch["boxes"], batch["box_ids"])}

    def encoder_layout(self) -> EncoderLayout:
        """Which detector parts the encoder holds, under which key prefixes, and how boxes were pooled."""
        model = self.config.model
        kind = encoder_kind(model)
        parts = ["backbone"] + (["fpn"] if kind == "fpn" else [])
        if model.head:
            parts.append("res5" if kind == "c4" else "box_head")
        pooler = self.online.pooler
        return EncoderLayout(
            kind=kind,
            parts=tuple(parts),
            depth=model.depth,
            prefixes={"backbone": "backbone.body.", "fpn": "backbone.fpn.", "box_head": "box_head.",
                      "res5": "box_head.layer4.", "projector": "projector."},
            pooler={"output_size": pooler.output_size, "strides": list(pooler.strides),
                    "level_thresholds": list(pooler.thresholds) if pooler.thresholds else None,
                    "aligned": True, "sampling_ratio": ADAPTIVE_SAMPLING},
        )

    def draw_batch(self, batch: dict, path: Path) -> Path:
        """A grid of the batch's box sets on their views (V1 once per set; box k in colour k, the same proposal in
        both sets of a pair up to the padding, which each copy draws on its own)."""
        columns = {name: batch["views"][name.split(":")[0]] for name in batch["boxes"]}
        return draw_views(columns, batch["boxes"], path, batch.get("paths"))
