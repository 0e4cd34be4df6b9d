"""Tests of soco.labelled.coco: targets as tv_tensors, gray images, crowd boxes, flips, masks, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from soco.errors import DataError
from soco.labelled.coco import CocoDetection, check_same_categories, collate, has_masks, load_coco_json
from soco.labelled.coco import plain_target


def _write(folder: Path, images: list[dict], annotations: list[dict], categories=None) -> Path:
    data = {"images": images, "annotations": annotations,
            "categories": categories or [{"id": 3, "name": "cat"}, {"id": 9, "name": "dog"}]}
    path = folder / "ann.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def small_set(tmp_path):
    """One 60x40 RGB image with two boxes and a crowd box, one 50x30 gray image with one box."""
    rgb = np.zeros((40, 60, 3), dtype=np.uint8)
    rgb[:, :30] = (255, 0, 0)  # left half red: shows where the flip puts the pixels
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.full((30, 50), 77, dtype=np.uint8), mode="L").save(tmp_path / "gray.png")
    path = _write(tmp_path, [
        {"id": 10, "file_name": "rgb.png", "width": 60, "height": 40},
        {"id": 4, "file_name": "gray.png", "width": 50, "height": 30},
    ], [
        {"id": 1, "image_id": 10, "category_id": 9, "bbox": [5, 6, 10, 20], "iscrowd": 0},
        {"id": 2, "image_id": 10, "category_id": 3, "bbox": [40, 0, 30, 10], "iscrowd": 0},  # past the right edge
        {"id": 3, "image_id": 10, "category_id": 3, "bbox": [0, 0, 60, 40], "iscrowd": 1},
        {"id": 4, "image_id": 4, "category_id": 3, "bbox": [1, 2, 3, 4]},
        {"id": 5, "image_id": 4, "category_id": 3, "bbox": [7, 7, 0, 5]},  # no width: dropped
    ])
    return path, tmp_path


def test_targets_are_xyxy_bounding_boxes_with_contiguous_labels(small_set):
    path, folder = small_set
    dataset = CocoDetection(path, folder)
    assert len(dataset) == 2 and dataset.image_id(0) == 4  # sorted by image id
    assert dataset.category_to_label == {3: 1, 9: 2} and dataset.label_to_category == {1: 3, 2: 9}
    image, target = dataset[1]
    assert isinstance(image, tv_tensors.Image) and image.shape == (3, 40, 60) and image.dtype == torch.float32
    assert float(image.max()) == 1.0
    boxes = target["boxes"]
    assert isinstance(boxes, tv_tensors.BoundingBoxes)
    assert boxes.format == tv_tensors.BoundingBoxFormat.XYXY and tuple(boxes.canvas_size) == (40, 60)
    # XYWH (5, 6, 10, 20) -> XYXY (5, 6, 15, 26); the second box is clipped at x = 60; the crowd box skipped.
    assert boxes.tolist() == [[5, 6, 15, 26], [40, 0, 60, 10]]
    assert target["labels"].tolist() == [2, 1] and target["image_id"] == 10
    assert dataset.num_boxes() == 4


def test_gray_images_become_three_channels(small_set):
    path, folder = small_set
    image, target = CocoDetection(path, folder)[0]
    assert image.shape == (3, 30, 50)
    assert torch.allclose(image, torch.full_like(image, 77 / 255))
    assert target["boxes"].tolist() == [[1, 2, 4, 6]]  # the zero-width box is gone


def test_flip_moves_boxes_and_pixels(small_set):
    path, folder = small_set
    dataset = CocoDetection(path, folder, train=True, flip_prob=1.0)
    image, target = dataset[1]
    # x' = W - x: (5, 6, 15, 26) -> (45, 6, 55, 26) and (40, 0, 60, 10) -> (0, 0, 20, 10) in a 60-wide image.
    assert target["boxes"].tolist() == [[45, 6, 55, 26], [0, 0, 20, 10]]
    assert tuple(target["boxes"].canvas_size) == (40, 60)
    assert target["labels"].tolist() == [2, 1]
    assert float(image[0, :, 30:].min()) == 1.0 and float(image[0, :, :30].max()) == 0.0  # red moved right
    assert not CocoDetection(path, folder, train=False, flip_prob=1.0).flips(1)


def test_flips_depend_on_seed_epoch_and_index_only(small_set):
    path, folder = small_set
    first = CocoDetection(path, folder, train=True, flip_prob=0.5, seed=3)
    second = CocoDetection(path, folder, train=True, flip_prob=0.5, seed=3)
    pattern = []
    for epoch in range(40):
        first.set_epoch(epoch)
        second.set_epoch(epoch)
        pattern.append([first.flips(i) for i in range(2)])
        assert pattern[-1] == [second.flips(i) for i in range(2)]
    flat = [f for pair in pattern for f in pair]
    assert 20 < sum(flat) < 60  # about half of the 80 draws


def test_masks_from_polygons_and_boxes(tmp_path):
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    path = _write(tmp_path, [{"id": 1, "file_name": "a.png", "width": 30, "height": 20}], [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 2, 8, 8],
         "segmentation": [[2, 2, 10, 2, 10, 10, 2, 10]]},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [20, 5, 5, 5]},  # no outline: the box is the mask
    ])
    data = load_coco_json(path)
    assert has_masks(data)
    dataset = CocoDetection(path, tmp_path, train=True, flip_prob=1.0, masks=True)
    _, target = dataset[0]
    masks = target["masks"]
    assert isinstance(masks, tv_tensors.Mask) and masks.shape == (2, 20, 30)
    # Flipped: the polygon's columns 2..9 land on 20..27, the box's 20..24 on 5..9.
    assert masks[0].sum() > 0 and masks[0][:, 20:28].sum() == masks[0].sum()
    assert masks[1].sum() == 25 and masks[1][5:10, 5:10].all()


def test_collate_and_plain_targets(small_set):
    path, folder = small_set
    dataset = CocoDetection(path, folder)
    images, targets = collate([dataset[0], dataset[1]])
    assert len(images) == 2 and len(targets) == 2
    plain = plain_target(targets[1], torch.device("cpu"))
    assert type(plain["boxes"]) is torch.Tensor and plain["image_id"] == 10


def test_missing_annotation_file_is_named(tmp_path):
    with pytest.raises(DataError, match="annotation file .*nope.json does not exist"):
        CocoDetection(tmp_path / "nope.json", tmp_path)


def test_non_coco_json_is_named(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(DataError, match="a.json: not a JSON file"):
        load_coco_json(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="b.json: not a COCO annotation file"):
        load_coco_json(tmp_path / "b.json")
    bad_box = {"images": [{"id": 1, "file_name": "x.png"}], "categories": [{"id": 1}],
               "annotations": [{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3]}]}
    (tmp_path / "c.json").write_text(json.dumps(bad_box))
    with pytest.raises(DataError, match=r"c.json: annotations\[0\] has no 'bbox'"):
        load_coco_json(tmp_path / "c.json")
    bad_ref = dict(bad_box, annotations=[{"image_id": 2, "category_id": 1, "bbox": [1, 2, 3, 4]}])
    (tmp_path / "d.json").write_text(json.dumps(bad_ref))
    with pytest.raises(DataError, match="d.json: annotations.* image_id 2"):
        load_coco_json(tmp_path / "d.json")


def test_missing_images_are_listed(small_set):
    path, folder = small_set
    (folder / "gray.png").unlink()
    with pytest.raises(DataError, match="1 of the 2 images named in .*ann.json are missing .*gray.png"):
        CocoDetection(path, folder)


def test_image_size_disagreeing_with_the_file_is_an_error(small_set):
    path, folder = small_set
    data = json.loads(path.read_text())
    data["images"][0]["width"] = 61
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="rgb.png is 60x40 but .*ann.json says 61x40"):
        CocoDetection(path, folder)[1]


def test_validation_categories_follow_the_training_map(small_set, tmp_path):
    path, folder = small_set
    dataset = CocoDetection(path, folder, categories=[3, 9, 12])
    assert dataset.category_to_label == {3: 1, 9: 2, 12: 3}
    with pytest.raises(DataError, match="category ids \\[9\\] are not among"):
        CocoDetection(path, folder, categories=[3])


def test_box_report_counts_each_reason(small_set, caplog):
    path, folder = small_set
    with caplog.at_level("WARNING", logger="soco.labelled.coco"):
        dataset = CocoDetection(path, folder)
    report = dataset.box_report
    # ann 1 and 4 as written, ann 2 clipped at x = 60, ann 3 crowd, ann 5 has no width.
    assert report.as_dict() == {"total": 5, "crowd": 1, "kept": 2, "clipped": 1,
                                "dropped": {"zero or negative width/height": 1}}
    assert report.usable == 3
    assert sum(len(dataset[i][1]["boxes"]) for i in range(len(dataset))) == 3  # what __getitem__ really gives
    assert caplog.messages == [
        (f"{path}: 5 boxes: 2 used as written, 1 clipped to the image, "
         "1 dropped (zero or negative width/height: 1), 1 crowd (ignore regions, never trained on)")
    ]


def test_outside_negative_and_partly_outside_boxes(tmp_path):
    Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    # No width/height in the file: the sizes come from the image header.
    path = _write(tmp_path, [{"id": 1, "file_name": "a.png"}], [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [-5, -2, 10, 10]},   # clipped to (0, 0, 5, 8)
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [100, 0, 10, 10]},  # right of the image
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [0, -30, 10, 20]},  # above the image
        {"id": 4, "image_id": 1, "category_id": 3, "bbox": [10, 10, -5, 5]},   # negative width
        {"id": 5, "image_id": 1, "category_id": 3, "bbox": [59, 39, 4, 4]},    # clipped to (59, 39, 60, 40)
    ])
    dataset = CocoDetection(path, tmp_path, train=True, flip_prob=0.0)
    assert dataset.box_report.as_dict() == {
        "total": 5, "crowd": 0, "kept": 0, "clipped": 2,
        "dropped": {"outside the image": 2, "zero or negative width/height": 1},
    }
    assert dataset[0][1]["boxes"].tolist() == [[0, 0, 5, 8], [59, 39, 60, 40]]


def test_nothing_changed_logs_nothing(tmp_path, caplog):
    Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    path = _write(tmp_path, [{"id": 1, "file_name": "a.png", "width": 60, "height": 40}],
                  [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 60, 40]}])
    with caplog.at_level("WARNING", logger="soco.labelled.coco"):
        dataset = CocoDetection(path, tmp_path, train=True)
    assert caplog.messages == [] and dataset.box_report.as_dict()["kept"] == 1


def test_training_file_without_annotations_is_refused(small_set):
    path, folder = small_set
    data = json.loads(path.read_text())
    data["annotations"] = []
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"ann.json: no usable box to train on \(no annotation at all\)$"):
        CocoDetection(path, folder, train=True)
    assert len(CocoDetection(path, folder, train=False)) == 2  # an empty validation file still loads


def test_training_file_with_only_unusable_boxes_is_refused(small_set):
    path, folder = small_set
    data = json.loads(path.read_text())
    data["annotations"] = [
        {"id": 1, "image_id": 10, "category_id": 9, "bbox": [0, 0, 60, 40], "iscrowd": 1},
        {"id": 2, "image_id": 10, "category_id": 9, "bbox": [61, 0, 5, 5]},
        {"id": 3, "image_id": 4, "category_id": 3, "bbox": [1, 1, 0, 0]},
    ]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"ann.json: no usable box to train on \(3 boxes: 0 used as written, "
                                        r"2 dropped \(outside the image: 1, zero or negative width/height: 1\), "
                                        r"1 crowd"):
        CocoDetection(path, folder, train=True)


def test_unreadable_image_header_is_named(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not a png")
    path = _write(tmp_path, [{"id": 1, "file_name": "a.png"}],
                  [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5]}])
    with pytest.raises(DataError, match=r"a.png: not an image file .*\(named in .*ann.json\)"):
        CocoDetection(path, tmp_path)


def test_a_category_id_given_twice_is_refused_with_both_names(tmp_path):
    path = _write(tmp_path, [{"id": 1, "file_name": "a.png"}],
                  [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5]}],
                  categories=[{"id": 3, "name": "cat"}, {"id": 9, "name": "dog"}, {"id": 3, "name": "bird"}])
    with pytest.raises(DataError, match=f"^{path}: category id 3 appears twice, as 'cat' and as 'bird'$"):
        load_coco_json(path)


def test_a_category_name_given_to_two_ids_is_refused(tmp_path):
    path = _write(tmp_path, [{"id": 1, "file_name": "a.png"}], [],
                  categories=[{"id": 3, "name": "cat"}, {"id": 9, "name": "cat"}])
    with pytest.raises(DataError, match=f"^{path}: category name 'cat' is given to two ids, 3 and 9$"):
        load_coco_json(path)


def test_another_file_must_name_the_shared_ids_as_training_does(small_set, tmp_path):
    path, folder = small_set
    train = CocoDetection(path, folder)
    other = tmp_path / "other"
    other.mkdir()
    data = json.loads(path.read_text())
    # Extra ids and a missing one are fine: only an id that means another class is not.
    data["categories"] = [{"id": 3, "name": "cat"}, {"id": 12, "name": "cow"}]
    data["annotations"] = [ann for ann in data["annotations"] if ann["category_id"] == 3]
    (other / "ann.json").write_text(json.dumps(data))
    check_same_categories(train, CocoDetection(other / "ann.json", folder, categories=train.category_ids))
    data["categories"] = [{"id": 3, "name": "dog"}, {"id": 9, "name": "cat"}]
    (other / "ann.json").write_text(json.dumps(data))
    renamed = CocoDetection(other / "ann.json", folder, categories=train.category_ids)
    with pytest.raises(DataError, match=f"^{other / 'ann.json'}: category 3 is 'dog', but 'cat' in {path}: "
                                        "the two files must share one category list$"):
        check_same_categories(train, renamed)
