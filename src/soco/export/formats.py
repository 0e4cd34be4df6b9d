"""Reading a SoCo checkpoint, splitting its encoder into detector parts, and the registry of export formats."""

from __future__ import annotations

import difflib
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from soco.errors import SocoError

CHECKPOINT_NAME = "last.pt"
NETWORKS = ("online", "target")
# What a SoCo checkpoint holds besides the encoders; none of it is a detector weight.
TRAINING_STATE_ENTRIES = ("predictor", "optimizer", "rng")

BODY_PREFIX = "backbone.body."
FPN_PREFIX = "backbone.fpn."
HEAD_PREFIX = "box_head."
PROJECTOR_PREFIX = "projector."
C4_HEAD_PREFIX = "box_head.layer4."  # the C4 variant's head is ResNet's layer4 (res5)

PART_NAMES = ("backbone", "fpn", "box head")
TensorDict = dict[str, torch.Tensor]


class ExportError(SocoError):
    """A checkpoint cannot be exported as asked."""


class CheckpointNotFoundError(ExportError):
    """The path is neither a run folder (with checkpoints/last.pt) nor a readable checkpoint file."""


class MissingModelError(ExportError):
    """The checkpoint has no encoder weights (`model`, or `target` with --network target)."""


class UnsupportedLayoutError(ExportError):
    """The format needs a part (the FPN, a 4conv1fc head) that this model does not have."""


class UnknownFormatError(ExportError):
    """The format name is not one of FORMAT_NAMES."""


@dataclass
class SourceWeights:
    """The encoder weights of one checkpoint, with what is known about the run that made them."""

    path: Path
    network: str
    state: dict[str, torch.Tensor]
    layout: str
    config: dict | None = None
    step: int | None = None
    entries: tuple[str, ...] = ()  # the checkpoint's top-level keys

    def body(self) -> OrderedDict[str, torch.Tensor]:
        """The ResNet trunk in torchvision resnet names (conv1, bn1, layer1..); layer4 of C4 comes from the head."""
        resnet = _strip(self.state, BODY_PREFIX)
        if self.layout == "c4":
            resnet.update(_strip(self.state, C4_HEAD_PREFIX, keep="layer4."))
        return resnet

    def fpn(self) -> OrderedDict[str, torch.Tensor]:
        """torchvision FeaturePyramidNetwork weights (inner_blocks.*, layer_blocks.*); empty without an FPN."""
        return _strip(self.state, FPN_PREFIX)

    def box_head(self) -> OrderedDict[str, torch.Tensor]:
        """The 4conv1fc head in torchvision FastRCNNConvFCHead names ("0.0.weight"...); empty for C4 or head-off."""
        if self.layout == "c4":
            return OrderedDict()
        return _strip(self.state, HEAD_PREFIX)

    def projector(self) -> OrderedDict[str, torch.Tensor]:
        """The projector MLP, which no detector has."""
        return _strip(self.state, PROJECTOR_PREFIX)

    def depth(self) -> int | None:
        """ResNet depth from the run's configuration, if recorded."""
        model = (self.config or {}).get("model", {})
        return model.get("depth") if isinstance(model, dict) else None

    def description(self) -> str:
        """One line naming the checkpoint, its step, architecture and network."""
        depth = self.depth()
        arch = f"R{depth}-" if depth else ""
        step = f", step {self.step}" if self.step is not None else ""
        names = {"fpn": "FPN", "c4": "C4", "c5": "C5 (no FPN)"}
        head = "" if self.layout == "c4" else (" 4conv1fc head" if self.box_head() else " no box head")
        return f"{self.path}{step}: {arch}{names[self.layout]}{head}, {self.network} network"


@dataclass
class Conversion:
    """Weights renamed for one framework, with the bookkeeping that `soco export` prints."""

    weights: OrderedDict = field(default_factory=OrderedDict)
    counts: dict[str, int] = field(default_factory=dict)  # part name -> tensors written
    dropped: dict[str, int] = field(default_factory=dict)  # source key pattern left out -> number of tensors
    notes: list[str] = field(default_factory=list)

    def add(self, part: str, name: str, tensor) -> None:
        """Record one output tensor under a part."""
        if name in self.weights:
            raise ExportError(f"internal error: two source tensors map to {name}")
        self.weights[name] = tensor
        self.counts[part] = self.counts.get(part, 0) + 1

    def drop(self, reason: str, number: int = 1) -> None:
        """Count tensors left out for a reason."""
        if number:
            self.dropped[reason] = self.dropped.get(reason, 0) + number


@dataclass
class ExportResult:
    """What one export wrote."""

    format: str
    output: Path
    source: str
    counts: dict[str, int]
    dropped: dict[str, int]
    notes: list[str]

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        total = sum(self.counts.values())
        lines = [f"exported {self.source}", f"  to {self.format}: {self.output} ({total} tensors)"]
        for part in PART_NAMES:
            if part in self.counts:
                lines.append(f"    {part}: {self.counts[part]}")
        if self.dropped:
            lines.append("  dropped: " + ", ".join(f"{reason} ({n})" for reason, n in self.dropped.items()))
        lines += [f"  note: {note}" for note in self.notes]
        return lines


@dataclass(frozen=True)
class ExportFormat:
    """One target framework: how to rename the weights and how to write the file."""

    name: str
    suffix: str
    convert: Callable[[SourceWeights], Conversion]
    write: Callable[[Conversion, SourceWeights, Path], None]


ALIASES = {"tv": "torchvision", "d2": "detectron2", "mmdetection": "mmdet", "resnet": "backbone"}


def formats() -> dict[str, ExportFormat]:
    """The export formats by name (imported lazily: each module imports this one)."""
    from soco.export import backbone_format, detectron2_format, mmdet_format, torchvision_format

    return {module.FORMAT.name: module.FORMAT
            for module in (torchvision_format, detectron2_format, mmdet_format, backbone_format)}


FORMAT_NAMES = ("torchvision", "detectron2", "mmdet", "backbone")


def resolve_format(name: str) -> ExportFormat:
    """The format called `name` (or one of its aliases); UnknownFormatError naming the closest otherwise."""
    known = formats()
    key = ALIASES.get(name.lower(), name.lower())
    if key in known:
        return known[key]
    close = difflib.get_close_matches(name.lower(), [*known, *ALIASES], n=1, cutoff=0.4)
    hint = f"; did you mean '{ALIASES.get(close[0], close[0])}'?" if close else ""
    raise UnknownFormatError(f"unknown export format '{name}'{hint} (formats: {', '.join(known)})")


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint file of a run folder (checkpoints/last.pt), of a checkpoints folder, or the file itself."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in (path / "checkpoints" / CHECKPOINT_NAME, path / CHECKPOINT_NAME):
            if candidate.is_file():
                return candidate
        raise CheckpointNotFoundError(
            f"{path} is a folder without checkpoints/{CHECKPOINT_NAME}: not a `soco pretrain` run folder "
            "(give the run folder or a checkpoint file)")
    raise CheckpointNotFoundError(f"{path} does not exist: give a `soco pretrain` run folder or a checkpoint file")


def load_source(path: str | Path, network: str = "online") -> SourceWeights:
    """Read a run folder's or checkpoint file's encoder weights on the CPU with the weights-only unpickler."""
    if network not in NETWORKS:
        raise ExportError(f"network must be one of {list(NETWORKS)}, not {network!r}")
    checkpoint_path = resolve_checkpoint(path)
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the file is not a checkpoint
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointNotFoundError(
            f"{checkpoint_path} is not a readable PyTorch checkpoint ({first_line})") from None
    if not isinstance(checkpoint, dict):
        raise MissingModelError(f"{checkpoint_path} holds a {type(checkpoint).__name__}, not a soco checkpoint")
    entry = "model" if network == "online" else "target"
    state = checkpoint.get(entry)
    if not isinstance(state, dict) or not state:
        entries = ", ".join(map(str, list(checkpoint)[:8])) or "nothing"
        raise MissingModelError(
            f"{checkpoint_path} has no '{entry}' entry with encoder weights (it holds: {entries}); "
            "export needs a checkpoint written by `soco pretrain`")
    tensors = OrderedDict((k, v) for k, v in state.items() if isinstance(v, torch.Tensor))
    if not any(k.startswith(BODY_PREFIX) for k in tensors):
        raise MissingModelError(
            f"{checkpoint_path}: '{entry}' holds no backbone.body.* weights, so it is not a soco ObjectEncoder "
            f"(first keys: {', '.join(list(tensors)[:3]) or 'none'})")
    config = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else None
    step = checkpoint.get("step")
    return SourceWeights(
        path=checkpoint_path, network=network, state=tensors, layout=detect_layout(tensors, config),
        config=config, step=int(step) if isinstance(step, int) else None, entries=tuple(map(str, checkpoint)),
    )


def detect_layout(state: dict[str, torch.Tensor], config: dict | None = None) -> str:
    """'fpn', 'c4' or 'c5' (variant fpn with model.fpn=false: boxes pooled on C5) from the keys."""
    if any(k.startswith(FPN_PREFIX) for k in state):
        layout = "fpn"
    elif any(k.startswith(C4_HEAD_PREFIX) for k in state):
        layout = "c4"
    elif any(k.startswith(BODY_PREFIX + "layer4.") for k in state):
        layout = "c5"
    else:  # a C4 trunk whose res5 head was turned off (model.head=false)
        layout = "c4"
    variant = ((config or {}).get("model") or {}).get("variant") if isinstance(config, dict) else None
    if variant in ("fpn", "c4") and (variant == "c4") != (layout == "c4"):
        raise ExportError(f"the checkpoint's configuration says model.variant={variant} but its weights are "
                          f"laid out as {layout}: the file is inconsistent")
    return layout


def _strip(state: dict[str, torch.Tensor], prefix: str, keep: str = "") -> OrderedDict[str, torch.Tensor]:
    """The entries under `prefix`, renamed to `keep` + the rest of their name."""
    return OrderedDict((keep + k[len(prefix):], v) for k, v in state.items() if k.startswith(prefix))


BLOCK_KEY = re.compile(r"^layer(?P<stage>\d)\.(?P<block>\d+)\.(?P<rest>.+)$")
HEAD_CONV_KEY = re.compile(r"^(?P<index>\d+)\.(?P<sub>[01])\.(?P<field>.+)$")
HEAD_LINEAR_KEY = re.compile(r"^(?P<index>\d+)\.(?P<field>weight|bias)$")
FPN_KEY = re.compile(r"^(?P<kind>inner_blocks|layer_blocks)\.(?P<index>\d+)\.(?P<sub>[01])\.(?P<field>.+)$")


def split_box_head(head: TensorDict) -> tuple[list[TensorDict], list[TensorDict]]:
    """A FastRCNNConvFCHead's weights as ([conv k: {"conv.weight", "norm.<field>"...}], [fc k: {"weight", "bias"}])."""
    convs: dict[int, dict[str, torch.Tensor]] = {}
    linears: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in head.items():
        conv = HEAD_CONV_KEY.match(name)
        linear = HEAD_LINEAR_KEY.match(name)
        if conv:
            # Conv2dNormActivation: index 0 is the conv, 1 its norm (a conv without norm keeps its own bias).
            sub = "conv." if conv["sub"] == "0" else "norm."
            convs.setdefault(int(conv["index"]), {})[sub + conv["field"]] = tensor
        elif linear:
            linears.setdefault(int(linear["index"]), {})[linear["field"]] = tensor
        else:
            raise ExportError(f"box_head.{name} is not a FastRCNNConvFCHead weight")
    return [convs[i] for i in sorted(convs)], [linears[i] for i in sorted(linears)]


def split_fpn(fpn: dict[str, torch.Tensor]) -> dict[tuple[str, int], dict[str, torch.Tensor]]:
    """torchvision FPN weights as {("inner_blocks"|"layer_blocks", level index): {"conv.weight", "norm.<field>"...}}."""
    blocks: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    for name, tensor in fpn.items():
        match = FPN_KEY.match(name)
        if not match:
            raise ExportError(f"backbone.fpn.{name} is not a torchvision FeaturePyramidNetwork weight "
                              "(expected inner_blocks.i.0/1 or layer_blocks.i.0/1)")
        sub = "conv." if match["sub"] == "0" else "norm."
        blocks.setdefault((match["kind"], int(match["index"])), {})[sub + match["field"]] = tensor
    return blocks


def require_fpn_model(source: SourceWeights, format_name: str) -> None:
    """UnsupportedLayoutError unless the model has the FPN that `format_name` needs."""
    if source.layout == "fpn":
        return
    if source.layout == "c4":
        what = "a C4 model (res5 head, no FPN)"
    else:
        what = "a model pretrained without FPN (model.fpn=false)"
    raise UnsupportedLayoutError(
        f"--to {format_name} writes an R-FPN detector's backbone, FPN and box head, but {source.path} is {what}. "
        "Use --to detectron2 or --to mmdet (both have C4 detectors) or --to backbone")


def note_leftovers(source: SourceWeights, conversion: Conversion) -> None:
    """Count the projector and say which checkpoint entries are not exported."""
    conversion.drop(PROJECTOR_PREFIX + "*", len(source.projector()))
    left_out = [entry for entry in (*TRAINING_STATE_ENTRIES, "target" if source.network == "online" else "model")
                if entry in source.entries]
    if left_out:
        conversion.notes.append("not exported: " + ", ".join(left_out))
    if source.layout != "c4" and not source.box_head():
        conversion.notes.append("the model has no box head (model.head=false): the detector's head starts untrained")


def atomic_write(path: Path, writer: Callable[[Path], None]) -> None:
    """Write through a temporary file and rename, so an interrupted export never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        writer(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
