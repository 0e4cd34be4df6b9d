"""MMDetection: a .pth of {"state_dict": {name: tensor}, "meta": {...}} loadable with torch.load(weights_only=True).

MMDetection's ResNet uses torchvision's names (conv1, bn1, layer*.conv/bn, downsample.0/1), so the backbone is
only prefixed; the FPN and the 4conv1fc head become mmcv ConvModules (conv, bn) of neck.* and roi_head.bbox_head.*.
"""

from __future__ import annotations

from pathlib import Path

import soco
from soco.export.conversion import (
    Conversion,
    ExportFormat,
    note_leftovers,
    split_box_head,
    split_fpn,
)
from soco.export.source import SourceWeights
from soco.export.writing import plain_tensors, provenance, save_torch

C4_SHARED_HEAD_PREFIX = "roi_head.shared_head."  # ResLayer(stage=3) registers the stage as layer4
NORM_NAME = "bn"  # mmcv names a BN or SyncBN ConvModule norm "bn"


def _conv_module_name(base: str, sub_name: str) -> str:
    """("neck.lateral_convs.0", "norm.weight") -> neck.lateral_convs.0.bn.weight; conv.* stays conv.*."""
    if sub_name.startswith("norm."):
        return f"{base}.{NORM_NAME}.{sub_name[len('norm.'):]}"
    return f"{base}.{sub_name}"


def convert(source: SourceWeights) -> Conversion:
    """Rename the encoder to MMDetection names (BN buffers, num_batches_tracked included, as in its state dicts)."""
    conversion = Conversion()
    c4 = source.layout == "c4"
    for name, tensor in source.body().items():
        if c4 and name.startswith("layer4."):
            conversion.add("box head", C4_SHARED_HEAD_PREFIX + name, tensor)
        else:
            conversion.add("backbone", "backbone." + name, tensor)
    if c4:
        if "box head" in conversion.counts:
            conversion.notes.append("res5 (the C4 head) is written as roi_head.shared_head.layer4.* (ResLayer)")
        else:
            conversion.notes.append(f"the model has no res5 head ({source.absent_because('res5')}): "
                                    "the shared head starts untrained")
    for (kind, index), block in split_fpn(source.fpn()).items():
        base = f"neck.{'lateral_convs' if kind == 'inner_blocks' else 'fpn_convs'}.{index}"
        for sub_name, tensor in block.items():
            conversion.add("fpn", _conv_module_name(base, sub_name), tensor)
    head = source.box_head()
    if source.layout == "c5" and head:
        conversion.drop(f"{source.prefixes['box_head']}* (pooled on C5: no MMDetection model has that head)", len(head))
    elif head:
        convs, linears = split_box_head(head)
        for k, conv in enumerate(convs):
            for sub_name, tensor in conv.items():
                conversion.add("box head", _conv_module_name(f"roi_head.bbox_head.shared_convs.{k}", sub_name), tensor)
        for k, linear in enumerate(linears):
            for field, tensor in linear.items():
                conversion.add("box head", f"roi_head.bbox_head.shared_fcs.{k}.{field}", tensor)
    note_leftovers(source, conversion)
    if c4:
        conversion.notes.append("MMDetection config: ResNet and shared_head ResLayer with style='pytorch' and "
                                "torchvision's RGB mean/std; see docs/export.md")
    else:
        conversion.notes.append("MMDetection config: ResNet style='pytorch', norm_cfg BN/SyncBN in the neck and "
                                "a Shared4Conv1FCBBoxHead with norm_cfg; see docs/export.md")
    return conversion


def write(conversion: Conversion, source: SourceWeights, path: Path) -> None:
    """torch.save the tensors with a small meta dict of plain values (weights_only-safe)."""
    meta = {
        **provenance(source),
        "soco_version": soco.__version__,
        "step": source.step if source.step is not None else -1,
        "layout": source.layout,
    }
    if source.config is not None:
        meta["soco_config"] = source.config
    save_torch({"state_dict": plain_tensors(conversion.weights), "meta": meta}, path)


FORMAT = ExportFormat(
    name="mmdet",
    suffix=".pth",
    convert=convert,
    write=write,
)
