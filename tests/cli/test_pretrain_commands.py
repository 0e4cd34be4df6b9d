"""`soco pretrain` and `soco bench` as a user runs them: the method chosen by name, overrides, bad input."""

import json

import yaml

from soco.cli.main import main


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


def test_bench_times_the_step_and_a_compared_configuration(tiny_data, tmp_path, capsys):
    images, store = tiny_data
    output = tmp_path / "bench.json"
    argv = ["bench", "--config", "soco_tiny", "--data", str(images), "--proposals", str(store), "--steps", "1",
            "--warmup", "0", "--data-batches", "1", "--device", "cpu", "--workers", "0",
            "--compare", "method.model.pool_all_levels=true", "-o", str(output)]
    assert main(argv) == 0
    result = json.loads(output.read_text())
    assert result["method"]["name"] == "soco" and result["model_step"]["batch_size"] == 4
    assert result["compared"]["change"] == "method.model.pool_all_levels=true"
    assert result["speedup_of_configured_over_compared"] > 0


def test_methods_lists_every_method_with_its_presets(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("detco: DetCo: contrastive learning at every ResNet stage")
    assert "\ninsloc: InsLoc: instance localization" in out
    assert "\nscrl: SCRL: spatially consistent representation learning" in out
    assert "\nsoco: SoCo: object-level BYOL" in out and "insloc_r50_fpn_200ep" in out
    assert "scrl_r50_200ep" in out and "table4_7_multi_view" in out
