"""MMDetection: a .pth of {"state_dict": {name: tensor}, "meta": {...}} loadable with torch.load(weights_only=True).

MMDetection's ResNet uses torchvision's names (conv1, bn1, layer*.conv/bn, downsample.0/1), so the backbone is
only prefixed; the FPN and the 4conv1fc head become mmcv ConvModules (conv, bn) of neck.* and roi_head.bbox_head.*.
RetinaNet's and FCOS's necks start at C3 (start_level=1), so their lateral_convs.0 is the pretrained P3 block.
"""

from __future__ import annotations

from pathlib import Path

import soco
from soco.export.conversion import Conversion, ExportFormat, note_leftovers, place_parts, split_box_head
from soco.export.detectors import FCOS, RCNN_C4, RCNN_FPN, RETINANET, Detector
from soco.export.source import SourceWeights
from soco.export.writing import plain_tensors, provenance, save_torch

C4_SHARED_HEAD_PREFIX = "roi_head.shared_head."  # ResLayer(stage=3) registers the stage as layer4
NORM_NAME = "bn"  # mmcv names a BN or SyncBN ConvModule norm "bn"
ONE_STAGE_NECK = "neck FPN start_level=1 with norm_cfg BN/SyncBN (its convs have BN and no bias)"
CONFIG_NOTES = {
    RCNN_FPN.name: "MMDetection config: ResNet style='pytorch', norm_cfg BN/SyncBN in the neck and "
                   "a Shared4Conv1FCBBoxHead with norm_cfg; see docs/export.md",
    RCNN_C4.name: "MMDetection config: ResNet and shared_head ResLayer with style='pytorch' and "
                  "torchvision's RGB mean/std; see docs/export.md",
    RETINANET.name: f"MMDetection config: ResNet style='pytorch', {ONE_STAGE_NECK}; see docs/export.md",
    FCOS.name: f"MMDetection config: ResNet style='pytorch' (not the config's 'caffe'), {ONE_STAGE_NECK}, "
               "torchvision's RGB mean/std; see docs/export.md",
}
# What the first extra conv (P6) of the one-stage necks reads: add_extra_convs='on_input' or 'on_output'.
EXTRA_CONVS_INPUT = {RETINANET.name: "C5", FCOS.name: "P5"}


def _conv_module_name(base: str, sub_name: str) -> str:
    """("neck.lateral_convs.0", "norm.weight") -> neck.lateral_convs.0.bn.weight; conv.* stays conv.*."""
    if sub_name.startswith("norm."):
        return f"{base}.{NORM_NAME}.{sub_name[len('norm.'):]}"
    return f"{base}.{sub_name}"


def convert(source: SourceWeights, detector: Detector) -> Conversion:
    """Rename the encoder to the MMDetection names of `detector` (BN num_batches_tracked kept, as in its models)."""
    conversion = Conversion(detector=detector)
    parts = place_parts(source, detector, conversion)
    for name, tensor in parts.trunk.items():
        conversion.add("backbone", "backbone." + name, tensor)
    for name, tensor in parts.res5.items():
        conversion.add("box head", C4_SHARED_HEAD_PREFIX + name, tensor)
    if detector.res5_in_roi_head:
        if parts.res5:
            conversion.notes.append("res5 (the C4 head) is written as roi_head.shared_head.layer4.* (ResLayer)")
        else:
            conversion.notes.append(f"the model has no res5 head ({source.absent_because('res5')}): "
                                    "the shared head starts untrained")
    for (kind, level), block in parts.fpn.items():
        # The neck's ModuleLists start at its start_level: index 0 is the detector's lowest FPN level.
        index = detector.fpn_levels.index(level)
        base = f"neck.{'lateral_convs' if kind == 'inner_blocks' else 'fpn_convs'}.{index}"
        for sub_name, tensor in block.items():
            conversion.add("fpn", _conv_module_name(base, sub_name), tensor)
    head = parts.box_head
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
    note_leftovers(source, conversion, detector)
    if detector.one_stage:
        extra = len(detector.fpn_levels)  # the extra convs follow the FPN's own levels in fpn_convs
        conversion.notes.append(f"not pretrained, so built fresh: neck.fpn_convs.{extra}/{extra + 1} "
                                f"(P6 from {EXTRA_CONVS_INPUT[detector.name]}, P7) and {detector.title}'s bbox_head")
    conversion.notes.append(CONFIG_NOTES[detector.name])
    return conversion


def write(conversion: Conversion, source: SourceWeights, path: Path) -> None:
    """torch.save the tensors with a small meta dict of plain values (weights_only-safe)."""
    meta = {
        **provenance(source),
        "soco_version": soco.__version__,
        "step": source.step if source.step is not None else -1,
        "layout": source.layout,
        "detector": conversion.detector.name,
    }
    if source.config is not None:
        meta["soco_config"] = source.config
    save_torch({"state_dict": plain_tensors(conversion.weights), "meta": meta}, path)


FORMAT = ExportFormat(
    name="mmdet",
    suffix=".pth",
    convert=convert,
    write=write,
    detectors=tuple(CONFIG_NOTES),
)
