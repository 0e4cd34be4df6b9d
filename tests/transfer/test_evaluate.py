"""Tests of soco.transfer.evaluate: COCO AP on hand-built cases whose values are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")

from soco.transfer.evaluate import coco_evaluate, detections_to_coco, summary_line  # noqa: E402

GT_BOXES = {1: [[10, 10, 40, 40], [100, 60, 50, 30]], 2: [[20, 120, 60, 60]]}  # XYWH per image


def _gt(boxes=GT_BOXES, crowd=()):
    images = [{"id": i, "file_name": f"{i}.png", "width": 200, "height": 200} for i in sorted(boxes)]
    annotations = []
    for image_id, image_boxes in sorted(boxes.items()):
        for box in image_boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 7,
                                "bbox": list(map(float, box)), "area": float(box[2] * box[3]),
                                "iscrowd": int(len(annotations) + 1 in crowd)})
    return {"images": images, "annotations": annotations, "categories": [{"id": 7, "name": "thing"}]}


def _dets(shift_x: float = 0.0, score: float = 0.9):
    return [{"image_id": image_id, "category_id": 7, "score": score,
             "bbox": [x + shift_x * w, y, w, h]}
            for image_id, image_boxes in sorted(GT_BOXES.items()) for x, y, w, h in image_boxes]


def test_perfect_predictions_give_ap_one():
    metrics = coco_evaluate(_gt(), _dets())
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["AP50"] == pytest.approx(1.0) and metrics["AP75"] == pytest.approx(1.0)
    assert metrics["AR100"] == pytest.approx(1.0)


def test_shifted_predictions_give_lower_ap():
    # Half a box sideways: IoU = 0.5 / 1.5 = 1/3 < 0.5, nothing matches at any threshold.
    half = coco_evaluate(_gt(), _dets(shift_x=0.5))
    assert half["AP"] == 0.0 and half["AP50"] == 0.0
    # A tenth of a box: IoU = 0.9 / 1.1 = 0.818, a match at the thresholds 0.50 ... 0.80 (7 of 10).
    tenth = coco_evaluate(_gt(), _dets(shift_x=0.1))
    assert tenth["AP50"] == pytest.approx(1.0) and tenth["AP75"] == pytest.approx(1.0)
    assert tenth["AP"] == pytest.approx(0.7)


def test_empty_predictions_give_zero():
    metrics = coco_evaluate(_gt(), [])
    assert metrics["AP"] == 0.0 and metrics["AP50"] == 0.0 and metrics["AR100"] == 0.0


def test_hand_computed_precision_recall_curve():
    # Two objects; ranked detections: hit (p=1, r=.5), false alarm (p=.5, r=.5), hit (p=2/3, r=1).
    # 101-point interpolated precision: 1.0 for recall 0.00..0.50 (51 points), 2/3 for 0.51..1.00 (50).
    gt = _gt({1: [[10, 10, 20, 20], [50, 50, 20, 20]]})
    dets = [
        {"image_id": 1, "category_id": 7, "bbox": [10, 10, 20, 20], "score": 0.9},
        {"image_id": 1, "category_id": 7, "bbox": [120, 120, 20, 20], "score": 0.8},
        {"image_id": 1, "category_id": 7, "bbox": [50, 50, 20, 20], "score": 0.7},
    ]
    expected = (51 * 1.0 + 50 * (2 / 3)) / 101
    metrics = coco_evaluate(gt, dets)
    assert metrics["AP"] == pytest.approx(expected, abs=1e-9)
    assert metrics["AP50"] == pytest.approx(expected, abs=1e-9)
    # All boxes are 20x20 = 400 px^2: "small"; the medium and large buckets have no object.
    assert metrics["APs"] == pytest.approx(expected, abs=1e-9)
    assert metrics["APm"] is None and metrics["APl"] is None
    assert summary_line(metrics) == "AP 83.5  AP50 83.5  AP75 83.5"


def test_crowd_boxes_are_ignored_not_missed():
    gt = _gt(crowd=(2,))  # the second box of image 1 is a crowd region
    dets = [d for d in _dets() if d["bbox"][0] != 100]
    assert coco_evaluate(gt, dets)["AP"] == pytest.approx(1.0)


def test_ground_truth_without_ids_or_area_is_completed():
    gt = _gt()
    for ann in gt["annotations"]:
        del ann["id"], ann["area"], ann["iscrowd"]
    assert coco_evaluate(gt, _dets())["AP"] == pytest.approx(1.0)


def test_detector_outputs_become_coco_results():
    output = {"boxes": torch.tensor([[10.0, 20.0, 50.0, 80.0]]), "scores": torch.tensor([0.75]),
              "labels": torch.tensor([1])}
    (entry,) = detections_to_coco(5, output, {1: 7})
    assert entry == {"image_id": 5, "category_id": 7, "bbox": [10.0, 20.0, 40.0, 60.0], "score": 0.75}


def test_mask_ap_of_perfect_masks():
    from pycocotools import mask as mask_utils

    gt = _gt({1: [[10, 10, 40, 40]]})
    truth = np.zeros((200, 200), dtype=np.uint8)
    truth[10:50, 10:30] = 1  # an L-shaped object inside its box
    truth[28:50, 30:50] = 1
    rle = mask_utils.encode(np.asfortranarray(truth))
    rle["counts"] = rle["counts"].decode("ascii")
    gt["annotations"][0]["segmentation"] = rle
    gt["annotations"][0]["area"] = float(truth.sum())
    output = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0]]), "scores": torch.tensor([0.9]),
              "labels": torch.tensor([1]), "masks": torch.from_numpy(truth).float()[None, None]}
    results = detections_to_coco(1, output, {1: 7}, masks=True)
    assert coco_evaluate(gt, results, "segm")["AP"] == pytest.approx(1.0)
    # A full-box mask overlaps the L shape with IoU 1240 / 1600 = 0.775: matched at 0.50 ... 0.75 (6 of 10).
    output["masks"] = torch.zeros(1, 1, 200, 200)
    output["masks"][0, 0, 10:50, 10:50] = 1.0
    box_mask = coco_evaluate(gt, detections_to_coco(1, output, {1: 7}, masks=True), "segm")
    assert box_mask["AP50"] == pytest.approx(1.0) and box_mask["AP"] == pytest.approx(0.6)
