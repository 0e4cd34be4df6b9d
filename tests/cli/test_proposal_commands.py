"""`soco proposals`, `inspect`, `show` and `proposals merge` as a user runs them."""

import json

import pytest
import yaml
from PIL import Image

from soco.cli.main import main
from tests.data.proposals.conftest import make_image_folder


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
    assert "images: 5 (0 failed)" in out and "algorithm: fast" in out

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
        (["proposals", "{images}", "-o", "{tmp}/s", "--algorithm", "refrence"], "did you mean 'reference'"),
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
