"""The registry of export formats, and `export_checkpoint`: read a checkpoint, convert its encoder, write the file."""

from __future__ import annotations

import difflib
from pathlib import Path

from soco.export import (
    backbone_format,
    detectron2_format,
    mmdet_format,
    torchvision_format,
)
from soco.export.conversion import Conversion, ExportFormat, ExportResult
from soco.export.source import (
    CHECKPOINT_NAME,
    NETWORKS,
    CheckpointNotFoundError,
    ExportError,
    MissingModelError,
    SourceWeights,
    UnknownFormatError,
    UnsupportedLayoutError,
    load_source,
    resolve_checkpoint,
)

# Names defined in source.py and conversion.py stay importable from here, where they were before the split.
__all__ = [
    "ALIASES", "CHECKPOINT_NAME", "FORMATS", "FORMAT_NAMES", "NETWORKS", "CheckpointNotFoundError", "Conversion",
    "ExportError", "ExportFormat", "ExportResult", "MissingModelError", "SourceWeights", "UnknownFormatError",
    "UnsupportedLayoutError", "default_output", "export_checkpoint", "formats", "load_source", "resolve_checkpoint",
    "resolve_format",
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


def default_output(source: SourceWeights, export_format: ExportFormat) -> Path:
    """Where the export goes without -o: exported/<format><suffix> in the run folder."""
    checkpoint_dir = source.path.parent
    run_dir = checkpoint_dir.parent if checkpoint_dir.name == "checkpoints" else checkpoint_dir
    stem = export_format.name if source.network == "online" else f"{export_format.name}-target"
    return run_dir / "exported" / f"{stem}{export_format.suffix}"


def export_checkpoint(
    source: str | Path | SourceWeights,
    to: str,
    output: str | Path | None = None,
    network: str = "online",
) -> ExportResult:
    """Export a run folder's or checkpoint's encoder to framework `to`, written to `output`."""
    export_format = resolve_format(to)
    weights = source if isinstance(source, SourceWeights) else load_source(source, network)
    conversion = export_format.convert(weights)
    path = Path(output).expanduser() if output else default_output(weights, export_format)
    if path.is_dir():
        raise ExportError(f"{path} is a folder: give -o a file name, e.g. {path / ('model' + export_format.suffix)}")
    export_format.write(conversion, weights, path)
    return ExportResult(
        format=export_format.name, output=path, source=weights.description(), counts=dict(conversion.counts),
        dropped=dict(conversion.dropped), notes=list(conversion.notes),
    )
