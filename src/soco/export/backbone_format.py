"""Backbone only: a torchvision ResNet state dict (resnet50().state_dict() without fc.*) for any other detector."""

from __future__ import annotations

from pathlib import Path

from soco.export.formats import (
    FPN_PREFIX,
    HEAD_PREFIX,
    Conversion,
    ExportFormat,
    SourceWeights,
    note_leftovers,
)
from soco.export.torchvision_format import save_state_dict

STAGES = ("layer1", "layer2", "layer3", "layer4")


def convert(source: SourceWeights) -> Conversion:
    """The ResNet trunk (with the C4 head's layer4) under torchvision resnet names; FPN and box head are dropped."""
    conversion = Conversion()
    for name, tensor in source.body().items():
        conversion.add("backbone", name, tensor)
    conversion.drop(FPN_PREFIX + "*", len(source.fpn()))
    if source.layout != "c4":
        conversion.drop(HEAD_PREFIX + "*", len(source.box_head()))
    missing = [stage for stage in STAGES if not any(k.startswith(stage + ".") for k in conversion.weights)]
    if missing:
        conversion.notes.append(f"the model has no {', '.join(missing)} (C4 with model.head=false): "
                                "load with strict=False and train those from scratch")
    note_leftovers(source, conversion)
    return conversion


def write(conversion: Conversion, source: SourceWeights, path: Path) -> None:
    """Save as a plain state dict (.pt/.pth) or safetensors (.safetensors)."""
    save_state_dict(conversion.weights, path, {"format": "torchvision-resnet", "producer": "soco",
                                               "source": str(source.path), "network": source.network})


FORMAT = ExportFormat(
    name="backbone",
    suffix=".pt",
    convert=convert,
    write=write,
)
