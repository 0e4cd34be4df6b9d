"""`soco export`: write a pretraining run's weights in the form a detector framework loads."""

from __future__ import annotations

import argparse

# Kept here rather than imported from soco.export, so that building the command line does not import torch.
FORMAT_HELP = {
    "torchvision": "backbone.* and roi_heads.box_head.* of fasterrcnn/maskrcnn_resnet50_fpn_v2 (.pt or .safetensors)",
    "detectron2": "Detectron2 .pkl for R-FPN with the 4conv1fc head, R-C4 or RetinaNet",
    "mmdet": "MMDetection .pth for R-FPN with Shared4Conv1FCBBoxHead, R-C4, RetinaNet or FCOS",
    "backbone": "torchvision ResNet state dict without fc, for any other detector (.pt or .safetensors)",
}
DETECTOR_HELP = {
    "rcnn-fpn": "Faster/Mask R-CNN R-FPN with the 4conv1fc box head (default for an FPN or FPN-less encoder)",
    "rcnn-c4": "Faster/Mask R-CNN R-C4, res5 in the RoI head (default for a C4 encoder)",
    "retinanet": "RetinaNet: backbone and FPN P3-P5; P2 and the box head are dropped, P6/P7 start fresh",
    "fcos": "FCOS (mmdet only): as retinanet",
}
NETWORKS = ("online", "target")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `soco export`."""
    parser.epilog = ("formats: " + "; ".join(f"{name}: {text}" for name, text in FORMAT_HELP.items())
                     + ". The detector settings to match are in docs/export.md.")
    parser.add_argument("source", metavar="CHECKPOINT_OR_RUN",
                        help="a `soco pretrain` run folder (uses checkpoints/last.pt) or a checkpoint file")
    parser.add_argument("--to", required=True, metavar="FORMAT", help=f"one of: {', '.join(FORMAT_HELP)}")
    parser.add_argument("-o", "--output", default=None, metavar="FILE",
                        help="file to write (default: <run>/exported/<format>[-<detector>].pt|.pkl|.pth)")
    parser.add_argument("--network", default="online", choices=NETWORKS,
                        help="which encoder to export: the online one (default) or the EMA target")
    parser.add_argument("--detector", default=None, choices=DETECTOR_HELP, metavar="DETECTOR",
                        help="the detector to write for (detectron2, mmdet): "
                             + "; ".join(f"{name}: {text}" for name, text in DETECTOR_HELP.items()))


def run(args: argparse.Namespace) -> int:
    """Run `soco export`; bad input raises SocoError subclasses, which the caller prints."""
    from soco.export.formats import export_checkpoint

    result = export_checkpoint(args.source, args.to, args.output, network=args.network, detector=args.detector)
    for line in result.lines():
        print(line)
    return 0
