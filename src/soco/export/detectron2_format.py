"""Detectron2: a .pkl of {"model": {name: numpy array}, "__author__": "soco", "matching_heuristics": True}.

Names are those of Detectron2's R-FPN / R-C4 / RetinaNet modules without the model's nesting (stem.conv1,
res2.0.conv1.norm, fpn_lateral2, box_head.conv1, box_head.fc1), which its matching heuristics map onto
backbone.bottom_up.*, backbone.fpn_*, roi_heads.box_head.*; the C4 head's res5 is written under its full name
roi_heads.res5.*. RetinaNet's FPN starts at res3 (fpn_lateral3..5); its P6/P7 (backbone.top_block) are not pretrained.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import torch

from soco.export.conversion import BLOCK_KEY, Conversion, ExportFormat, note_leftovers, place_parts, split_box_head
from soco.export.detectors import RCNN_C4, RCNN_FPN, RETINANET, Detector
from soco.export.source import ExportError, SourceWeights
from soco.export.writing import PRODUCER
from soco.files import atomic_write

C4_RES5_PREFIX = "roi_heads."  # Res5ROIHeads keeps res5 as roi_heads.res5
NORM_FIELD = re.compile(r"^bn(?P<index>\d)\.(?P<field>.+)$")
DOWNSAMPLE_FIELD = re.compile(r"^downsample\.(?P<sub>[01])\.(?P<field>.+)$")
PICKLE_PROTOCOL = 4  # readable by any Python 3 from 3.4 on
DROPPED_FIELD = "num_batches_tracked"  # Detectron2's FrozenBN has no such buffer, and BN does not need one
# The config keys whose norm must be BN/SyncBN for the exported norms to load, by detector.
CONFIG_NORMS = {
    RCNN_FPN.name: "MODEL.FPN.NORM, MODEL.ROI_BOX_HEAD.NORM (4 conv, 1 fc)",
    RCNN_C4.name: "MODEL.RESNETS.NORM",
    RETINANET.name: "MODEL.FPN.NORM",
}


def resnet_name(name: str, res5_prefix: str = "") -> str:
    """torchvision resnet name -> Detectron2 ResNet name (bn<k> -> conv<k>.norm, downsample -> shortcut)."""
    if name.startswith("conv1."):
        return "stem." + name
    if name.startswith("bn1."):
        return "stem.conv1.norm." + name[len("bn1."):]
    block = BLOCK_KEY.match(name)
    if not block:
        raise ExportError(f"backbone.body.{name} is not a torchvision ResNet weight")
    stage = int(block["stage"]) + 1
    rest = block["rest"]
    norm = NORM_FIELD.match(rest)
    downsample = DOWNSAMPLE_FIELD.match(rest)
    if norm:
        rest = f"conv{norm['index']}.norm.{norm['field']}"
    elif downsample:
        rest = "shortcut." + ("" if downsample["sub"] == "0" else "norm.") + downsample["field"]
    prefix = res5_prefix if stage == 5 else ""
    return f"{prefix}res{stage}.{block['block']}.{rest}"


def _conv_norm_name(base: str, sub_name: str) -> str:
    """("fpn_lateral2", "conv.weight") -> fpn_lateral2.weight; ("fpn_lateral2", "norm.bias") -> ....norm.bias."""
    return f"{base}.{sub_name[len('conv.'):]}" if sub_name.startswith("conv.") else f"{base}.{sub_name}"


def convert(source: SourceWeights, detector: Detector) -> Conversion:
    """Rename the encoder to the Detectron2 names of `detector`; BN num_batches_tracked is left out."""
    conversion = Conversion(detector=detector)

    def add(part: str, name: str, tensor: torch.Tensor) -> None:
        if name.endswith("." + DROPPED_FIELD):
            conversion.drop("*." + DROPPED_FIELD)
            return
        conversion.add(part, name, tensor.detach().cpu().numpy())

    parts = place_parts(source, detector, conversion)
    for name, tensor in parts.trunk.items():
        add("backbone", resnet_name(name), tensor)
    for name, tensor in parts.res5.items():
        add("box head", resnet_name(name, C4_RES5_PREFIX), tensor)
    if detector.res5_in_roi_head:
        if parts.res5:
            conversion.notes.append("res5 (the C4 head) is written as roi_heads.res5.*, Res5ROIHeads' own names")
        else:
            conversion.notes.append(f"the model has no res5 head ({source.absent_because('res5')}): "
                                    "Detectron2's res5 starts untrained")
    for (kind, level), block in parts.fpn.items():
        base = f"{'fpn_lateral' if kind == 'inner_blocks' else 'fpn_output'}{level}"
        for sub_name, tensor in block.items():
            add("fpn", _conv_norm_name(base, sub_name), tensor)
    head = parts.box_head
    if source.layout == "c5" and head:
        conversion.drop(f"{source.prefixes['box_head']}* (pooled on C5: no Detectron2 model has that head)", len(head))
    elif head:
        convs, linears = split_box_head(head)
        for k, conv in enumerate(convs, start=1):
            for sub_name, tensor in conv.items():
                add("box head", _conv_norm_name(f"box_head.conv{k}", sub_name), tensor)
        for k, linear in enumerate(linears, start=1):
            for field, tensor in linear.items():
                add("box head", f"box_head.fc{k}.{field}", tensor)
    note_leftovers(source, conversion, detector)
    if detector.one_stage:
        conversion.notes.append(f"not pretrained, so built fresh: backbone.top_block.p6/p7 (P6 from res5, P7) and "
                                f"{detector.title}'s head")
    conversion.notes.append("Detectron2 config: MODEL.RESNETS.STRIDE_IN_1X1=False, INPUT.FORMAT=RGB with ImageNet "
                            f"mean/std, BN/SyncBN in {CONFIG_NORMS[detector.name]}; see docs/export.md")
    return conversion


def write(conversion: Conversion, source: SourceWeights, path: Path) -> None:
    """Pickle the numpy weights with the header that makes Detectron2 apply its name-matching heuristics."""
    if path.suffix != ".pkl":
        # Detectron2 unpickles only .pkl names; any other name goes to torch.load, which cannot read numpy arrays.
        raise ExportError(f"a Detectron2 checkpoint must be named *.pkl (got {path.name})")
    payload = {"model": dict(conversion.weights), "__author__": PRODUCER, "matching_heuristics": True}

    def dump(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            _PortablePickler(handle, protocol=PICKLE_PROTOCOL).dump(payload)

    atomic_write(path, dump)


def _rebuild_array(array: np.ndarray):
    """Reduce an array to ndarray(shape, dtype string, bytearray): readable by NumPy 1.x and 2.x alike."""
    if not array.flags.c_contiguous:
        array = array.copy(order="C")  # not np.ascontiguousarray, which turns a 0-d array into a 1-d one
    # NumPy 2 pickles arrays through numpy._core, a module NumPy 1.x (still common beside Detectron2) lacks.
    # A bytearray buffer keeps the unpickled array writable, so torch.from_numpy takes it without a warning.
    return np.ndarray, (array.shape, array.dtype.str, bytearray(array.tobytes()))


class _PortablePickler(pickle.Pickler):
    """A pickler that writes numpy arrays without naming NumPy's private modules."""

    dispatch_table = {np.ndarray: _rebuild_array}


FORMAT = ExportFormat(
    name="detectron2",
    suffix=".pkl",
    convert=convert,
    write=write,
    detectors=tuple(CONFIG_NORMS),
)
