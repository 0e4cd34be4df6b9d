"""Tests of soco.labelled.deepforest: tile geometry, the leak-free split, COCO output, the offline wheel path."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from soco.labelled import deepforest
from soco.labelled.deepforest import (
    SourceImage,
    build_tiled_dataset,
    cached_wheel_path,
    cut_tiles,
    parse_voc,
    prepare_deepforest,
    read_voc_folder,
    split_regions,
    tile_origins,
    training_pixels_folder,
    window_overlap,
)
from soco.errors import DataError


def _voc(filename: str, width: int, height: int, boxes: list[tuple], label: str = "Tree") -> str:
    objects = "".join(
        f"<object><name>{label}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for b in boxes
    )
    return (f"<annotation><filename>{filename}</filename><size><width>{width}</width><height>{height}</height>"
            f"<depth>3</depth></size>{objects}</annotation>")


def _write_pair(folder: Path, stem: str, width: int, height: int, boxes: list[tuple], seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / f"{stem}.png")
    # The XML names a .tif, as DeepForest's OSBS_029.xml does: the PNG of the same stem must win.
    (folder / f"{stem}.xml").write_text(_voc(f"{stem}.tif", width, height, boxes))


def test_tile_origins_cover_the_axis_with_the_last_tile_on_the_edge():
    assert tile_origins(1000, 400) == [0, 400, 600]
    assert tile_origins(800, 400) == [0, 400]
    assert tile_origins(400, 400) == [0]
    assert tile_origins(300, 400) == [0]
    assert tile_origins(2472, 400) == [0, 400, 800, 1200, 1600, 2000, 2072]


def _source(width=1000, height=600, boxes=()):
    pixels = np.arange(width * height * 3, dtype=np.uint32).reshape(height, width, 3).astype(np.uint8)
    return SourceImage("img", pixels, np.asarray(boxes, dtype=np.float64).reshape(-1, 4))


def test_boxes_land_in_the_right_tiles_at_the_right_offsets():
    boxes = [
        (450, 120, 490, 160),  # inside tile (400, 0) only
        (620, 300, 660, 340),  # in the overlap of four tiles
        (380, 50, 420, 90),  # exactly half in tile (0, 0), half in tile (400, 0)
        (388, 450, 428, 490),  # 30% in tile (0, 200): dropped there; 70% in (400, 200): kept, clipped
    ]
    source = _source(boxes=boxes)
    tiles = {t.origin: t for t in cut_tiles(source, (0, 0, 1000, 600), "train", 400, 0.5)}
    assert sorted(tiles) == [(0, 0), (0, 200), (400, 0), (400, 200), (600, 0), (600, 200)]

    def boxes_of(origin):
        return sorted(map(tuple, tiles[origin].boxes.tolist()))

    assert boxes_of((0, 0)) == [(380, 50, 400, 90)]
    assert boxes_of((400, 0)) == [(0, 50, 20, 90), (50, 120, 90, 160), (220, 300, 260, 340)]
    assert boxes_of((600, 0)) == [(20, 300, 60, 340)]
    assert boxes_of((400, 200)) == [(0, 250, 28, 290), (220, 100, 260, 140)]
    assert boxes_of((600, 200)) == [(20, 100, 60, 140)]
    assert boxes_of((0, 200)) == []
    # Pixels: the tile at (600, 200) is the source's [200:600, 600:1000].
    np.testing.assert_array_equal(tiles[(600, 200)].pixels, source.pixels[200:600, 600:1000])


def test_region_smaller_than_a_tile_is_padded_not_borrowed_from_the_neighbour():
    source = _source(boxes=[(10, 10, 50, 50)])
    (tile,) = [t for t in cut_tiles(source, (700, 0, 1000, 400), "val", 400, 0.5)]
    assert tile.window == (700, 0, 1000, 400)
    np.testing.assert_array_equal(tile.pixels[:, :300], source.pixels[0:400, 700:1000])
    assert not tile.pixels[:, 300:].any()


def test_split_regions_and_no_val_tile_overlaps_a_train_tile(tmp_path):
    assert split_regions(1000, 600, False, 400) == {"train": [(0, 0, 600, 600)], "val": [(600, 0, 1000, 600)]}
    assert split_regions(400, 400, True, 400) == {"train": [], "val": [(0, 0, 400, 400)]}

    rng = np.random.default_rng(1)
    xy = rng.uniform(0, [960, 560], size=(80, 2))
    big = _source(1000, 600, np.concatenate([xy, xy + 40], axis=1))
    big.name = "big"
    small = _source(400, 400, [(10, 10, 60, 60), (200, 200, 260, 250)])
    small.name = "OSBS_029"
    record = build_tiled_dataset([big, small], tmp_path, tile_size=400, min_visible=0.5)

    train = json.loads((tmp_path / "train.json").read_text())
    val = json.loads((tmp_path / "val.json").read_text())
    assert {im["source"] for im in train["images"]} == {"big"}
    assert {im["source"] for im in val["images"]} == {"big", "OSBS_029"}
    # Paint every split's windows on a map of the source image: the two maps must not meet.
    covered = {split: np.zeros((600, 1000), dtype=bool) for split in ("train", "val")}
    for split, data in (("train", train), ("val", val)):
        for image in data["images"]:
            if image["source"] == "big":
                x0, y0, x1, y1 = image["window"]
                covered[split][y0:y1, x0:x1] = True
    assert covered["train"].any() and covered["val"].any()
    assert not (covered["train"] & covered["val"]).any()
    assert covered["train"][:, :600].all() and covered["val"][:, 600:].all()
    for v in val["images"]:
        for t in train["images"]:
            if v["source"] == t["source"]:
                assert window_overlap(tuple(v["window"]), tuple(t["window"])) == 0
    assert record["counts"]["train"]["tiles"] == len(train["images"])
    assert record["counts"]["val"]["boxes"] == len(val["annotations"])
    # Training pixels hold the training tiles and nothing else.
    assert sorted(p.name for p in training_pixels_folder(tmp_path).iterdir()) == sorted(
        Path(im["file_name"]).name for im in train["images"])


def test_coco_files_load_in_pycocotools_with_known_boxes(tmp_path):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO

    source = _source(1000, 600, [(450, 120, 490, 160), (10, 450, 40, 470)])
    source.name = "big"
    record = build_tiled_dataset([source], tmp_path, tile_size=400, val_whole_images=())
    coco = COCO(str(tmp_path / "train.json"))
    assert coco.getCatIds() == [1] and coco.loadCats(1)[0]["name"] == "tree"
    by_name = {im["file_name"]: im for im in coco.dataset["images"]}
    # Train region x < 600: tiles at x 0 and 200, rows at y 0 and 200.
    tile = by_name["train/big_x0200_y0000.png"]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=tile["id"]))
    assert [a["bbox"] for a in anns] == [[250.0, 120.0, 40.0, 40.0]]
    assert anns[0]["area"] == 1600.0 and anns[0]["iscrowd"] == 0
    assert Image.open(tmp_path / "images" / tile["file_name"]).size == (400, 400)
    # The val region's two tiles, (600, 0) and (600, 200), have no box: dropped and counted.
    assert record["counts"]["val"]["tiles"] == 0 and record["counts"]["val"]["dropped_empty_tiles"] == 2
    assert set(json.loads((tmp_path / "split.json").read_text())) >= {"params", "sources", "counts", "tiles"}
    assert "No validation tile" in (tmp_path / "SPLIT.md").read_text()


def test_read_voc_folder_prefers_png_and_clips_boxes(tmp_path):
    _write_pair(tmp_path, "site", 120, 80, [(10, 10, 30, 30), (100, 60, 130, 90), (5, 5, 5, 9)])
    (source,) = read_voc_folder(tmp_path)
    assert source.name == "site" and (source.width, source.height) == (120, 80)
    # The zero-width box is dropped, the one reaching past the border clipped.
    assert source.boxes.tolist() == [[10, 10, 30, 30], [100, 60, 120, 80]]


def test_bad_annotations_raise_data_errors(tmp_path):
    with pytest.raises(DataError, match="not valid XML"):
        parse_voc("<annotation>", "x.xml")
    with pytest.raises(DataError, match="not a Pascal VOC"):
        parse_voc("<root/>", "x.xml")
    (tmp_path / "lonely.xml").write_text(_voc("lonely.png", 10, 10, []))
    with pytest.raises(DataError, match="no image found"):
        read_voc_folder(tmp_path)


def _fake_wheel(cache: Path) -> Path:
    """A wheel of the right name holding synthetic deepforest/data files (and a module outside data/)."""
    data = cache / "src"
    # Train region x < 500: tiles at x 0 and 100; the second box lies in both. Val region: one tile.
    _write_pair(data, "2019_YELL_big", 900, 400, [(50, 50, 90, 90), (300, 100, 340, 140), (820, 300, 860, 340)])
    _write_pair(data, "OSBS_029", 400, 400, [(10, 10, 60, 60)], seed=1)
    wheel = cached_wheel_path(cache)
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as archive:
        for path in sorted(data.iterdir()):
            archive.write(path, f"deepforest/data/{path.name}")
        archive.writestr("deepforest/main.py", "raise SystemExit('never imported')\n")
    return wheel


def test_prepare_from_a_cached_wheel_is_idempotent(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _fake_wheel(cache)
    monkeypatch.setenv("SOCO_CACHE", str(cache))

    def no_network(*args, **kwargs):
        raise AssertionError("pip must not run when the wheel is cached")

    monkeypatch.setattr(subprocess, "run", no_network)
    dest = prepare_deepforest(tmp_path / "df", quiet=True)
    assert dest == tmp_path / "df"
    record = json.loads((dest / "split.json").read_text())
    assert record["counts"]["train"]["boxes"] == 3 and record["counts"]["val"]["boxes"] == 2
    assert not (dest / "source").exists() and not (tmp_path / ".df.building").exists()
    stamp = (dest / "split.json").stat().st_mtime_ns
    started = time.perf_counter()
    assert prepare_deepforest(tmp_path / "df", quiet=True) == dest
    assert time.perf_counter() - started < 0.5
    assert (dest / "split.json").stat().st_mtime_ns == stamp
    # Other parameters rebuild the folder, leaving no tile of the old build behind.
    prepare_deepforest(tmp_path / "df", tile_size=200, quiet=True)
    names = [p.name for p in (dest / "images" / "train").iterdir()]
    assert names and all(Image.open(dest / "images" / "train" / n).size == (200, 200) for n in names)


def test_a_second_prepare_waits_for_the_first_and_does_not_rebuild(tmp_path, monkeypatch):
    import threading

    from soco.files import build_lock

    cache = tmp_path / "cache"
    _fake_wheel(cache)
    monkeypatch.setenv("SOCO_CACHE", str(cache))
    dest = tmp_path / "df"
    builds = []
    real_build = deepforest.build_tiled_dataset
    monkeypatch.setattr(deepforest, "build_tiled_dataset", lambda *a, **k: (builds.append(1), real_build(*a, **k)))
    second: dict = {}
    with build_lock(dest, "soco data deepforest (the first)"):
        waiter = threading.Thread(target=lambda: second.update(dest=prepare_deepforest(dest, quiet=True)))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and not dest.exists()  # it waits on the lock, building nothing meanwhile
        # the first process's build, made while it holds the lock (without it the two would share .df.building)
        with monkeypatch.context() as inner:
            inner.setattr(deepforest, "build_lock", lambda *a: contextlib.nullcontext())
            prepare_deepforest(dest, quiet=True)
    waiter.join(30)
    assert second["dest"] == dest and builds == [1]  # the second found the finished build and left it as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "df"]  # no lock or build folder left behind


def test_cli_builds_and_reports_counts(tmp_path, monkeypatch, capsys):
    import argparse

    from soco.cli.transfer_commands import add_deepforest_arguments, run_deepforest

    cache = tmp_path / "cache"
    _fake_wheel(cache)
    monkeypatch.setenv("SOCO_CACHE", str(cache))
    parser = argparse.ArgumentParser()
    add_deepforest_arguments(parser)
    assert run_deepforest(parser.parse_args([])) == 0
    printed = capsys.readouterr().out
    assert "train: 2 tiles, 3 boxes" in printed and "val: 2 tiles, 2 boxes" in printed
    assert str(cache / "deepforest" / "images" / "train") in printed
    assert run_deepforest(parser.parse_args(["--print-path"])) == 0
    assert capsys.readouterr().out.strip() == str(cache / "deepforest")


def test_prepare_refuses_a_foreign_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SOCO_CACHE", str(tmp_path / "cache"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        prepare_deepforest(tmp_path / "mine", quiet=True)


def test_failed_download_names_the_fix(tmp_path, monkeypatch):
    def failing(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, stdout="", stderr="ERROR: No matching distribution")

    monkeypatch.setattr(subprocess, "run", failing)
    with pytest.raises(DataError, match="put the wheel at"):
        deepforest.download_wheel(tmp_path, quiet=True)


@pytest.mark.skipif(not cached_wheel_path().is_file(), reason="the deepforest wheel is not in the cache (offline test)")
def test_real_deepforest_wheel(tmp_path):
    dest = prepare_deepforest(tmp_path / "df", quiet=True)
    record = json.loads((dest / "split.json").read_text())
    assert {name: s["boxes"] for name, s in record["sources"].items()} == {
        "2019_YELL_2_528000_4978000_image_crop2": 574, "2019_YELL_2_541000_4977000_image_crop": 279,
        "OSBS_029": 61, "SOAP_061": 37,
    }
    assert record["counts"]["train"]["tiles"] == 42 and record["counts"]["val"]["tiles"] == 12
    assert os.path.isdir(training_pixels_folder(dest))


def test_tile_size_and_val_width_are_bounded_before_a_tile_is_cut(tmp_path):
    # a negative val_width was a broadcast error, a 100000 px tile asked numpy for 27.9 GiB (issue 26)
    from soco.config.validation import MAX_IMAGE_SIDE

    source = SourceImage("a", np.zeros((40, 40, 3), dtype=np.uint8), np.zeros((0, 4)))
    for options, message in (({"tile_size": MAX_IMAGE_SIDE + 1}, f"tile size {MAX_IMAGE_SIDE + 1} must be 16 to"),
                             ({"tile_size": 8}, "tile size 8 must be 16 to"),
                             ({"tile_size": 16, "val_width": -3}, "val_width -3 must be 1 to"),
                             ({"tile_size": 16, "val_width": 0}, "val_width 0 must be 1 to")):
        with pytest.raises(DataError, match=message):
            build_tiled_dataset([source], tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()
