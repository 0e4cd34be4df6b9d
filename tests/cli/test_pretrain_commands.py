import pytest
"""`soco pretrain` and `soco bench` as a user runs them: the method chosen by name, overrides, bad input."""

import errno
import json
import os

import torch
import yaml

from soco.cli.main import main
from tests.data.proposals.conftest import make_image_folder


@pytest.mark.slow
def test_pretrain_by_method_name_writes_the_method_and_its_section(tiny_data, tmp_path, capsys):
    images, store = tiny_data
    out = tmp_path / "run"
    argv = ["pretrain", "--method", "soco", "--config", "soco_tiny", "--data", str(images), "--proposals", str(store),
            "--out", str(out), "--steps", "1", "--device", "cpu", "--quiet", "method.views.v1_size=48"]
    assert main(argv) == 0
    assert "steps: 1 (1 this run)" in capsys.readouterr().out
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["method"]["name"] == "soco" and saved["method"]["views"]["v1_size"] == 48
    assert "train" in saved and "method" not in saved["train"]


def test_unknown_method_and_misplaced_key_are_one_line_errors(tiny_data, tmp_path, capsys):
    images, store = tiny_data
    common = ["--data", str(images), "--proposals", str(store), "--out", str(tmp_path / "run"), "--quiet"]
    assert main(["pretrain", "--method", "scoo", *common]) == 2
    assert "unknown method 'scoo'; did you mean 'soco'?" in capsys.readouterr().err
    assert main(["pretrain", "--config", "soco_tiny", *common, "views.v1_size=48"]) == 2
    assert "did you mean 'method.views'?" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_a_store_of_another_algorithm_is_refused_in_one_line_naming_both_ways(tiny_data, tmp_path, capsys):
    from soco.config.schema import ProposalsConfig
    from soco.data.proposals.pipeline import run_proposals

    images, _ = tiny_data
    # the earlier default's store: the package algorithm, as `fast` made it
    old_store = tmp_path / "package-store"
    run_proposals(images, old_store, ProposalsConfig(workers=1, algorithm="package"), progress=False)
    common = ["pretrain", "--config", "soco_tiny", "--data", str(images), "--proposals", str(old_store), "--steps", "1",
              "--device", "cpu", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert f"{old_store} was made by the proposal algorithm 'package'" in error and "uses 'release'" in error
    assert "soco proposals IMAGES -o NEW_STORE" in error and "proposals.algorithm=package" in error
    assert not (tmp_path / "run").exists()
    assert main([*common, "--out", str(tmp_path / "run"), "proposals.algorithm=package"]) == 0


@pytest.mark.slow
def test_bench_times_the_step_and_a_compared_configuration(tiny_data, tmp_path, capsys):
    images, store = tiny_data
    output = tmp_path / "bench.json"
    argv = ["bench", "--config", "soco_tiny", "--data", str(images), "--proposals", str(store), "--steps", "1",
            "--warmup", "0", "--data-batches", "1", "--device", "cpu", "--workers", "0",
            "--compare", "method.model.pool_all_levels=false", "-o", str(output)]
    assert main(argv) == 0
    result = json.loads(output.read_text())
    assert result["method"]["name"] == "soco" and result["model_step"]["batch_size"] == 4
    assert result["compared"]["change"] == "method.model.pool_all_levels=false"
    assert result["speedup_of_configured_over_compared"] > 0


def test_methods_lists_every_method_with_its_presets(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("byol: BYOL: bootstrap your own latent, as DeepMind released it")
    assert "\ndetco: DetCo: contrastive learning at every ResNet stage" in out and "byol_r50_100ep" in out
    assert "\ninsloc: InsLoc: instance localization" in out
    assert "\nscrl: SCRL: spatially consistent representation learning" in out
    assert "\nsoco: SoCo: object-level BYOL" in out and "insloc_r50_fpn_200ep" in out
    assert "scrl_r50_200ep" in out and "table4_7_multi_view" in out


def test_out_must_be_a_new_or_empty_folder_or_a_pretraining_run(tmp_path, capsys):
    images = make_image_folder(tmp_path / "images", 4, size=(64, 48))
    listing = sorted(images.rglob("*"))
    common = ["pretrain", "--config", "scrl_tiny", "--data", str(images), "--steps", "1", "--device", "cpu", "--quiet"]
    assert main([*common, "--out", str(images)]) == 2
    assert f"--out {images} is not empty and is not a soco pretrain run" in capsys.readouterr().err
    assert main([*common, "--out", str(images / "group0" / "run")]) == 2
    assert f"is inside the image folder {images}" in capsys.readouterr().err
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me\n")
    assert main([*common, "--out", str(notes)]) == 2
    assert "is not empty and is not a soco pretrain run" in capsys.readouterr().err
    (tmp_path / "weights.pt").write_bytes(b"w")
    assert main([*common, "--out", str(tmp_path / "weights.pt")]) == 2
    assert capsys.readouterr().err.strip() == (f"soco: error: --out {tmp_path / 'weights.pt'} is a file, not a folder: "
                                               "choose a new or empty folder for the run")
    assert sorted(images.rglob("*")) == listing and os.listdir(notes) == ["todo.txt"]


@pytest.mark.slow
def test_a_full_disk_while_saving_a_checkpoint_is_one_line_on_stderr_and_in_train_log(
        tiny_data, tmp_path, capsys, monkeypatch):
    images, store = tiny_data
    out = tmp_path / "run"
    last = out / "checkpoints" / "last.pt"
    real_save = torch.save
    saves = []

    def save_until_the_disk_is_full(state, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 3:  # last.pt at step 4, after last.pt and step-00000002.pt at step 2
            path.write(b"\0" * 64)  # the part that fitted (soco.files.torch_save hands torch.save an open file)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(state, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    argv = ["pretrain", "--config", "soco_tiny", "--data", str(images), "--proposals", str(store), "--out", str(out),
            "--steps", "4", "--device", "cpu", "--quiet", "train.checkpoint_every=2"]
    assert main(argv) == 2
    error_lines = capsys.readouterr().err.strip().splitlines()
    expected = (f"stopped at step 4: cannot write checkpoint {last}: No space left on device; "
                f"the last good checkpoint is {last} (step 2); periodic checkpoints: step-00000002.pt")
    assert error_lines == [f"soco: error: {expected}"]
    assert (out / "train.log").read_text().splitlines()[-1].endswith(f" {expected}")
    assert torch.load(last, weights_only=True)["step"] == 2
    assert sorted(path.name for path in last.parent.iterdir()) == ["last.pt", "step-00000002.pt"]


def test_an_unreadable_subfolder_does_not_stop_the_default_store_lookup(tmp_path, monkeypatch):
    from pathlib import Path

    from soco.cli.pretrain_command import default_store_for
    from soco.config.loading import load_config

    images = make_image_folder(tmp_path / "images", 6, size=(48, 40))
    config = load_config("soco_tiny", [f"data.cache_dir={tmp_path / 'cache'}"])
    readable = default_store_for(images, config)
    real_scandir = os.scandir

    def scandir(path="."):
        # as root, chmod 000 does not stop reading: the folder refuses through scandir instead
        if isinstance(path, (str, os.PathLike)) and Path(path).name == "group1":
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    without_group1 = default_store_for(images, config)
    assert without_group1.parent == readable.parent == tmp_path / "cache" / "proposals"
    assert without_group1 != readable  # the listing it keys on lost group1's images
