"""What every export format shares: the renamed weights and their bookkeeping, and placing the parts in a detector."""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from soco.export.detectors import Detector, pretrained_detector
from soco.export.source import ExportError, SourceWeights, TensorDict, UnsupportedLayoutError

PART_NAMES = ("backbone", "fpn", "box head")
RES5_PREFIX = "layer4."  # torchvision's name of res5 (C5)
FPN_FIRST_LEVEL = 2  # torchvision FPN block i is level P(i + 2): SoCo's FPN is built on C2..C5

BLOCK_KEY = re.compile(r"^layer(?P<stage>\d)\.(?P<block>\d+)\.(?P<rest>.+)$")
HEAD_CONV_KEY = re.compile(r"^(?P<index>\d+)\.(?P<sub>[01])\.(?P<field>.+)$")
HEAD_LINEAR_KEY = re.compile(r"^(?P<index>\d+)\.(?P<field>weight|bias)$")
FPN_KEY = re.compile(r"^(?P<kind>inner_blocks|layer_blocks)\.(?P<index>\d+)\.(?P<sub>[01])\.(?P<field>.+)$")


@dataclass
class Conversion:
    """Weights renamed for one framework, with the bookkeeping that `soco export` prints."""

    weights: OrderedDict = field(default_factory=OrderedDict)
    counts: dict[str, int] = field(default_factory=dict)  # part name -> tensors written
    dropped: dict[str, int] = field(default_factory=dict)  # source key pattern left out -> number of tensors
    notes: list[str] = field(default_factory=list)
    detector: Detector | None = None  # what the weights were placed for; None for a plain ResNet

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
    detector: Detector | None = None  # None for a format written for any detector (a plain ResNet)

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        total = sum(self.counts.values())
        lines = [f"exported {self.source}", f"  to {self.format}: {self.output} ({total} tensors)"]
        if self.detector is not None:
            lines.append(f"  for {self.detector.title} (--detector {self.detector.name})")
        for part in PART_NAMES:
            if part in self.counts:
                lines.append(f"    {part}: {self.counts[part]}")
        if self.dropped:
            # one reason a line: every pretrained tensor the detector cannot take is named here
            lines.append("  dropped:")
            lines += [f"    {reason} ({n})" for reason, n in self.dropped.items()]
        lines += [f"  note: {note}" for note in self.notes]
        return lines


@dataclass(frozen=True)
class ExportFormat:
    """One target framework: how to rename the weights and how to write the file."""

    name: str
    suffix: str
    convert: Callable[[SourceWeights, Detector], Conversion]
    write: Callable[[Conversion, SourceWeights, Path], None]
    detectors: tuple[str, ...] = ()  # the --detector names it writes for; empty: a plain ResNet for any detector


@dataclass
class DetectorParts:
    """A source's pretrained parts as one detector takes them, still in torchvision names."""

    trunk: OrderedDict  # conv1, bn1, layer1.. (layer4 too unless res5 is in the RoI head)
    res5: OrderedDict  # layer4.* for a C4 detector's RoI head
    fpn: dict  # (kind, level 2..5) -> {"conv.weight", "norm.<field>"...}, only the levels the detector builds
    box_head: TensorDict  # the 4conv1fc head, when the detector has one


def place_parts(source: SourceWeights, detector: Detector, conversion: Conversion) -> DetectorParts:
    """Split the source's parts the way `detector` is built; what it has no room for is counted as dropped."""
    body = source.body()
    in_roi_head = {k for k in body if detector.res5_in_roi_head and k.startswith(RES5_PREFIX)}
    trunk = OrderedDict((k, v) for k, v in body.items() if k not in in_roi_head)
    res5 = OrderedDict((k, v) for k, v in body.items() if k in in_roi_head)
    if not detector.res5_in_roi_head and source.layout == "c4":
        if any(k.startswith(RES5_PREFIX) for k in trunk):
            conversion.notes.append("res5, pretrained as the C4 RoI head, is written as the backbone's res5 (C5)")
        else:
            conversion.notes.append(f"the model has no res5 ({source.absent_because('res5')}): "
                                    "the detector's res5 starts from its own initialisation")
    fpn_prefix = source.prefixes["fpn"]
    fpn = {}
    for (kind, index), block in split_fpn(source.fpn()).items():
        level = index + FPN_FIRST_LEVEL
        if level in detector.fpn_levels:
            fpn[(kind, level)] = block
        elif detector.fpn_levels:
            conversion.drop(f"{fpn_prefix}{kind}.{index}.* ({detector.fpn_level_reason(level)})", len(block))
    if source.fpn() and not detector.fpn_levels:
        conversion.drop(f"{fpn_prefix}* ({detector.fpn_level_reason(FPN_FIRST_LEVEL)})", len(source.fpn()))
    box_head = source.box_head()
    if box_head and not detector.box_head:
        conversion.drop(f"{source.prefixes['box_head']}* ({detector.box_head_reason()})", len(box_head))
        box_head = OrderedDict()
    return DetectorParts(trunk=trunk, res5=res5, fpn=fpn, box_head=box_head)


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


def split_fpn(fpn: TensorDict) -> dict[tuple[str, int], dict[str, torch.Tensor]]:
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
    if source.fpn():
        return
    if source.layout == "c4":
        what = "a C4 model (res5 head, no FPN)"
    elif source.layout == "c5":
        what = f"a model pretrained without FPN ({source.absent_because('fpn')})"
    else:  # an FPN model whose checkpoint does not list the FPN among the parts to export
        what = f"a model exported without its FPN ({source.absent_because('fpn')})"
    raise UnsupportedLayoutError(
        f"--to {format_name} writes an R-FPN detector's backbone, FPN and box head, but {source.path} is {what}. "
        "Use --to detectron2 or --to mmdet (both have C4 detectors) or --to backbone")


def note_leftovers(source: SourceWeights, conversion: Conversion, detector: Detector | None = None) -> None:
    """Count the projector and the unlisted tensors, and say which checkpoint entries and parts are not exported.

    `detector` (by default the one the encoder was pretrained as) decides which absent parts are worth a note.
    """
    detector = detector or pretrained_detector(source.layout)
    conversion.drop(source.projector_prefix + "*", len(source.projector()))
    for pattern, number in source.unlisted().items():
        conversion.drop(pattern, number)
    left_out = source.training_entries()
    if left_out:
        conversion.notes.append("not exported: " + ", ".join(left_out))
    if detector.fpn_levels and not source.fpn():
        conversion.notes.append(f"the model has no FPN ({source.absent_because('fpn')}): "
                                "an FPN detector's FPN starts from random weights")
    if detector.box_head and not source.box_head():
        conversion.notes.append(f"the model has no box head ({source.absent_because('box_head')}): "
                                "the detector's head starts untrained")
