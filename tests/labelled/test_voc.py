"""Tests of soco.labelled.voc and `soco data voc`: coordinates, difficult objects, splits, errors, AP round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from soco.cli.main import main
from soco.labelled.voc import convert_voc, parse_voc_xml
from soco.errors import DataError
from soco.labelled.coco import CocoDetection
from soco.transfer.evaluate import coco_evaluate

WIDTH, HEIGHT = 64, 48


def _xml(filename: str, objects: list[tuple], size: tuple[int, int] | None = (WIDTH, HEIGHT)) -> str:
    """A VOC annotation; objects are (name, xmin, ymin, xmax, ymax, difficult)."""
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    body = "".join(
        f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated><difficult>{difficult}</difficult>"
        f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for name, x1, y1, x2, y2, difficult in objects
    )
    return f"<annotation><folder>VOC</folder><filename>{filename}</filename>{size_xml}{body}</annotation>"


# id -> objects (name, xmin, ymin, xmax, ymax, difficult), VOC 1-based inclusive pixel indices.
OBJECTS = {
    "000001": [("dog", 1, 1, 10, 20, 0), ("cat", 30, 5, 64, 48, 0)],  # the cat touches the bottom-right corner
    "000002": [("cat", 11, 21, 30, 40, 0), ("bird", 40, 10, 60, 30, 1)],  # a difficult bird
    "000003": [("dog", 5, 5, 25, 25, 0), ("dog", 50, 30, 70, 45, 0)],  # the second reaches past x = 64
}


def make_voc(root: Path, splits: dict[str, list[str]] | None = None) -> Path:
    """A VOC folder of three 64x48 JPEGs with OBJECTS, and optional ImageSets/Main split files."""
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    rng = np.random.default_rng(0)
    for stem, objects in OBJECTS.items():
        pixels = rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{stem}.jpg")
        (root / "Annotations" / f"{stem}.xml").write_text(_xml(f"{stem}.jpg", objects))
    if splits:
        main_dir = root / "ImageSets" / "Main"
        main_dir.mkdir(parents=True)
        for split, ids in splits.items():
            (main_dir / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        # A per-class file (id and 1/-1/0): not a split.
        (main_dir / "dog_train.txt").write_text("000001  1\n000002 -1\n")
    return root


SPLITS = {"train": ["000001", "000003"], "val": ["000002"], "trainval": ["000001", "000002", "000003"]}


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_exact_coco_coordinates_and_categories(tmp_path):
    result = convert_voc(make_voc(tmp_path / "voc"), tmp_path / "out")
    assert list(result.files) == ["all"] and result.images == {"all": 3} and result.boxes == {"all": 6}
    data = _load(tmp_path / "out" / "all.json")
    # Sorted by name: bird 1, cat 2, dog 3.
    assert [(c["id"], c["name"]) for c in data["categories"]] == [(1, "bird"), (2, "cat"), (3, "dog")]
    assert data["images"] == [
        {"id": 1, "file_name": "000001.jpg", "width": 64, "height": 48},
        {"id": 2, "file_name": "000002.jpg", "width": 64, "height": 48},
        {"id": 3, "file_name": "000003.jpg", "width": 64, "height": 48},
    ]
    got = [(a["image_id"], a["category_id"], a["bbox"], a["area"], a["iscrowd"]) for a in data["annotations"]]
    assert got == [
        (1, 3, [0.0, 0.0, 10.0, 20.0], 200.0, 0),  # pixels 1..10 x 1..20 -> [0, 10) x [0, 20)
        (1, 2, [29.0, 4.0, 35.0, 44.0], 1540.0, 0),  # reaches exactly the image's edges (64, 48): not clipped
        (2, 2, [10.0, 20.0, 20.0, 20.0], 400.0, 0),
        (2, 1, [39.0, 9.0, 21.0, 21.0], 441.0, 1),  # difficult -> iscrowd 1
        (3, 3, [4.0, 4.0, 21.0, 21.0], 441.0, 0),
        (3, 3, [49.0, 29.0, 15.0, 16.0], 240.0, 0),  # xmax 70 clipped to the image's right edge 64
    ]
    assert [a["id"] for a in data["annotations"]] == [1, 2, 3, 4, 5, 6]
    assert (result.difficult, result.clipped, result.dropped) == (1, 1, 0)


def test_classes_order_and_unknown_class(tmp_path):
    voc = make_voc(tmp_path / "voc")
    convert_voc(voc, tmp_path / "out", classes=["dog", "cat", "bird", "person"])
    data = _load(tmp_path / "out" / "all.json")
    assert [(c["id"], c["name"]) for c in data["categories"]] == [(1, "dog"), (2, "cat"), (3, "bird"), (4, "person")]
    assert data["annotations"][0]["category_id"] == 1  # the first dog
    with pytest.raises(DataError, match=r"000002.xml: class 'bird' is not among --classes \(dog, cat\)$"):
        convert_voc(voc, tmp_path / "out2", classes=["dog", "cat"])


def test_splits_share_image_ids_and_skip_per_class_files(tmp_path):
    result = convert_voc(make_voc(tmp_path / "voc", SPLITS), tmp_path / "out")
    assert sorted(result.files) == ["train", "trainval", "val"]  # dog_train.txt is not a split
    train, val, trainval = (_load(tmp_path / "out" / f"{s}.json") for s in ("train", "val", "trainval"))
    assert [(i["id"], i["file_name"]) for i in train["images"]] == [(1, "000001.jpg"), (3, "000003.jpg")]
    assert [(i["id"], i["file_name"]) for i in val["images"]] == [(2, "000002.jpg")]
    assert len(trainval["images"]) == 3 and len(trainval["annotations"]) == 6
    assert [a["image_id"] for a in train["annotations"]] == [1, 1, 3, 3]
    assert train["categories"] == val["categories"]  # the same ids in every split
    # The same annotation has the same id in every split that holds it.
    assert {a["id"] for a in train["annotations"]} | {a["id"] for a in val["annotations"]} == \
        {a["id"] for a in trainval["annotations"]}


def test_round_trip_ground_truth_as_detections_scores_ap_one(tmp_path):
    convert_voc(make_voc(tmp_path / "voc"), tmp_path / "out")
    data = _load(tmp_path / "out" / "all.json")
    truth = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
             for a in data["annotations"] if not a["iscrowd"]]
    assert coco_evaluate(data, truth)["AP"] == pytest.approx(1.0)
    # A detection on the difficult bird is ignored, not a false positive.
    bird = next(a for a in data["annotations"] if a["iscrowd"])
    on_difficult = {"image_id": bird["image_id"], "category_id": bird["category_id"], "bbox": bird["bbox"],
                    "score": 1.0}
    assert coco_evaluate(data, [*truth, on_difficult])["AP"] == pytest.approx(1.0)
    # Were the bird an ordinary box, missing it would cost AP: the ignore flag is what gives 1.0 above.
    as_ordinary = dict(data, annotations=[dict(a, iscrowd=0) for a in data["annotations"]])
    assert coco_evaluate(as_ordinary, truth)["AP"] == pytest.approx(2 / 3)  # bird AP 0, cat and dog 1


def test_converted_file_loads_for_training_with_the_voc_boxes(tmp_path):
    voc = make_voc(tmp_path / "voc", SPLITS)
    convert_voc(voc, tmp_path / "out")
    dataset = CocoDetection(tmp_path / "out" / "trainval.json", voc / "JPEGImages", train=True, flip_prob=0.0)
    # The difficult bird is an ignore region, not a training box; the dog past the edge was clipped on conversion.
    assert dataset.box_report.as_dict() == {"total": 6, "crowd": 1, "kept": 5, "clipped": 0, "dropped": {}}
    assert dataset[1][1]["boxes"].tolist() == [[10, 20, 30, 40]]  # VOC (11, 21, 30, 40) as XYXY edges
    assert dataset[0][1]["boxes"].tolist() == [[0, 0, 10, 20], [29, 4, 64, 48]]


def test_size_is_read_from_the_image_when_the_xml_has_none(tmp_path):
    voc = make_voc(tmp_path / "voc")
    (voc / "Annotations" / "000001.xml").write_text(_xml("000001.jpg", OBJECTS["000001"], size=None))
    assert parse_voc_xml(voc / "Annotations" / "000001.xml").width is None
    convert_voc(voc, tmp_path / "out")
    assert _load(tmp_path / "out" / "all.json")["images"][0] == {"id": 1, "file_name": "000001.jpg",
                                                                   "width": 64, "height": 48}


def test_box_outside_the_image_is_dropped_and_counted(tmp_path):
    voc = make_voc(tmp_path / "voc")
    (voc / "Annotations" / "000003.xml").write_text(_xml("000003.jpg", [("dog", 70, 5, 80, 20, 0)]))
    result = convert_voc(voc, tmp_path / "out")
    assert (result.dropped, result.boxes["all"]) == (1, 4)
    assert "1 boxes dropped (no area inside their image)" in result.lines()[-1]


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "NaN"])
def test_a_box_with_a_non_finite_coordinate_is_dropped_and_counted(tmp_path, bad):
    voc = make_voc(tmp_path / "voc")
    (voc / "Annotations" / "000003.xml").write_text(_xml("000003.jpg", [("dog", bad, 5, 20, 20, 0),
                                                                        ("dog", 5, 5, 25, bad, 0)]))
    result = convert_voc(voc, tmp_path / "out")
    assert (result.dropped, result.boxes["all"]) == (2, 4)
    text = (tmp_path / "out" / "all.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the COCO file"))


def test_corrupt_xml_names_the_file(tmp_path):
    voc = make_voc(tmp_path / "voc")
    (voc / "Annotations" / "000002.xml").write_text("<annotation><object>")
    with pytest.raises(DataError, match=r"Annotations/000002.xml: not valid XML"):
        convert_voc(voc, tmp_path / "out")
    (voc / "Annotations" / "000002.xml").write_text("<annotation><object><name>cat</name><bndbox><xmin>a</xmin>"
                                                    "</bndbox></object></annotation>")
    with pytest.raises(DataError, match=r"000002.xml: <bndbox/xmin> is not a number: 'a'"):
        convert_voc(voc, tmp_path / "out")


def test_missing_or_wrongly_sized_image_names_the_file(tmp_path):
    voc = make_voc(tmp_path / "voc")
    (voc / "JPEGImages" / "000003.jpg").unlink()
    with pytest.raises(DataError, match=r"Annotations/000003.xml: its image is missing .*JPEGImages/000003.jpg"):
        convert_voc(voc, tmp_path / "out")
    Image.fromarray(np.zeros((10, 10, 3), dtype=np.uint8)).save(voc / "JPEGImages" / "000003.jpg")
    with pytest.raises(DataError, match=r"000003.xml: declares 64x48 but 000003.jpg is 10x10"):
        convert_voc(voc, tmp_path / "out")


def test_split_naming_an_unknown_image_is_an_error(tmp_path):
    voc = make_voc(tmp_path / "voc", {"train": ["000001", "000009"]})
    with pytest.raises(DataError, match=r"Main/train.txt: 1 image id\(s\) have no Annotations/<id>.xml: 000009"):
        convert_voc(voc, tmp_path / "out")


def test_cli_converts_and_reports_errors_on_one_line(tmp_path, capsys):
    voc = make_voc(tmp_path / "voc", SPLITS)
    assert main(["data", "voc", str(voc), "-o", str(tmp_path / "out"), "--classes", "dog,cat,bird"]) == 0
    out = capsys.readouterr().out
    assert "train: 2 images, 4 boxes" in out and "3 categories: dog, cat, bird" in out
    assert f"--train-images {voc / 'JPEGImages'}" in out
    assert _load(tmp_path / "out" / "val.json")["annotations"][1]["category_id"] == 3  # bird is third
    assert main(["data", "voc", str(tmp_path / "nothing"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing: no Annotations/ folder (not a Pascal VOC folder)" in err


def test_cli_refuses_an_empty_class_list_on_one_line(tmp_path, capsys):
    # --classes '' used to read as no list, so the sorted names were taken silently (issue 26)
    voc = make_voc(tmp_path / "voc", SPLITS)
    for given, message in (("", "expected names separated by commas, not ''"),
                           ("dog,,cat", "a name is empty in 'dog,,cat'")):
        with pytest.raises(SystemExit) as exited:
            main(["data", "voc", str(voc), "-o", str(tmp_path / "out"), "--classes", given])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and err.count("\n") == 1
        assert f"soco data voc: error: argument --classes: {message}" in err
    assert not (tmp_path / "out").exists()


def test_an_empty_split_file_is_said_and_writes_nothing_and_only_empty_ones_are_refused(tmp_path, capsys):
    voc = make_voc(tmp_path / "voc", {"train": ["000001", "000002"], "test": []})
    assert main(["data", "voc", str(voc), "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert f"test: {voc / 'ImageSets' / 'Main' / 'test.txt'} holds no image id; no test.json written" in out
    assert "train: 2 images" in out and not (tmp_path / "out" / "test.json").exists()
    empty = make_voc(tmp_path / "empty", {"train": [], "val": []})
    with pytest.raises(DataError, match=r"Main: every split file is empty \(train.txt, val.txt\)"):
        convert_voc(empty, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
