"""The detectors of `soco transfer`, built from torchvision's parts at any ResNet depth, and loading pretrained parts.

- faster_rcnn / mask_rcnn: fasterrcnn/maskrcnn_resnet50_fpn_v2 (ResNet-FPN P2-P6 with BN, 4conv1fc head with BN).
- faster_rcnn_c4: Faster R-CNN on C4 (stride 16), RoIAlign 14x14 and res5 + average pool as the box head
  (Detectron2's R-C4, as SoCo's C4 variant pretrains it).
- retinanet / fcos: retinanet_resnet50_fpn_v2 / fcos_resnet50_fpn (FPN P3-P7), with BN in the FPN so that a
  pretrained FPN fits (docs/transfer.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead, _default_anchorgen
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from soco.errors import ConfigError, SocoError
from soco.models.backbone import RESNET_BUILDERS, ResNetBody, build_resnet, build_resnet_fpn, c4_channels, c5_channels
from soco.models.heads import C4Head
from soco.transfer.architectures import ARCHITECTURES, SINGLE_STAGE
from soco.transfer.pooler import FPN_FEATURE_NAMES, AlignedMultiScaleRoIAlign
from soco.transfer.weights import read_weights, resnet_name

__all__ = [
    "ARCHITECTURES",
    "LOADABLE_PARTS",
    "LoadReport",
    "architecture_of",
    "build_detector",
    "convert_sync_bn",
    "describe",
    "load_pretrained",
]

BOX_POOL_SIZE = 7  # torchvision's (and pretraining's) RoI sizes
MASK_POOL_SIZE = 14
C4_POOL_SIZE = 14  # res5 halves it to 7x7, as in Detectron2's Res5ROIHeads and SoCo's C4 variant
C4_FEATURE_NAMES = ["0"]  # ResNetBody's one map
# Detectron2's R-C4 anchors: all five sizes on the one stride-16 map.
C4_ANCHOR_SIZES = ((32, 64, 128, 256, 512),)
ASPECT_RATIOS = (0.5, 1.0, 2.0)
DEFAULT_FPN_CHANNELS = 256
DEFAULT_BOX_HEAD_CONVS = (256, 256, 256, 256)
DEFAULT_BOX_HEAD_FCS = (1024,)
MASK_HEAD_CHANNELS = 256
GROUP_NORM_GROUPS = 32  # RetinaNet v2's and FCOS's heads
# Every detector module a pretraining file may fill, each loaded with strict=True.
LOADABLE_PARTS = ("backbone.body", "backbone.fpn", "rpn.head", "roi_heads.box_head", "roi_heads.mask_head")


@dataclass(frozen=True)
class _Parts:
    """Which of a detector's modules a file may fill, and which always start from their own initialisation."""

    loadable: tuple[str, ...]
    random: tuple[str, ...]  # may lie inside a loadable module (RetinaNet's P6/P7 in backbone.fpn)


_PARTS = {
    "faster_rcnn": _Parts(("backbone.body", "backbone.fpn", "rpn.head", "roi_heads.box_head"),
                          ("roi_heads.box_predictor",)),
    "mask_rcnn": _Parts(("backbone.body", "backbone.fpn", "rpn.head", "roi_heads.box_head", "roi_heads.mask_head"),
                        ("roi_heads.box_predictor", "roi_heads.mask_predictor")),
    "faster_rcnn_c4": _Parts(("backbone.body", "rpn.head", "roi_heads.box_head"), ("roi_heads.box_predictor",)),
    "retinanet": _Parts(("backbone.body", "backbone.fpn"), ("backbone.fpn.extra_blocks", "head")),
    "fcos": _Parts(("backbone.body", "backbone.fpn"), ("backbone.fpn.extra_blocks", "head")),
}


def describe(model: str, depth: int) -> str:
    """A short name of a detector, e.g. 'retinanet R18-FPN (P3-P7)'."""
    if model == "faster_rcnn_c4":
        return f"{model} R{depth}-C4"
    return f"{model} R{depth}-FPN" + (" (P3-P7)" if model in SINGLE_STAGE else "")


def _box_head_output(fpn_channels: int, convs: tuple[int, ...], fcs: tuple[int, ...]) -> int:
    """Width of a FastRCNNConvFCHead's output (its flattened last conv map when it has no fc)."""
    if fcs:
        return fcs[-1]
    return (convs[-1] if convs else fpn_channels) * BOX_POOL_SIZE * BOX_POOL_SIZE


def _single_stage_backbone(depth: int, fpn_channels: int, p6_from_p5: bool) -> BackboneWithFPN:
    """ResNet + FPN on C3..C5 with P6/P7 (LastLevelP6P7) as torchvision's RetinaNet/FCOS builders, BN in the FPN."""
    network = build_resnet(depth)
    in_channels = [c4_channels(network) // 2, c4_channels(network), c5_channels(network)]  # C3 is half C4
    extra = LastLevelP6P7(fpn_channels if p6_from_p5 else c5_channels(network), fpn_channels)
    # LastLevelP6P7 decides P5-or-C5 by comparing widths, which would pick P5 for RetinaNet when C5 happens
    # to be as wide as the FPN; the architecture decides here.
    extra.use_P5 = p6_from_p5
    # torchvision's builders (_resnet_fpn_extractor(..., returned_layers=[2, 3, 4])) put no norm in the FPN;
    # BN is added so that a pretrained FPN (conv + BN, as in the v2 R-CNNs) fits.
    return BackboneWithFPN(network, return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
                           in_channels_list=in_channels, out_channels=fpn_channels, extra_blocks=extra,
                           norm_layer=nn.BatchNorm2d)


def build_detector(
    model: str = "faster_rcnn",
    num_classes: int = 2,
    depth: int = 50,
    min_size: int = 800,
    max_size: int = 1333,
    detections_per_img: int = 100,
    *,
    fpn_channels: int = DEFAULT_FPN_CHANNELS,
    box_head_convs: tuple[int, ...] | list[int] = DEFAULT_BOX_HEAD_CONVS,
    box_head_fcs: tuple[int, ...] | list[int] = DEFAULT_BOX_HEAD_FCS,
    **detector_options,
) -> nn.Module:
    """A randomly initialised detector of ARCHITECTURES with ResNet-`depth` (module docstring; docs/transfer.md).

    The RoI poolers of the two-stage detectors pool as pretraining did (AlignedMultiScaleRoIAlign). The ResNet's
    residual branches end in zero-initialised BN (as in pretraining); BN is plain and trainable everywhere
    (nothing frozen). `num_classes` counts the background. `fpn_channels` and the box head widths default to
    torchvision's; a pretraining file may have others (weights.detector_widths). `detector_options` go to the
    torchvision class as they are (two-stage: box_batch_size_per_image, rpn_post_nms_top_n_test, ...).
    """
    if model not in ARCHITECTURES:
        raise ConfigError(f"model: {model!r} is not one of {', '.join(ARCHITECTURES)}")
    if depth not in RESNET_BUILDERS:
        raise ConfigError(f"depth: {depth} is not one of {sorted(RESNET_BUILDERS)}")
    if model == "faster_rcnn_c4":
        return _build_c4(num_classes, depth, min_size, max_size, detections_per_img, **detector_options)
    if model in SINGLE_STAGE:
        if fpn_channels % GROUP_NORM_GROUPS:
            raise ConfigError(f"{model}'s head has GroupNorm({GROUP_NORM_GROUPS}), so the FPN width must be a "
                              f"multiple of {GROUP_NORM_GROUPS}, not {fpn_channels}")
        common = dict(min_size=min_size, max_size=max_size, detections_per_img=detections_per_img,
                      **detector_options)
        if model == "retinanet":
            backbone = _single_stage_backbone(depth, fpn_channels, p6_from_p5=False)
            anchors = _default_anchorgen()
            head = RetinaNetHead(fpn_channels, anchors.num_anchors_per_location()[0], num_classes,
                                 norm_layer=partial(nn.GroupNorm, GROUP_NORM_GROUPS))
            head.regression_head._loss_type = "giou"  # as retinanet_resnet50_fpn_v2
            return RetinaNet(backbone, num_classes, anchor_generator=anchors, head=head, **common)
        backbone = _single_stage_backbone(depth, fpn_channels, p6_from_p5=True)
        return FCOS(backbone, num_classes, head=FCOSHead(fpn_channels, 1, num_classes), **common)

    # The very modules of torchvision's v2 builders (_resnet_fpn_extractor(resnet, 5, norm_layer=BatchNorm2d)).
    backbone = build_resnet_fpn(depth, fpn_channels)
    anchors = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), (ASPECT_RATIOS,) * 5)
    rpn_head = RPNHead(fpn_channels, anchors.num_anchors_per_location()[0], conv_depth=2)
    convs, fcs = tuple(box_head_convs), tuple(box_head_fcs)
    box_head = FastRCNNConvFCHead((fpn_channels, BOX_POOL_SIZE, BOX_POOL_SIZE), list(convs), list(fcs),
                                  norm_layer=nn.BatchNorm2d)
    box_predictor = FastRCNNPredictor(_box_head_output(fpn_channels, convs, fcs), num_classes)
    # Pooled as in pretraining (aligned, adaptive sampling), not with torchvision's defaults: see pooler.py.
    box_roi_pool = AlignedMultiScaleRoIAlign(FPN_FEATURE_NAMES, BOX_POOL_SIZE)
    common = dict(
        rpn_anchor_generator=anchors, rpn_head=rpn_head, box_roi_pool=box_roi_pool, box_head=box_head,
        box_predictor=box_predictor, min_size=min_size, max_size=max_size,
        box_detections_per_img=detections_per_img, **detector_options,
    )
    if model == "mask_rcnn":
        mask_head = MaskRCNNHeads(fpn_channels, [MASK_HEAD_CHANNELS] * 4, 1, norm_layer=nn.BatchNorm2d)
        # The mask head is not pretrained; it pools the same way only so that both heads see one geometry.
        mask_roi_pool = AlignedMultiScaleRoIAlign(FPN_FEATURE_NAMES, MASK_POOL_SIZE)
        mask_predictor = MaskRCNNPredictor(MASK_HEAD_CHANNELS, MASK_HEAD_CHANNELS, num_classes)
        return MaskRCNN(backbone, mask_roi_pool=mask_roi_pool, mask_head=mask_head, mask_predictor=mask_predictor,
                        **common)
    return FasterRCNN(backbone, **common)


def _build_c4(num_classes: int, depth: int, min_size: int, max_size: int, detections_per_img: int,
              **detector_options) -> FasterRCNN:
    """Faster R-CNN R-C4: the ResNet up to res4, one RPN on C4, RoIAlign 14x14 (aligned), res5 + mean as box head."""
    network = build_resnet(depth)
    # IntermediateLayerGetter keeps conv1..layer3 only, so layer4 (res5) lives in the box head alone.
    backbone = ResNetBody(network, "layer3")
    anchors = AnchorGenerator(C4_ANCHOR_SIZES, (ASPECT_RATIOS,))
    rpn_head = RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0])  # one conv, as Detectron2's
    # The pretraining encoder's own head (C4Head: layer4, then the mean over the 7x7 map), so its keys read
    # roi_heads.box_head.layer4.* as the encoder's read box_head.layer4.*.
    box_head = C4Head(network.layer4)
    return FasterRCNN(
        backbone, rpn_anchor_generator=anchors, rpn_head=rpn_head,
        box_roi_pool=AlignedMultiScaleRoIAlign(C4_FEATURE_NAMES, C4_POOL_SIZE), box_head=box_head,
        box_predictor=FastRCNNPredictor(c5_channels(network), num_classes), min_size=min_size, max_size=max_size,
        box_detections_per_img=detections_per_img, **detector_options,
    )


def architecture_of(model: nn.Module) -> str:
    """Which of ARCHITECTURES a detector is (by its torchvision class and box head)."""
    if isinstance(model, RetinaNet):
        return "retinanet"
    if isinstance(model, FCOS):
        return "fcos"
    if isinstance(model, MaskRCNN):
        return "mask_rcnn"
    if isinstance(model, FasterRCNN):
        return "faster_rcnn_c4" if isinstance(model.roi_heads.box_head, C4Head) else "faster_rcnn"
    raise SocoError(f"{type(model).__name__} is not a detector of soco transfer ({', '.join(ARCHITECTURES)})")


def convert_sync_bn(model: nn.Module, world_size: int, device: torch.device) -> nn.Module:
    """SyncBatchNorm everywhere when several GPU processes train together; the model unchanged otherwise."""
    if world_size > 1 and device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


@dataclass
class LoadReport:
    """What load_pretrained took from a file: tensors per detector part, what it could not take, what is random."""

    path: str
    loaded: dict[str, int] = field(default_factory=dict)
    random: list[str] = field(default_factory=list)
    # The file's blocks this detector has no place for -> "N tensors: why".
    not_loaded: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        """One human-readable line."""
        parts = ", ".join(f"{name} ({count} tensors)" for name, count in self.loaded.items())
        skipped = "; ".join(f"{name} ({why})" for name, why in self.not_loaded.items())
        return (f"weights {self.path}: loaded {parts}; " + (f"not loaded: {skipped}; " if skipped else "")
                + f"random init: {', '.join(self.random) or 'nothing'}")


@dataclass(frozen=True)
class _Skip:
    """A file tensor the detector cannot take: the block it belongs to, and why."""

    group: str
    reason: str


_FPN_BLOCK_KEY = re.compile(r"^backbone\.fpn\.(?P<kind>inner_blocks|layer_blocks)\.(?P<level>\d+)\.(?P<rest>.+)$")


def _route(key: str, architecture: str) -> str | _Skip | None:
    """The detector key a file key loads into, a _Skip when this detector has no place for it, None when unknown.

    This is the one place where export names meet detector names: the file's ResNet (backbone.body.*, and a C4
    export's res5 whether written as backbone.body.layer4.* or roi_heads.box_head.layer4.*) goes to the
    detector's trunk, except that a C4 detector's res5 is its box head; a P2-P5 FPN goes to P3-P5 of RetinaNet/FCOS.
    """
    resnet = resnet_name(key)
    if resnet is not None:
        if architecture == "faster_rcnn_c4" and resnet.startswith("layer4."):
            return "roi_heads.box_head." + resnet
        return "backbone.body." + resnet
    if key.startswith("backbone.fpn."):
        if architecture == "faster_rcnn_c4":
            return _Skip("backbone.fpn", "faster_rcnn_c4 has no FPN")
        block = _FPN_BLOCK_KEY.match(key)
        if architecture in SINGLE_STAGE and block:
            level = int(block["level"])
            if level == 0:
                return _Skip(f"backbone.fpn.{block['kind']}.0", f"C2/P2: the {architecture} FPN starts at P3")
            # The file's levels are C2..C5 (indices 0..3); the detector's C3..C5 (0..2). P3..P5 and the
            # top-down path above them are computed exactly as in pretraining.
            return f"backbone.fpn.{block['kind']}.{level - 1}.{block['rest']}"
        return key
    if key.startswith("rpn.head."):
        return _Skip("rpn.head", f"{architecture} has no RPN") if architecture in SINGLE_STAGE else key
    if key.startswith("roi_heads.box_head."):
        if architecture == "faster_rcnn_c4":
            return _Skip("roi_heads.box_head", "the file's 4conv1fc head; faster_rcnn_c4's box head is res5")
        return _Skip("roi_heads.box_head", f"{architecture} has no RoI box head") \
            if architecture in SINGLE_STAGE else key
    if key.startswith("roi_heads.mask_head."):
        return key if architecture == "mask_rcnn" else _Skip("roi_heads.mask_head", "only mask_rcnn has a mask head")
    return None


def _submodule(model: nn.Module, dotted: str) -> nn.Module:
    module = model
    for name in dotted.split("."):
        module = getattr(module, name)
    return module


def _has_submodule(model: nn.Module, dotted: str) -> bool:
    try:
        return _submodule(model, dotted) is not None
    except AttributeError:
        return False


def load_pretrained(model: nn.Module, weights: str | Path | Mapping[str, torch.Tensor],
                    name: str | Path | None = None) -> LoadReport:
    """Load every block of a torchvision-keyed state dict that the detector can take, each part with strict=True.

    `weights` is a `soco export --to torchvision` file (.pt or .safetensors; a bare `--to backbone` ResNet is
    taken as backbone.body), or its already read dict (then `name` names it in messages). Each detector part
    that receives tensors must receive all of them (only BN's `num_batches_tracked` counters may be absent: the
    BN momentum is fixed, so they do not affect the network), with the detector's shapes. Blocks the detector
    has no place for (an FPN for C4, P2 for RetinaNet, a box head for FCOS) are named in the report's
    `not_loaded`; keys of no known part are an error naming the file.
    """
    if isinstance(weights, Mapping):
        state, path = dict(weights), str(name or "<state dict>")
    else:
        state, path = read_weights(weights), str(name or Path(weights).expanduser())
    architecture = architecture_of(model)
    parts = _PARTS[architecture]
    given: dict[str, dict[str, torch.Tensor]] = {}
    skipped: dict[str, list] = {}
    unexpected = []
    for key, value in state.items():
        target = _route(key, architecture)
        if isinstance(target, _Skip):
            skipped.setdefault(target.group, [0, target.reason])[0] += 1
            continue
        part = None if target is None else next((p for p in parts.loadable if target.startswith(p + ".")), None)
        if part is None:
            unexpected.append(key)
        else:
            given.setdefault(part, {})[target[len(part) + 1:]] = value
    if unexpected:
        shown = ", ".join(unexpected[:6]) + (", ..." if len(unexpected) > 6 else "")
        raise SocoError(f"weights file {path}: {len(unexpected)} key(s) belong to no loadable part "
                        f"({', '.join(LOADABLE_PARTS)}): {shown}")
    report = LoadReport(path, not_loaded={group: f"{count} tensors: {why}" for group, (count, why) in skipped.items()})
    for part in parts.loadable:
        if part not in given:
            report.random.append(part)
            continue
        module = _submodule(model, part)
        # Submodules that never come from a file (RetinaNet's P6/P7 inside backbone.fpn) keep their own weights.
        own = tuple(r[len(part) + 1:] + "." for r in parts.random if r.startswith(part + "."))
        current = module.state_dict()
        expected = {k: v for k, v in current.items() if not k.startswith(own or ("\0",))}
        given_part = given[part]
        missing = [k for k in expected if k not in given_part and not k.endswith("num_batches_tracked")]
        extra = [k for k in given_part if k not in expected]
        wrong = [f"{k} {tuple(given_part[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                 if k in given_part and given_part[k].shape != v.shape]
        if missing or extra or wrong:
            problems = []
            if missing:
                problems.append(f"missing {len(missing)}: {', '.join(missing[:4])}")
            if extra:
                problems.append(f"unexpected {len(extra)}: {', '.join(extra[:4])}")
            if wrong:
                problems.append(f"shape (file vs detector) {len(wrong)}: {', '.join(wrong[:3])}")
            raise SocoError(f"weights file {path} does not fit the detector's {part} ({architecture}: ResNet depth, "
                            f"FPN width or head shape differ?): {'; '.join(problems)}")
        module.load_state_dict({k: given_part.get(k, v) for k, v in current.items()}, strict=True)
        report.loaded[part] = len(given_part)
    report.random += [p for p in parts.random if _has_submodule(model, p)]
    if not report.loaded:
        skipped_text = f" (not loaded: {', '.join(report.not_loaded)})" if report.not_loaded else ""
        raise SocoError(f"weights file {path} holds nothing that the {architecture} detector takes{skipped_text}")
    return report
