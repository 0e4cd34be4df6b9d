"""`soco proposals`, `inspect`, `show` and `proposals merge` as a user runs them."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from soco.cli.main import main
from soco.data.proposals.pipeline import output_lock
from soco.data.proposals.store import ImageRecord, write_store
from tests.data.proposals.conftest import make_image_folder, synthetic_scene
from tests.data.proposals.test_store import make_records


@pytest.fixture
def images(tmp_path):
    return make_image_folder(tmp_path / "images", 5)


def test_proposals_inspect_and_show(images, tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["proposals", str(images), "-o", str(store), "--workers", "1", "--quiet", "proposals.min_side=16"]) == 0
    out = capsys.readouterr().out
    assert "images: 5 (5 computed now, 0 failed)" in out
    saved = yaml.safe_load((store / "config.yaml").read_text())
    assert saved["proposals"]["workers"] == 1 and saved["proposals"]["min_side"] == 16.0

    assert main(["inspect", str(store)]) == 0
    out = capsys.readouterr().out
    assert "images: 5 (0 failed)" in out and "algorithm: release" in out

    assert main(["inspect", str(store), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [entry["path"] for entry in listing["images"]] == sorted(
        str(p.relative_to(images)) for p in images.rglob("*.*")
    )
    assert all(len(entry["boxes"]) >= 1 and len(entry["boxes"][0]) == 4 for entry in listing["images"])
    assert listing["summary"]["filter"]["min_side"] == 16.0

    picture = tmp_path / "shown.png"
    assert main(["show", str(store), "--image", "group1/scene_001.png", "-o", str(picture)]) == 0
    with Image.open(picture) as drawn:
        assert drawn.size[0] > 100 and drawn.size[1] > 100


def test_sharded_runs_and_merge_command(images, tmp_path, capsys):
    for index in range(2):
        assert main(["proposals", str(images), "-o", str(tmp_path / f"m{index}"), "--shard", f"{index}/2",
                     "--workers", "1", "--quiet"]) == 0
    assert main(["proposals", "merge", str(tmp_path / "m0"), str(tmp_path / "m1"), "-o", str(tmp_path / "all")]) == 0
    assert "5 images" in capsys.readouterr().out


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["proposals", "{tmp}/missing", "-o", "{tmp}/s"], "missing"),
        (["proposals", "{images}", "-o", "{tmp}/s", "proposals.wokers=2"], "did you mean 'proposals.workers'"),
        (["proposals", "{images}", "-o", "{tmp}/s", "--algorithm", "repiared"], "did you mean 'repaired'"),
        (["proposals", "{images}", "-o", "{tmp}/s", "--shard", "2/2"], "0 <= I < N"),
        (["inspect", "{tmp}/nothing"], "does not exist"),
    ],
)
def test_bad_input_is_a_one_line_error(images, tmp_path, capsys, arguments, message):
    arguments = [a.format(tmp=tmp_path, images=images) for a in arguments]
    assert main(arguments) == 2
    err = capsys.readouterr().err
    assert err.startswith("soco: error:") and message in err and "Traceback" not in err


def test_show_names_a_missing_image(images, tmp_path, capsys):
    main(["proposals", str(images), "-o", str(tmp_path / "s"), "--workers", "1", "--quiet"])
    assert main(["show", str(tmp_path / "s"), "--image", "nope.png", "-o", str(tmp_path / "x.png")]) == 2
    assert "has no image 'nope.png'" in capsys.readouterr().err


def test_inspect_labels_totals_and_per_image_figures(tmp_path, capsys):
    # Readable images keep 1, 2, 3 and 4 boxes of 51, 52, 53 and 54 found before the filter; one failed.
    write_store(tmp_path / "store", make_records(), {"algorithm": "fast"})
    assert main(["inspect", str(tmp_path / "store")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "images: 5 (1 failed)" in lines
    assert "proposals kept: 10 in total; per readable image: mean 2.5, median 2.5, min 1, max 4" in lines
    assert "proposals before the filter: 210 in total; per readable image: mean 52.5, median 52.5, min 51, max 54" in lines
    assert main(["inspect", str(tmp_path / "store"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert (summary["proposals"], summary["raw_proposals"]) == (10, 210)
    assert summary["proposals_per_image"] == {"mean": 2.5, "median": 2.5, "min": 1, "max": 4}
    assert summary["raw_proposals_per_image"] == {"mean": 52.5, "median": 52.5, "min": 51, "max": 54}


def test_inspect_of_an_image_folder_says_it_is_not_a_store(images, capsys):
    assert main(["inspect", str(images)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"soco: error: {images} is not a proposal store (no meta.json); it holds images: "
        f"make a store of them with `soco proposals {images} -o STORE`\n"
    )


def test_inspect_piped_into_head_ends_quietly(tmp_path):
    # About 2 MB of JSON: far more than a pipe holds, so the writer meets the closed pipe.
    records = [
        ImageRecord(f"img_{i:05d}.jpg", i, 100, 640, 480, 0, 30, np.full((20, 4), 123.456, np.float32))
        for i in range(3000)
    ]
    write_store(tmp_path / "store", records, {"algorithm": "fast"})
    command = [sys.executable, "-c", "import sys; from soco.cli.main import main; sys.exit(main())",
               "inspect", str(tmp_path / "store"), "--json"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.read(100).startswith(b'{"summary": {"store"')
    process.stdout.close()  # what `head -c 100` does once it has its bytes
    assert process.wait(timeout=60) == 141
    assert process.stderr.read() == b""


def test_an_empty_store_file_is_a_one_line_error(tmp_path, capsys):
    write_store(tmp_path / "store", make_records(), {"algorithm": "fast"})
    (tmp_path / "store" / "box_offsets.npy").write_bytes(b"")
    assert main(["inspect", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"soco: error: proposal store file {tmp_path / 'store' / 'box_offsets.npy'} is empty (0 bytes)")
    assert err.count("\n") == 1 and "EOFError" not in err


def test_proposals_into_an_output_in_use_is_refused(images, tmp_path, capsys):
    with output_lock(tmp_path / "s"):
        assert main(["proposals", str(images), "-o", str(tmp_path / "s"), "--workers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"soco: error: {tmp_path / 's'} is in use by another `soco proposals` run (pid {os.getpid()},")
    assert err.count("\n") == 1


def test_show_refuses_a_changed_image_until_proposals_update_the_store(images, tmp_path, capsys):
    store, picture = str(tmp_path / "s"), str(tmp_path / "x.png")
    main(["proposals", str(images), "-o", store, "--workers", "1", "--quiet"])
    synthetic_scene(99).save(images / "group1" / "scene_001.png")
    capsys.readouterr()
    assert main(["show", store, "--image", "group1/scene_001.png", "-o", picture]) == 2
    assert "scene_001.png changed since proposal store" in capsys.readouterr().err
    assert main(["proposals", str(images), "-o", store, "--workers", "1", "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "images: 5 (1 computed now, 0 failed)" in out
    assert "update: 1 changed, 0 added, 0 removed, 0 failures retried" in out
    assert main(["show", store, "--image", "group1/scene_001.png", "-o", picture]) == 0
