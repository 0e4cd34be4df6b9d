"""torchvision: fasterrcnn_resnet50_fpn_v2's backbone.* and roi_heads.box_head.* state dict (identity mapping)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from soco.export.formats import (
    BODY_PREFIX,
    FPN_PREFIX,
    Conversion,
    ExportError,
    ExportFormat,
    SourceWeights,
    atomic_write,
    note_leftovers,
    require_fpn_model,
)

DETECTOR_BACKBONE_PREFIX = "backbone."
DETECTOR_BOX_HEAD_PREFIX = "roi_heads.box_head."
SAFETENSORS_SUFFIX = ".safetensors"


def convert(source: SourceWeights) -> Conversion:
    """Rename the encoder to torchvision detection names: the modules are torchvision's own, so only the head moves."""
    require_fpn_model(source, "torchvision")
    conversion = Conversion()
    for name, tensor in source.state.items():
        if name.startswith(BODY_PREFIX):
            conversion.add("backbone", name, tensor)
        elif name.startswith(FPN_PREFIX):
            conversion.add("fpn", name, tensor)
    for name, tensor in source.box_head().items():
        conversion.add("box head", DETECTOR_BOX_HEAD_PREFIX + name, tensor)
    note_leftovers(source, conversion)
    return conversion


def save_state_dict(weights: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """torch.save of a plain dict of tensors, or a safetensors file when the name ends in .safetensors."""
    plain = {name: tensor.detach().contiguous().clone() for name, tensor in weights.items()}
    if path.suffix == SAFETENSORS_SUFFIX:
        save_file = _safetensors().save_file
        atomic_write(path, lambda tmp: save_file(plain, str(tmp), metadata=metadata))
    else:
        atomic_write(path, lambda tmp: torch.save(plain, tmp))


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a file written by save_state_dict (torch.load weights-only, or safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} does not exist")
    if path.suffix == SAFETENSORS_SUFFIX:
        return _safetensors().load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExportError(f"{path} is not a plain dict of tensors (a `soco export --to torchvision` file)")
    return state


def _safetensors():
    """The safetensors.torch module, or a clear error when the optional package is missing."""
    try:
        import safetensors.torch
    except ImportError:
        raise ExportError(".safetensors files need the 'safetensors' package (pip install safetensors); "
                          "or use a .pt file name") from None
    return safetensors.torch


def write(conversion: Conversion, source: SourceWeights, path: Path) -> None:
    """Save the renamed weights as a plain state dict (.pt/.pth) or safetensors (.safetensors)."""
    metadata = {"format": "torchvision", "producer": "soco", "source": str(source.path), "network": source.network}
    save_state_dict(conversion.weights, path, metadata)


def load_into_torchvision(model: nn.Module, path: str | Path | Mapping[str, torch.Tensor]) -> list[str]:
    """Load an export into a torchvision R-FPN detector's backbone and box head, strictly; returns the loaded keys.

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
)
