"""The registry of export formats, and `export_checkpoint`: read a checkpoint, convert its encoder, write the file."""

from __future__ import annotations

import difflib
from pathlib import Path

from soco.export import backbone_format, detectron2_format, mmdet_format, torchvision_format
from soco.export.conversion import Conversion, ExportFormat, ExportResult
from soco.export.detectors import DETECTOR_NAMES, Detector, UnknownDetectorError, detector_named, pretrained_detector
from soco.export.source import CHECKPOINT_NAME, NETWORKS, CheckpointNotFoundError, ExportError, MissingModelError
from soco.export.source import ExportWriteError
from soco.export.source import SourceWeights, UnknownFormatError, UnsupportedLayoutError, load_source
from soco.export.source import resolve_checkpoint

# Names defined in source.py and conversion.py stay importable from here, where they were before the split.
__all__ = [
    "ALIASES", "CHECKPOINT_NAME", "DETECTOR_NAMES", "FORMATS", "FORMAT_NAMES", "NETWORKS", "CheckpointNotFoundError",
    "Conversion", "ExportError", "ExportFormat", "ExportResult", "MissingModelError", "SourceWeights",
    "UnknownDetectorError", "UnknownFormatError", "UnsupportedLayoutError", "choose_detector", "default_output",
    "export_checkpoint", "formats", "load_source", "resolve_checkpoint", "resolve_format",
]

FORMATS: dict[str, ExportFormat] = {
    module.FORMAT.name: module.FORMAT
    for module in (torchvision_format, detectron2_format, mmdet_format, backbone_format)
}
FORMAT_NAMES = tuple(FORMATS)
ALIASES = {"tv": "torchvision", "d2": "detectron2", "mmdetection": "mmdet", "resnet": "backbone"}


def formats() -> dict[str, ExportFormat]:
    """The export formats by name, in the order `soco export --help` lists them."""
    return dict(FORMATS)


def resolve_format(name: str) -> ExportFormat:
    """The format called `name` (or one of its aliases); UnknownFormatError naming the closest otherwise."""
    key = ALIASES.get(name.lower(), name.lower())
    if key in FORMATS:
        return FORMATS[key]
    close = difflib.get_close_matches(name.lower(), [*FORMATS, *ALIASES], n=1, cutoff=0.4)
    hint = f"; did you mean '{ALIASES.get(close[0], close[0])}'?" if close else ""
    raise UnknownFormatError(f"unknown export format '{name}'{hint} (formats: {', '.join(FORMATS)})")


def choose_detector(source: SourceWeights, export_format: ExportFormat, name: str | None) -> Detector:
    """The detector `name`, if `export_format` writes for it; by default the one the encoder was pretrained as."""
    if name is None:
        return pretrained_detector(source.layout)
    detector = detector_named(name)
    if detector.name not in export_format.detectors:
        writers = [fmt.name for fmt in FORMATS.values() if detector.name in fmt.detectors]
        written = (f"it writes for: {', '.join(export_format.detectors)}" if export_format.detectors
                   else "it is a plain ResNet for any detector")
        raise UnknownDetectorError(f"--to {export_format.name} has no --detector {detector.name} ({written}); "
                                   f"{detector.name} is written by --to {' or --to '.join(writers)}")
    return detector


def default_output(source: SourceWeights, export_format: ExportFormat, detector: Detector | None = None) -> Path:
    """Where the export goes without -o: exported/<format>[-<detector>]<suffix> in the run folder.

    The detector is named only when it is not the one the encoder was pretrained as.
    """
    checkpoint_dir = source.path.parent
    run_dir = checkpoint_dir.parent if checkpoint_dir.name == "checkpoints" else checkpoint_dir
    stem = export_format.name
    if detector is not None and export_format.detectors and detector != pretrained_detector(source.layout):
        stem += f"-{detector.name}"
    if source.network != "online":
        stem += f"-{source.network}"
    return run_dir / "exported" / f"{stem}{export_format.suffix}"


def export_checkpoint(
    source: str | Path | SourceWeights,
    to: str,
    output: str | Path | None = None,
    network: str = "online",
    detector: str | None = None,
) -> ExportResult:
    """Export a run folder's or checkpoint's encoder to framework `to` for `detector`, written to `output`.

    `detector` (one of DETECTOR_NAMES) defaults to the one the encoder was pretrained as: R-C4 Faster/Mask R-CNN for
    a C4 encoder, R-FPN otherwise.
    """
    export_format = resolve_format(to)
    weights = source if isinstance(source, SourceWeights) else load_source(source, network)
    chosen = choose_detector(weights, export_format, detector)
    conversion = export_format.convert(weights, chosen)
    path = Path(output).expanduser() if output else default_output(weights, export_format, chosen)
    if path.is_dir():
        raise ExportError(f"{path} is a folder: give -o a file name, e.g. {path / ('model' + export_format.suffix)}")
    try:
        export_format.write(conversion, weights, path)
    except OSError as error:
        raise ExportWriteError(f"cannot write {path}: {unwritable_reason(path, error)}") from None
    return ExportResult(
        format=export_format.name, output=path, source=weights.description(), counts=dict(conversion.counts),
        dropped=dict(conversion.dropped), notes=list(conversion.notes),
        detector=conversion.detector if export_format.detectors else None,
    )


def unwritable_reason(path: Path, error: OSError) -> str:
    """Why writing `path` failed, naming the folder or file in the way rather than the temporary file."""
    existing = next((parent for parent in path.parents if parent.exists()), None)
    if existing is not None and not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not error.strerror:
        return f"{type(error).__name__}: {error}"
    reason = error.strerror.lower()
    if isinstance(error, PermissionError) and existing is not None:
        return f"{reason} in {existing}"  # error.filename is the hidden temporary file, unknown to the user
    return f"{reason} ({error.filename})" if error.filename else reason
