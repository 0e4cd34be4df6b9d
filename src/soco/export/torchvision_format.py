"""torchvision: fasterrcnn_resnet50_fpn_v2's backbone.* and roi_heads.box_head.* state dict (identity mapping)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from soco.export.conversion import Conversion, ExportFormat, note_leftovers, require_fpn_model
from soco.export.detectors import RCNN_FPN, Detector
from soco.export.source import ExportError, SourceWeights
from soco.export.writing import load_state_dict_file, provenance, save_state_dict

DETECTOR_BACKBONE_PREFIX = "backbone."
DETECTOR_BODY_PREFIX = "backbone.body."  # BackboneWithFPN's trunk and FPN
DETECTOR_FPN_PREFIX = "backbone.fpn."
DETECTOR_BOX_HEAD_PREFIX = "roi_heads.box_head."


def backbone_only(source: SourceWeights) -> bool:
    """Whether the encoder is a whole ResNet and nothing else (SCRL, the image-level BYOL baseline)."""
    return source.layout == "c5" and not source.fpn() and not source.box_head()


def convert(source: SourceWeights, detector: Detector) -> Conversion:
    """Rename the encoder to torchvision detection names: the modules are torchvision's own, so only the head moves.

    A backbone-only encoder gives backbone.body.* alone: the detector's FPN and heads start from random weights.
    The detector is always the R-FPN Faster/Mask R-CNN (the registry refuses another).
    """
    if not backbone_only(source):
        require_fpn_model(source, "torchvision")
    conversion = Conversion(detector=RCNN_FPN)
    for name, tensor in source.body().items():
        conversion.add("backbone", DETECTOR_BODY_PREFIX + name, tensor)
    for name, tensor in source.fpn().items():
        conversion.add("fpn", DETECTOR_FPN_PREFIX + name, tensor)
    for name, tensor in source.box_head().items():
        conversion.add("box head", DETECTOR_BOX_HEAD_PREFIX + name, tensor)
    note_leftovers(source, conversion)
    return conversion


def write(conversion: Conversion, source: SourceWeights, path: Path) -> None:
    """Save the renamed weights as a plain state dict (.pt/.pth) or safetensors (.safetensors)."""
    save_state_dict(conversion.weights, path, provenance(source, "torchvision"))


def load_into_torchvision(model: nn.Module, path: str | Path | Mapping[str, torch.Tensor]) -> list[str]:
    """Load an export into a torchvision R-FPN detector's backbone and box head, strictly; returns the loaded keys.

    A backbone-only export loads strictly into model.backbone.body; the FPN and heads are left as they are.

    Works for fasterrcnn_resnet50_fpn_v2, maskrcnn_resnet50_fpn_v2 and any detector whose backbone comes from
    `_resnet_fpn_extractor(..., norm_layer=nn.BatchNorm2d)` and whose box head is a FastRCNNConvFCHead with BN.
    """
    state = dict(path) if isinstance(path, Mapping) else load_state_dict_file(path)
    backbone = OrderedDict((k[len(DETECTOR_BACKBONE_PREFIX):], v) for k, v in state.items()
                           if k.startswith(DETECTOR_BACKBONE_PREFIX))
    head = OrderedDict((k[len(DETECTOR_BOX_HEAD_PREFIX):], v) for k, v in state.items()
                       if k.startswith(DETECTOR_BOX_HEAD_PREFIX))
    unknown = [k for k in state if not k.startswith((DETECTOR_BACKBONE_PREFIX, DETECTOR_BOX_HEAD_PREFIX))]
    if unknown:
        raise ExportError(f"unexpected keys in the export (neither backbone.* nor roi_heads.box_head.*): "
                          f"{', '.join(unknown[:5])}")
    if not backbone:
        raise ExportError("the export holds no backbone.* weights")
    roi_heads = getattr(model, "roi_heads", None)
    box_head = getattr(roi_heads, "box_head", None)
    if not hasattr(model, "backbone") or (head and box_head is None):
        raise ExportError(f"{type(model).__name__} is not a torchvision two-stage detector "
                          "(needs model.backbone and model.roi_heads.box_head)")
    if all(k.startswith("body.") for k in backbone):  # a backbone-only export: the FPN keeps its own weights
        _load_strict(model.backbone.body, OrderedDict((k[len("body."):], v) for k, v in backbone.items()),
                     "model.backbone.body")
    else:
        _load_strict(model.backbone, backbone, "model.backbone")
    loaded = [DETECTOR_BACKBONE_PREFIX + k for k in backbone]
    if head:
        _load_strict(box_head, head, "model.roi_heads.box_head")
        loaded += [DETECTOR_BOX_HEAD_PREFIX + k for k in head]
    return loaded


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """module.load_state_dict(strict=True), its failure told as an ExportError naming the module."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ExportError(f"the export does not fit {where} (same depth, BN layers and head size are needed): "
                          f"{error}") from None


FORMAT = ExportFormat(
    name="torchvision",
    suffix=".pt",
    convert=convert,
    write=write,
    detectors=(RCNN_FPN.name,),
)
