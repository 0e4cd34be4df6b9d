"""COCO AP with pycocotools: ground truth from a COCO dict, detections from a torchvision detector's outputs."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import torch

from soco.errors import SocoError

__all__ = ["STAT_NAMES", "detections_to_coco", "coco_evaluate", "summary_line", "to_numpy_boxes"]

# The order of COCOeval.stats for bbox and segm.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _pycocotools():
    try:
        from pycocotools import mask as mask_utils
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise SocoError("COCO AP needs pycocotools: pip install pycocotools") from None
    return COCO, COCOeval, mask_utils


def detections_to_coco(
    image_id: int,
    output: dict,
    label_to_category: dict[int, int],
    masks: bool = False,
    mask_threshold: float = 0.5,
) -> list[dict]:
    """One image's detector output ({boxes XYXY, scores, labels[, masks]}) as COCO result entries (bbox XYWH)."""
    boxes = output["boxes"].detach().float().cpu().numpy().reshape(-1, 4)
    scores = output["scores"].detach().float().cpu().numpy().reshape(-1)
    labels = output["labels"].detach().cpu().numpy().reshape(-1)
    rles = None
    if masks:
        _, _, mask_utils = _pycocotools()
        # Mask R-CNN returns (N, 1, H, W) probabilities pasted into the image.
        binary = (output["masks"].detach().cpu().numpy().reshape(len(boxes), *output["masks"].shape[-2:])
                  > mask_threshold)
        rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in binary]
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")  # JSON-friendly, as COCO result files keep it
    results = []
    for i, (box, score, label) in enumerate(zip(boxes, scores, labels)):
        entry = {
            "image_id": int(image_id),
            "category_id": int(label_to_category[int(label)]),
            "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
            "score": float(score),
        }
        if rles is not None:
            entry["segmentation"] = rles[i]
        results.append(entry)
    return results


def _ground_truth(data: dict) -> dict:
    """A copy of a COCO dict that pycocotools can evaluate: every annotation with id, area and iscrowd."""
    gt = {
        "images": [{k: v for k, v in image.items()} for image in data["images"]],
        "categories": copy.deepcopy(data["categories"]),
        "annotations": [],
    }
    for i, ann in enumerate(data["annotations"], start=1):
        ann = dict(ann)
        ann.setdefault("id", i)
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
        gt["annotations"].append(ann)
    ids = [ann["id"] for ann in gt["annotations"]]
    if len(set(ids)) != len(ids):
        # pycocotools indexes annotations by id, so duplicates would silently drop boxes.
        for i, ann in enumerate(gt["annotations"], start=1):
            ann["id"] = i
    return gt


def coco_evaluate(data: dict, detections: list[dict], iou_type: str = "bbox") -> dict[str, float | None]:
    """COCO metrics (AP, AP50, AP75, APs/m/l, AR...) of detections against the ground truth in `data`.

    Values are fractions in [0, 1]; None where COCOeval reports -1 (no ground truth in that bucket).
    Empty detections score 0 wherever there is ground truth.
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', not {iou_type!r}")
    COCO, COCOeval, _ = _pycocotools()
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = _ground_truth(data)
        gt.createIndex()
        if detections:
            dt = gt.loadRes(copy.deepcopy(detections))
        else:
            # loadRes cannot take an empty list; an empty result set evaluates to 0 the same way.
            dt = COCO()
            dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": []}
            dt.createIndex()
        evaluator = COCOeval(gt, dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: (None if value < 0 else float(value)) for name, value in zip(STAT_NAMES, evaluator.stats)}


def summary_line(metrics: dict[str, float | None]) -> str:
    """'AP 41.2  AP50 60.1  AP75 44.0' in percent."""
    def _pct(value):
        return "n/a" if value is None else f"{100 * value:.1f}"

    return "  ".join(f"{name} {_pct(metrics.get(name))}" for name in ("AP", "AP50", "AP75"))


def to_numpy_boxes(boxes: torch.Tensor) -> np.ndarray:
    """Boxes of any tensor type as a float (N, 4) array."""
    return boxes.detach().as_subclass(torch.Tensor).float().cpu().numpy().reshape(-1, 4)
