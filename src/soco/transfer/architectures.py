"""The names of `soco transfer`'s detectors, importable without torch (the command line's choices)."""

ARCHITECTURES = ("faster_rcnn", "mask_rcnn", "faster_rcnn_c4", "retinanet", "fcos")
TWO_STAGE = ("faster_rcnn", "mask_rcnn", "faster_rcnn_c4")
SINGLE_STAGE = ("retinanet", "fcos")
