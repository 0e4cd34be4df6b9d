"""Export of pretrained SoCo weights to detectors: torchvision, Detectron2, MMDetection, or a plain ResNet."""

from soco.export.formats import (
    FORMAT_NAMES,
    CheckpointNotFoundError,
    ExportError,
    ExportResult,
    MissingModelError,
    SourceWeights,
    UnknownFormatError,
    UnsupportedLayoutError,
    export_checkpoint,
    load_source,
    resolve_checkpoint,
    resolve_format,
)
from soco.export.torchvision_format import load_into_torchvision, load_state_dict_file

__all__ = [
    "FORMAT_NAMES",
    "CheckpointNotFoundError",
    "ExportError",
    "ExportResult",
    "MissingModelError",
    "SourceWeights",
    "UnknownFormatError",
    "UnsupportedLayoutError",
    "export_checkpoint",
    "load_into_torchvision",
    "load_source",
    "load_state_dict_file",
    "resolve_checkpoint",
    "resolve_format",
]
