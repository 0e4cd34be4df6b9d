"""Tests of soco.labelled.composed: exact boxes and masks of pasted stamps, disjoint splits, the set and its command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from soco.cli.main import main
from soco.labelled import composed
from soco.labelled.composed import (
    MIN_VISIBLE,
    build_composed,
    compose_scene,
    find_stamps,
    photo_group,
    split_alternate,
    split_photos,
)
from soco.errors import DataError
from soco.labelled.coco import CocoDetection

COLOURS = {"red": (230, 20, 20), "blue": (20, 20, 230)}


def make_stamp(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (40, 20), margin: int = 6) -> None:
    """An RGBA stamp: an opaque rectangle of one colour inside a fully transparent margin."""
    width, height = size
    pixels = np.zeros((height + 2 * margin, width + 2 * margin, 4), dtype=np.uint8)
    pixels[margin:margin + height, margin:margin + width] = (*colour, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGBA").save(path)


def make_stamps(root: Path) -> dict[str, tuple[str, ...]]:
    """Two classes of four stamps each (rectangles of the class colour, several shapes) under root."""
    stamps = {}
    for category, colour in COLOURS.items():
        names = []
        for index, size in enumerate([(40, 20), (20, 40), (30, 30), (50, 16)]):
            name = f"{category}/s{index}.png"
            make_stamp(root / name, colour, size)
            names.append(name)
        stamps[category] = tuple(names)
    return stamps


def make_backgrounds(folder: Path, count: int = 4) -> list[str]:
    """Grey-green noise photos of several sizes, bg0.jpg...; their names relative to folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for index in range(count):
        pixels = rng.integers(60, 140, (90 + 10 * index, 120, 3), dtype=np.uint8)
        pixels[..., 2] //= 3  # no pixel could pass for a stamp's red or blue
        names.append(f"bg{'abcd'[index]}.jpg")
        Image.fromarray(pixels).save(folder / names[-1], quality=95)
    return names


def test_split_alternate_is_disjoint_and_covers_the_sorted_list():
    assert split_alternate(["d", "a", "c", "b", "e"]) == {"train": ["a", "c", "e"], "val": ["b", "d"]}


def test_near_duplicate_photos_stay_in_one_split():
    # Stereo pairs, video frames and numbered shots of the default photos group together; other photos do not.
    assert photo_group("rocks2-l.png") == photo_group("rocks2-r.png") == photo_group("rocks1-l.png") == "./rocks"
    assert photo_group("wall.png") == "./wall" and photo_group("P1070491.png") == "./p"
    assert photo_group("motorcycle_left.png") == photo_group("motorcycle_right.png") == "./motorcycle"
    assert photo_group("seq/im.001.png") == photo_group("seq/im.002.png") == "seq/im"
    assert photo_group("mosaic/aerial2-003.png") == photo_group("mosaic/aerial2-001.png") == "mosaic/aerial"
    assert photo_group("eiffel-1.png") == photo_group("eiffel-2.png") != photo_group("rocket.jpg")
    photos = ["walls-l.png", "walls-r.png", "seq/im.001.png", "seq/im.002.png", "coffee.png", "rocket.jpg"]
    halves = split_photos(photos)
    assert sorted(halves["train"] + halves["val"]) == sorted(photos)
    for group in ({"walls-l.png", "walls-r.png"}, {"seq/im.001.png", "seq/im.002.png"}):
        assert group <= set(halves["train"]) or group <= set(halves["val"])
    # Sorted groups ./coffee, ./rocket, ./walls, seq/im alternate between the splits.
    assert halves == {"train": ["coffee.png", "walls-l.png", "walls-r.png"],
                      "val": ["rocket.jpg", "seq/im.001.png", "seq/im.002.png"]}


def test_one_pasted_stamp_has_the_box_and_mask_geometry_says(tmp_path):
    make_stamp(tmp_path / "red.png", COLOURS["red"], size=(40, 20))
    stamp = composed._load_stamp(tmp_path / "red.png")
    assert stamp.size == (40, 20)  # the transparent margin is cropped away
    background = Image.new("RGB", (100, 100), (90, 90, 30))
    scene, placements, masks = compose_scene(background, [("red.png", "red", stamp)], 64, np.random.default_rng(3))
    (placed,), (mask,) = placements, masks
    # The longer side lands between 0.15 and 0.5 of the scene, and the 2:1 shape is kept.
    assert 0.15 * 64 - 1 <= placed.width <= 0.5 * 64 + 1
    assert abs(placed.height - placed.width / 2) <= 1
    # An opaque rectangle stays a rectangle: the mask is exactly the pasted block, and its box is the placement.
    expected = np.zeros((64, 64), dtype=bool)
    expected[placed.y:placed.y + placed.height, placed.x:placed.x + placed.width] = True
    assert np.array_equal(mask, expected)
    assert composed._mask_box(mask) == [placed.x, placed.y, placed.width, placed.height]
    pixels = np.asarray(scene)
    assert np.abs(pixels[mask].astype(int) - COLOURS["red"]).max() <= 2
    assert np.abs(pixels[~mask].astype(int) - (90, 90, 30)).max() <= 2


def test_occluded_stamps_keep_their_visible_share_and_masks_do_not_overlap(tmp_path):
    make_stamp(tmp_path / "red.png", COLOURS["red"], size=(30, 30))
    make_stamp(tmp_path / "blue.png", COLOURS["blue"], size=(30, 30))
    red, blue = composed._load_stamp(tmp_path / "red.png"), composed._load_stamp(tmp_path / "blue.png")
    background = Image.new("RGB", (80, 80), (90, 90, 30))
    for seed in range(10):
        stamps = [("r", "red", red), ("b", "blue", blue), ("r", "red", red), ("b", "blue", blue)]
        scene, placements, masks = compose_scene(background, stamps, 64, np.random.default_rng(seed),
                                                 min_side=0.4, max_side=0.5)
        pixels = np.asarray(scene).astype(int)
        union = np.zeros((64, 64), dtype=int)
        for placed, mask in zip(placements, masks):
            union += mask
            assert mask.sum() >= MIN_VISIBLE * placed.width * placed.height
            # What a mask says is visible shows that stamp's colour in the scene.
            assert np.abs(pixels[mask] - COLOURS[placed.category]).max() <= 2
        assert union.max() <= 1


def test_build_writes_coco_files_with_exact_masks_and_disjoint_splits(tmp_path):
    stamps = make_stamps(tmp_path / "stamps")
    backgrounds = make_backgrounds(tmp_path / "photos")
    files = build_composed(tmp_path / "stamps", tmp_path / "photos", backgrounds, tmp_path / "set",
                           {"train": 6, "val": 4}, size=64, seed=1, stamps=stamps)
    records = {split: json.loads(path.read_text()) for split, path in files.items()}
    assert [c["name"] for c in records["train"]["categories"]] == ["blue", "red"]
    used = {split: {a["stamp"] for a in record["annotations"]} for split, record in records.items()}
    assert used["train"] and used["val"] and not used["train"] & used["val"]
    assert {a["stamp"] for a in records["val"]["annotations"]} <= {"blue/s1.png", "blue/s3.png", "red/s1.png",
                                                                   "red/s3.png"}  # split_alternate's odd ones
    backgrounds_used = {split: {i["background"] for i in record["images"]} for split, record in records.items()}
    assert backgrounds_used["train"] <= {"bga.jpg", "bgc.jpg"} and backgrounds_used["val"] <= {"bgb.jpg", "bgd.jpg"}
    for split, record in records.items():
        assert len(record["images"]) == {"train": 6, "val": 4}[split]
        for annotation in record["annotations"]:
            mask = mask_utils.decode(annotation["segmentation"]).astype(bool)
            assert mask.sum() == annotation["area"]
            assert composed._mask_box(mask) == annotation["bbox"]
            image = next(i for i in record["images"] if i["id"] == annotation["image_id"])
            pixels = np.asarray(Image.open(tmp_path / "set" / "images" / image["file_name"])).astype(int)
            colour = COLOURS[records["train"]["categories"][annotation["category_id"] - 1]["name"]]
            # JPEG blurs the edges; the inside of each visible mask keeps its stamp's colour.
            assert np.median(np.abs(pixels[mask] - colour)) <= 12
    # The files load as the transfer and probe read them, with boxes in XYXY pixels.
    dataset = CocoDetection(files["val"], tmp_path / "set" / "images")
    _, target = dataset[0]
    first = records["val"]["annotations"][0]
    x, y, w, h = first["bbox"]
    assert target["boxes"][0].tolist() == [x, y, x + w, y + h]
    # Same seed, same set: every file, images included.
    build_composed(tmp_path / "stamps", tmp_path / "photos", backgrounds, tmp_path / "again", {"train": 6, "val": 4},
                   size=64, seed=1, stamps=stamps)
    written = sorted(path.relative_to(tmp_path / "set") for path in (tmp_path / "set").rglob("*") if path.is_file())
    assert len(written) == 2 + 10
    assert all((tmp_path / "again" / name).read_bytes() == (tmp_path / "set" / name).read_bytes() for name in written)


def test_missing_stamps_are_named(tmp_path):
    (tmp_path / "stamps").mkdir()
    with pytest.raises(DataError, match=r"stamps: \d+ of the listed stamps are missing \(first: animals/birds/"):
        find_stamps(tmp_path / "stamps")


def test_cli_composed_builds_once_and_reports(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(composed, "STAMPS", make_stamps(tmp_path / "stamps"))
    make_backgrounds(tmp_path / "photos")
    command = ["data", "composed", "-o", str(tmp_path / "set"), "--stamps", str(tmp_path / "stamps"),
               "--backgrounds", str(tmp_path / "photos"), "--train-images", "3", "--val-images", "2", "--size", "48"]
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "the scenes are composed" in printed and f"--labels {tmp_path / 'set' / 'val.json'} --stage c4 --no-background" in printed
    written = (tmp_path / "set" / "val.json").stat().st_mtime_ns
    assert main([*command, "--quiet"]) == 0  # the same build is there: nothing is redone
    assert capsys.readouterr().out.strip() == str(tmp_path / "set")
    assert (tmp_path / "set" / "val.json").stat().st_mtime_ns == written
    assert main([*command[:-2], "--size", "8"]) == 2
    assert "size: 8 px is too small" in capsys.readouterr().err
    # A build that fails half-way (here: at the first mask) leaves the finished set as it was, and no leftovers.
    encode = composed._rle
    monkeypatch.setattr(composed, "_rle", lambda mask: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main([*command[:-2], "--size", "40"])
    assert not (tmp_path / ".set.building").exists()
    assert (tmp_path / "set" / "val.json").stat().st_mtime_ns == written
    monkeypatch.setattr(composed, "_rle", encode)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    assert main([*command[:3], str(tmp_path / "other"), *command[4:]]) == 2
    assert "is not empty and holds no composed.json" in capsys.readouterr().err
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"


def test_fetching_errors_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(composed, "SYSTEM_STAMPS", tmp_path / "not-installed")
    monkeypatch.setattr(composed.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="no apt-get to fetch tuxpaint-stamps-default_2022.06.04-1_all.deb: install "
                                        "the package, put the .deb at .*downloads.* or pass --stamps DIR"):
        find_stamps(cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "tuxpaint-stamps").exists()

    # apt-get is there but hands back a file with another checksum.
    monkeypatch.setattr(composed.shutil, "which", lambda name: f"/usr/bin/{name}")

    def fake_apt(command, cwd, **options):
        (Path(cwd) / composed.DEB_NAME).write_bytes(b"not the package")
        return composed.subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(composed.subprocess, "run", fake_apt)
    with pytest.raises(DataError, match="has another checksum than the one the stamp list was checked on"):
        find_stamps(cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "downloads" / composed.DEB_NAME).exists()

    # The .deb is in place (its checksum taken as right) but there is no dpkg-deb to unpack it.
    deb = tmp_path / "cache" / "downloads" / composed.DEB_NAME
    deb.write_bytes(b"a package")
    monkeypatch.setattr(composed, "DEB_SHA256", composed.file_sha256(deb))
    monkeypatch.setattr(composed.shutil, "which", lambda name: None if name == "dpkg-deb" else f"/usr/bin/{name}")
    with pytest.raises(DataError, match="needs dpkg-deb .* pass --stamps <its usr/share/tuxpaint/stamps>"):
        find_stamps(cache_dir=tmp_path / "cache")


def test_scene_size_is_bounded_before_anything_is_fetched(tmp_path):
    # a 100000 px scene was killed for memory (issue 26)
    from soco.config.validation import MAX_IMAGE_SIDE
    from soco.errors import ConfigError
    from soco.labelled.composed import check_scene_options

    check_scene_options({"train": 1, "val": 1}, MAX_IMAGE_SIDE, (1, 2))
    with pytest.raises(ConfigError, match=f"size: 100000 px is too large for a scene \\(at most {MAX_IMAGE_SIDE}\\)"):
        check_scene_options({"train": 1, "val": 1}, 100000, (1, 2))
