"""Writes the one-stage reference key lists (RetinaNet, FCOS) from the frameworks' module conventions; see README.md.

Run from the repository root: python tests/export/reference_keys/derive_one_stage.py. It uses neither soco
nor the frameworks, only the structural facts the README lists, applied to ResNet-50.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
BLOCKS = (3, 4, 6, 3)  # ResNet-50
STEM = 64
FPN = 256
BN_FIELDS = ("weight", "bias", "running_mean", "running_var")
COUNTER = "num_batches_tracked"  # BN/SyncBN buffer; Detectron2's .pkl leaves it out, MMDetection keeps it


def bn(prefix: str, channels: int, counter: bool) -> dict[str, list[int]]:
    """A BatchNorm2d's tensors."""
    keys = {f"{prefix}.{field}": [channels] for field in BN_FIELDS}
    if counter:
        keys[f"{prefix}.{COUNTER}"] = []
    return keys


def bottleneck_stages():
    """(stage 1..4, block, in channels, width, out channels, has a projection shortcut) of ResNet-50's blocks."""
    in_channels = STEM
    for stage, blocks in enumerate(BLOCKS, start=1):
        width, out = 64 * 2 ** (stage - 1), 256 * 2 ** (stage - 1)
        for block in range(blocks):
            yield stage, block, in_channels, width, out, block == 0
            in_channels = out


def detectron2_resnet(counter: bool) -> dict[str, list[int]]:
    """Detectron2 ResNet names without nesting: stem.conv1(.norm), res{2..5}.b.conv{1..3}(.norm), .shortcut(.norm)."""
    keys = {"stem.conv1.weight": [STEM, 3, 7, 7], **bn("stem.conv1.norm", STEM, counter)}
    for stage, block, in_channels, width, out, projection in bottleneck_stages():
        prefix = f"res{stage + 1}.{block}"
        for k, (cin, cout, size) in enumerate(((in_channels, width, 1), (width, width, 3), (width, out, 1)), 1):
            keys[f"{prefix}.conv{k}.weight"] = [cout, cin, size, size]
            keys.update(bn(f"{prefix}.conv{k}.norm", cout, counter))
        if projection:
            keys[f"{prefix}.shortcut.weight"] = [out, in_channels, 1, 1]
            keys.update(bn(f"{prefix}.shortcut.norm", out, counter))
    return keys


def detectron2_retinanet_fpn(counter: bool) -> dict[str, list[int]]:
    """FPN(in_features res3..res5, norm BN) with LastLevelP6P7(2048, 256): fpn_lateral/output3..5, top_block.p6/p7."""
    keys = {}
    for level, channels in ((3, 512), (4, 1024), (5, 2048)):
        keys[f"fpn_lateral{level}.weight"] = [FPN, channels, 1, 1]  # use_bias = norm == "": no bias with BN
        keys.update(bn(f"fpn_lateral{level}.norm", FPN, counter))
        keys[f"fpn_output{level}.weight"] = [FPN, FPN, 3, 3]
        keys.update(bn(f"fpn_output{level}.norm", FPN, counter))
    # LastLevelP6P7 holds plain nn.Conv2d (bias, no norm), P6 on res5 (2048 channels), P7 on P6.
    keys.update({"top_block.p6.weight": [FPN, 2048, 3, 3], "top_block.p6.bias": [FPN],
                 "top_block.p7.weight": [FPN, FPN, 3, 3], "top_block.p7.bias": [FPN]})
    return keys


def mmdet_resnet() -> dict[str, list[int]]:
    """MMDetection ResNet (torchvision names) under backbone.*, num_batches_tracked included."""
    keys = {"backbone.conv1.weight": [STEM, 3, 7, 7], **bn("backbone.bn1", STEM, True)}
    for stage, block, in_channels, width, out, projection in bottleneck_stages():
        prefix = f"backbone.layer{stage}.{block}"
        for k, (cin, cout, size) in enumerate(((in_channels, width, 1), (width, width, 3), (width, out, 1)), 1):
            keys[f"{prefix}.conv{k}.weight"] = [cout, cin, size, size]
            keys.update(bn(f"{prefix}.bn{k}", cout, True))
        if projection:
            keys[f"{prefix}.downsample.0.weight"] = [out, in_channels, 1, 1]
            keys.update(bn(f"{prefix}.downsample.1", out, True))
    return keys


def mmdet_one_stage_neck(extra_on_input: bool) -> dict[str, list[int]]:
    """FPN(in_channels [256, 512, 1024, 2048], start_level=1, num_outs=5, norm_cfg BN) ConvModules under neck.*."""
    keys = {}
    for index, channels in enumerate((512, 1024, 2048)):  # start_level=1: lateral 0 is C3
        keys[f"neck.lateral_convs.{index}.conv.weight"] = [FPN, channels, 1, 1]
        keys.update(bn(f"neck.lateral_convs.{index}.bn", FPN, True))
        keys[f"neck.fpn_convs.{index}.conv.weight"] = [FPN, FPN, 3, 3]
        keys.update(bn(f"neck.fpn_convs.{index}.bn", FPN, True))
    # extra_levels = num_outs - backbone_end_level + start_level = 5 - 4 + 1 = 2 stride-2 3x3 ConvModules,
    # appended to fpn_convs; the first reads C5 ('on_input', 2048 channels) or P5 ('on_output', 256).
    for index, channels in ((3, 2048 if extra_on_input else FPN), (4, FPN)):
        keys[f"neck.fpn_convs.{index}.conv.weight"] = [FPN, channels, 3, 3]
        keys.update(bn(f"neck.fpn_convs.{index}.bn", FPN, True))
    return keys


D2_SOURCES = [
    "facebookresearch/detectron2: detectron2/modeling/backbone/resnet.py (BasicStem, BottleneckBlock, "
    "build_resnet_backbone builds res2..res5 up to the last OUT_FEATURES stage)",
    "detectron2/modeling/backbone/fpn.py (build_retinanet_resnet_fpn_backbone: FPN on IN_FEATURES res3..res5, "
    "top_block=LastLevelP6P7(in_channels=res5 channels, out_channels), registered as top_block; "
    "LastLevelP6P7.p6/p7 are nn.Conv2d 3x3 stride 2 with bias)",
    "configs/Base-RetinaNet.yaml (RESNETS.OUT_FEATURES and FPN.IN_FEATURES [res3, res4, res5])",
    "detectron2/layers/wrappers.py (Conv2d keeps its norm as .norm)",
]
MMDET_SOURCES = [
    "open-mmlab/mmdetection: mmdet/models/backbones/resnet.py, mmdet/models/layers/res_layer.py (as for R-FPN)",
    "mmdet/models/necks/fpn.py (lateral_convs/fpn_convs for i in range(start_level, backbone_end_level); "
    "extra_levels = num_outs - backbone_end_level + start_level ConvModules appended to fpn_convs, the first "
    "on in_channels[backbone_end_level - 1] when add_extra_convs='on_input', on out_channels otherwise)",
    "mmcv/cnn/bricks/conv_module.py (ConvModule conv + norm 'bn', no conv bias with a norm)",
]


def write(name: str, payload: dict) -> None:
    """Write one reference list as indented JSON."""
    (HERE / name).write_text(json.dumps(payload, indent=1) + "\n")


def main() -> None:
    """Write the three lists."""
    checkpoint_keys = {**detectron2_resnet(False), **detectron2_retinanet_fpn(False)}
    model_keys = {
        **{f"backbone.bottom_up.{k}": v for k, v in detectron2_resnet(True).items()},
        **{f"backbone.{k}": v for k, v in detectron2_retinanet_fpn(True).items()},
    }
    write("detectron2_retinanet_r50_fpn.json", {
        "description": "Detectron2 RetinaNet R50-FPN (configs/COCO-Detection/retinanet_R_50_FPN_1x.yaml) with "
                       "RESNETS.NORM and FPN.NORM = BN/SyncBN: the backbone (bottom_up and FPN P3-P7). "
                       "checkpoint_keys: the names a .pkl would carry for every one of these tensors "
                       "(num_batches_tracked left out); model_keys: the model's state_dict names. Derived, "
                       "see README.md.",
        "sources": D2_SOURCES,
        "checkpoint_keys": checkpoint_keys,
        "model_keys": model_keys,
    })
    for name, detector, config, on_input in (
        ("mmdet_retinanet_r50_fpn.json", "RetinaNet", "configs/retinanet/retinanet_r50_fpn_1x_coco.py, "
         "add_extra_convs='on_input'", True),
        ("mmdet_fcos_r50_fpn.json", "FCOS", "configs/fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py, "
         "add_extra_convs='on_output'", False),
    ):
        write(name, {
            "description": f"MMDetection {detector} R50-FPN "
                           f"({config}, num_outs=5, start_level=1) with norm_cfg BN/SyncBN in backbone and neck: "
                           "the model's state_dict names of backbone and neck. Derived, see README.md.",
            "sources": MMDET_SOURCES,
            "keys": {**mmdet_resnet(), **mmdet_one_stage_neck(on_input)},
        })


if __name__ == "__main__":
    main()
