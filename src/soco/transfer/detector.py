"""torchvision's Faster/Mask R-CNN "v2" (ResNet-FPN with BN, 4conv1fc head) at any depth; loading pretrained parts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.rpn import RPNHead

from soco.errors import ConfigError, SocoError
from soco.models.backbone import RESNET_BUILDERS, build_resnet_fpn
from soco.transfer.pooler import FPN_FEATURE_NAMES, AlignedMultiScaleRoIAlign

__all__ = [
    "ARCHITECTURES",
    "LOADABLE_PARTS",
    "LoadReport",
    "build_detector",
    "load_pretrained",
    "convert_sync_bn",
]

ARCHITECTURES = ("faster_rcnn", "mask_rcnn")
BOX_POOL_SIZE = 7  # torchvision's (and pretraining's) RoI sizes
MASK_POOL_SIZE = 14
# Parts a pretraining file may provide; each one present loads with strict=True. The class-count
# dependent predictors (box_predictor, mask_predictor) are never taken from a file.
LOADABLE_PARTS = ("backbone.body", "backbone.fpn", "rpn.head", "roi_heads.box_head", "roi_heads.mask_head")


def _anchor_generator() -> AnchorGenerator:
    """torchvision's default detection anchors: one size per FPN level P2..P6, three aspect ratios."""
    sizes = ((32,), (64,), (128,), (256,), (512,))
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


def build_detector(
    model: str = "faster_rcnn",
    num_classes: int = 2,
    depth: int = 50,
    min_size: int = 800,
    max_size: int = 1333,
    detections_per_img: int = 100,
    **detector_options,
) -> nn.Module:
    """A randomly initialised detector built as fasterrcnn/maskrcnn_resnet50_fpn_v2, with ResNet-`depth`.

    Only the RoI poolers differ: they pool as pretraining did (AlignedMultiScaleRoIAlign). The ResNet's
    residual branches end in zero-initialised BN (as in pretraining); BN is plain and trainable everywhere
    (nothing frozen). `num_classes` counts the background. `detector_options` go to torchvision's
    FasterRCNN/MaskRCNN as they are (e.g. box_batch_size_per_image, rpn_post_nms_top_n_test).
    """
    if model not in ARCHITECTURES:
        raise ConfigError(f"model: {model!r} is not one of {', '.join(ARCHITECTURES)}")
    if depth not in RESNET_BUILDERS:
        raise ConfigError(f"depth: {depth} is not one of {sorted(RESNET_BUILDERS)}")
    # The very call of torchvision's v2 builders (_resnet_fpn_extractor(resnet, 5, norm_layer=BatchNorm2d)).
    backbone = build_resnet_fpn(depth)
    anchors = _anchor_generator()
    rpn_head = RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0], conv_depth=2)
    box_head = FastRCNNConvFCHead((backbone.out_channels, BOX_POOL_SIZE, BOX_POOL_SIZE), [256, 256, 256, 256],
                                  [1024], norm_layer=nn.BatchNorm2d)
    # Pooled as in pretraining (aligned, adaptive sampling), not with torchvision's defaults: see pooler.py.
    box_roi_pool = AlignedMultiScaleRoIAlign(FPN_FEATURE_NAMES, BOX_POOL_SIZE)
    common = dict(
        num_classes=num_classes, rpn_anchor_generator=anchors, rpn_head=rpn_head, box_roi_pool=box_roi_pool,
        box_head=box_head, min_size=min_size, max_size=max_size, box_detections_per_img=detections_per_img,
        **detector_options,
    )
    if model == "mask_rcnn":
        mask_head = MaskRCNNHeads(backbone.out_channels, [256, 256, 256, 256], 1, norm_layer=nn.BatchNorm2d)
        # The mask head is not pretrained; it pools the same way only so that both heads see one geometry.
        mask_roi_pool = AlignedMultiScaleRoIAlign(FPN_FEATURE_NAMES, MASK_POOL_SIZE)
        return MaskRCNN(backbone, mask_roi_pool=mask_roi_pool, mask_head=mask_head, **common)
    return FasterRCNN(backbone, **common)


def convert_sync_bn(model: nn.Module, world_size: int, device: torch.device) -> nn.Module:
    """SyncBatchNorm everywhere when several GPU processes train together; the model unchanged otherwise."""
    if world_size > 1 and device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


@dataclass
class LoadReport:
    """What load_pretrained took from a file: tensors per part, and the parts left at random init."""

    path: str
    loaded: dict[str, int] = field(default_factory=dict)
    random: list[str] = field(default_factory=list)

    def line(self) -> str:
        """One human-readable line."""
        parts = ", ".join(f"{name} ({count} tensors)" for name, count in self.loaded.items())
        return f"weights {self.path}: loaded {parts}; random init: {', '.join(self.random) or 'nothing'}"


RESNET_PREFIXES = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")
SAFETENSORS_SUFFIX = ".safetensors"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict from a torch or safetensors file (also: such a dict under 'model'/'state_dict')."""
    if not path.is_file():
        raise SocoError(f"weights file {path} does not exist")
    if path.suffix == SAFETENSORS_SUFFIX:
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise SocoError(f"weights file {path}: .safetensors files need the 'safetensors' package "
                            "(pip install safetensors)") from None
        try:
            state = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - any decoding failure means the file is unusable
            raise SocoError(f"weights file {path} cannot be read as safetensors: {exc}") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means the file is unusable
            raise SocoError(f"weights file {path} cannot be read with torch.load(weights_only=True): {exc}") from None
    if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        for key in ("model", "state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise SocoError(f"weights file {path} is not a state dict of tensors (write it with "
                        "`soco export --to torchvision`)")
    if all(k.startswith(RESNET_PREFIXES) for k in state):
        # A bare torchvision ResNet (`soco export --to backbone`, or resnet50().state_dict() without fc):
        # it is the detector's backbone.body.
        state = {f"backbone.body.{k}": v for k, v in state.items()}
    return state


def _submodule(model: nn.Module, dotted: str) -> nn.Module:
    module = model
    for name in dotted.split("."):
        module = getattr(module, name)
    return module


def load_pretrained(model: nn.Module, path: str | Path) -> LoadReport:
    """Load every part of LOADABLE_PARTS found in a torchvision-keyed state dict, each with strict=True.

    The file is a `soco export --to torchvision` state dict (.pt or .safetensors); a bare ResNet state dict
    (`--to backbone`) is taken as backbone.body.
    Keys outside those parts, missing keys and shape mismatches are errors naming the file. Only BN's
    `num_batches_tracked` counters may be absent: they do not affect the network (the BN momentum is fixed).
    """
    path = Path(path).expanduser()
    state = _read_state_dict(path)
    by_part: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    for key, value in state.items():
        part = next((p for p in LOADABLE_PARTS if key.startswith(p + ".")), None)
        if part is None:
            unexpected.append(key)
        else:
            by_part.setdefault(part, {})[key[len(part) + 1:]] = value
    if unexpected:
        shown = ", ".join(unexpected[:6]) + (", ..." if len(unexpected) > 6 else "")
        raise SocoError(f"weights file {path}: {len(unexpected)} key(s) belong to no loadable part "
                        f"({', '.join(LOADABLE_PARTS)}): {shown}")
    report = LoadReport(str(path))
    for part in LOADABLE_PARTS:
        if part not in by_part:
            if _has_submodule(model, part):
                report.random.append(part)
            continue
        if not _has_submodule(model, part):
            raise SocoError(f"weights file {path} has {part}.* but this detector has no {part} "
                            "(mask head weights need --model mask_rcnn)")
        module = _submodule(model, part)
        given = by_part[part]
        expected = module.state_dict()
        missing = [k for k in expected if k not in given and not k.endswith("num_batches_tracked")]
        extra = [k for k in given if k not in expected]
        wrong = [f"{k} {tuple(given[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                 if k in given and given[k].shape != v.shape]
        if missing or extra or wrong:
            problems = []
            if missing:
                problems.append(f"missing {len(missing)}: {', '.join(missing[:4])}")
            if extra:
                problems.append(f"unexpected {len(extra)}: {', '.join(extra[:4])}")
            if wrong:
                problems.append(f"shape (file vs detector) {len(wrong)}: {', '.join(wrong[:3])}")
            raise SocoError(f"weights file {path} does not fit the detector's {part} (ResNet depth, FPN width "
                            f"or head shape differ?): {'; '.join(problems)}")
        complete = {k: given.get(k, v) for k, v in expected.items()}
        module.load_state_dict(complete, strict=True)
        report.loaded[part] = len(given)
    report.random += [p for p in ("roi_heads.box_predictor", "roi_heads.mask_predictor") if _has_submodule(model, p)]
    if not report.loaded:
        raise SocoError(f"weights file {path} holds nothing for this detector")
    return report


def _has_submodule(model: nn.Module, dotted: str) -> bool:
    try:
        return _submodule(model, dotted) is not None
    except AttributeError:
        return False
