"""Export of any method's pretrained encoder for detectors in torchvision, Detectron2, MMDetection, or as a ResNet."""

from soco.export.conversion import ExportResult
from soco.export.detectors import DETECTOR_NAMES, UnknownDetectorError
from soco.export.formats import FORMAT_NAMES, export_checkpoint, resolve_format
from soco.export.source import CheckpointNotFoundError, ExportError, ExportWriteError, MissingModelError
from soco.export.source import SourceWeights
from soco.export.source import UnknownFormatError, UnsupportedLayoutError, load_source, resolve_checkpoint
from soco.export.torchvision_format import load_into_torchvision
from soco.export.writing import load_state_dict_file

__all__ = [
    "DETECTOR_NAMES",
    "FORMAT_NAMES",
    "CheckpointNotFoundError",
    "ExportError",
    "ExportResult",
    "ExportWriteError",
    "MissingModelError",
    "SourceWeights",
    "UnknownDetectorError",
    "UnknownFormatError",
    "UnsupportedLayoutError",
    "export_checkpoint",
    "load_into_torchvision",
    "load_source",
    "load_state_dict_file",
    "resolve_checkpoint",
    "resolve_format",
]
