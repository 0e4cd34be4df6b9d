"""Backbone only: a torchvision ResNet state dict (resnet50().state_dict() without fc.*) for any other detector."""

from __future__ import annotations

from pathlib import Path

from soco.export.conversion import Conversion, ExportFormat, note_leftovers
from soco.export.detectors import Detector
from soco.export.source import SourceWeights
from soco.export.writing import provenance, save_state_dict

STAGES = ("layer1", "layer2", "layer3", "layer4")


def convert(source: SourceWeights, detector: Detector | None = None) -> Conversion:
    """The ResNet trunk (with the C4 head's layer4) under torchvision resnet names; FPN and box head are dropped.

    The file is for any detector, so `detector` is not used.
    """
    conversion = Conversion()
    for name, tensor in source.body().items():
        conversion.add("backbone", name, tensor)
    conversion.drop(source.prefixes["fpn"] + "*", len(source.fpn()))
    conversion.drop(source.prefixes["box_head"] + "*", len(source.box_head()))
    missing = [stage for stage in STAGES if not any(k.startswith(stage + ".") for k in conversion.weights)]
    if missing:
        conversion.notes.append(f"the model has no {', '.join(missing)} (C4 with {source.absent_because('res5')}): "
                                "load with strict=False and train those from scratch")
    note_leftovers(source, conversion)
    return conversion


def write(conversion: Conversion, source: SourceWeights, path: Path) -> None:
    """Save as a plain state dict (.pt/.pth) or safetensors (.safetensors)."""
    save_state_dict(conversion.weights, path, provenance(source, "torchvision-resnet"))


FORMAT = ExportFormat(
    name="backbone",
    suffix=".pt",
    convert=convert,
    write=write,
)
