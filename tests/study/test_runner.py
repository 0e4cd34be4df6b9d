"""A whole tiny study: arms pretrained, exported and fine-tuned with two readings; split runs resume and combine."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("pycocotools")

from soco.cli.main import main  # noqa: E402
from soco.cli.study_command import ReportInputs, write_report  # noqa: E402
from soco.errors import ConfigError, DataError  # noqa: E402
from soco.study.design import BUDGETS, Budget, parse_length_arm, select_arms  # noqa: E402
from soco.study.runner import (  # noqa: E402
    PROBE_NAME,
    STUDY_MARKER,
    TIMINGS_NAME,
    StudyData,
    _study_lock,
    finetune_dir,
    pretraining_settings,
    run_study,
)
from tests.transfer import make_coco_set  # noqa: E402

TINY_BUDGET = Budget(
    name="tiny", model_size="tiny", pretrain_steps=2, extra_lengths=(1,), length_readings=("frozen",),
    pretrain_overrides=("train.batch_size=4",),
    head_overrides=("method.model.head_conv_channels=16",),
    transfer=dict(depth=18, epochs=2, batch_size=2, min_size=64, max_size=64, eval_batch_size=2,
                  roi_batch_per_image=16, rpn_pre_nms_train=200, rpn_post_nms_train=64, rpn_pre_nms_test=100,
                  rpn_post_nms_test=32, detections_per_img=20, picture_images=0, eval_every=1,
                  fpn_channels=32, box_head_convs=[16, 16, 16, 16], box_head_fcs=[64]),
    tile_size=0,
)


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_data):
    """A study folder after one call with seed 0, and its data."""
    root = tmp_path_factory.mktemp("study")
    train = make_coco_set(root / "coco_train", count=2, size=(64, 64), seed=0)
    val = make_coco_set(root / "coco_val", count=2, size=(64, 64), seed=1)
    data = StudyData(*train, *val, unlabeled=[tiny_data[0]], name="tiny synthetic")
    lines = []
    run_study(TINY_BUDGET, ["scratch", "soco", "soco@1"], [0], ["full", "frozen"], data, root / "study",
              device="cpu", progress=False, log=lines.append)
    return root / "study", data, lines


@pytest.mark.slow
def test_every_arm_reading_and_seed_has_its_finished_run(study):
    folder, data, lines = study
    done = sorted(str(p.parent.relative_to(folder / "finetune")) for p in folder.glob("finetune/*/*/*/metrics.json"))
    # the extra length is read frozen only (the budget's length_readings)
    assert done == ["frozen/scratch/seed0", "frozen/soco/seed0", "frozen/soco@1/seed0", "full/scratch/seed0",
                    "full/soco/seed0"]
    metrics = json.loads((finetune_dir(folder, "frozen", "soco", 0) / "metrics.json").read_text())
    assert metrics["finished"] and metrics["settings"]["freeze"] == "backbone"
    assert metrics["weights"].endswith("pretrain/soco/exported/torchvision.pt")
    assert sum(metrics["weights_loaded"]["loaded"].values()) > 0
    assert [h["epoch"] for h in metrics["history"] if h.get("val")] == [1]  # the learning curve's points
    scratch = json.loads((finetune_dir(folder, "full", "scratch", 0) / "metrics.json").read_text())
    assert scratch["weights"] == "none" and scratch["settings"]["freeze"] == "none"
    # each length is its own run with its own schedule
    for arm, steps in (("soco", 2), ("soco@1", 1)):
        log = (folder / "pretrain" / arm / "metrics.jsonl").read_text().splitlines()
        assert max(json.loads(line)["step"] for line in log if '"step"' in line) == steps
    probe = json.loads((folder / PROBE_NAME).read_text())
    assert set(probe) == {"c4", "c5"} and set(probe["c5"]) == {"soco", "soco@1", "random init"}
    assert all(0.0 <= s["knn"] <= 1.0 and 0.0 <= s["linear"] <= 1.0 for s in probe["c5"].values())
    timings = json.loads((folder / TIMINGS_NAME).read_text())
    assert {"proposals", "pretrain/soco", "pretrain/soco@1", "finetune/full/scratch/seed0", "probe"} <= set(timings)
    assert any(line.startswith("[soco] frozen seed 0: AP ") for line in lines)
    marker = json.loads((folder / STUDY_MARKER).read_text())
    assert marker["budget"] == "tiny" and marker["data"].startswith("tiny synthetic + /")
    assert marker["unlabeled"] == [str(data.unlabeled[0].resolve())]


@pytest.mark.slow
def test_a_later_call_adds_seeds_without_redoing_finished_runs(study, tmp_path):
    folder, data, _ = study
    finished = {p: p.stat().st_mtime_ns for p in folder.glob("finetune/*/*/*/metrics.json")}
    # byol_image reads no proposals: it is pretrained without the store (and so can be split off in any call)
    lines = []
    run_study(TINY_BUDGET, ["scratch", "soco", "byol_image"], [0, 1], ["full"], data, folder, device="cpu",
              progress=False, probe=False, log=lines.append)
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in finished.items())
    # the finished soco run is reused: no step ran, so no rate is claimed for it
    steps = TINY_BUDGET.pretrain_steps
    assert any(line.startswith(f"[soco] already pretrained ({steps} steps, final loss ") for line in lines)
    assert not any(line.startswith("[soco] pretrained") for line in lines)
    byol_state = torch.load(folder / "pretrain" / "byol_image" / "checkpoints" / "last.pt", weights_only=False)
    assert byol_state["data"]["proposals"] is None
    assert (finetune_dir(folder, "full", "byol_image", 1) / "metrics.json").is_file()
    assert (finetune_dir(folder, "full", "scratch", 1) / "metrics.json").is_file()
    assert (finetune_dir(folder, "full", "soco", 1) / "metrics.json").is_file()
    assert not finetune_dir(folder, "frozen", "soco", 1).exists()
    markdown = write_report(folder, tmp_path, TINY_BUDGET, data.name, ReportInputs("soco study (test)"))
    text = markdown.read_text()
    assert "| scratch | 2 |" in text and "| soco | 2 |" in text and "| soco@1 | 1 |" in text
    assert "(> 2σ" in text or "(within 2σ" in text
    assert (tmp_path / "study_tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((tmp_path / "study_tiny.json").read_text())
    assert {(r["reading"], r["arm"]) for r in report["rows"]} >= {("full", "soco"), ("frozen", "soco@1")}
    # the folder belongs to this study: another budget or other pretraining images are refused
    with pytest.raises(DataError, match="holds another study .budget: tiny -> other"):
        run_study(dataclasses.replace(TINY_BUDGET, name="other"), ["scratch"], [0], ["full"], data, folder,
                  device="cpu", progress=False)
    with pytest.raises(DataError, match=r"unlabeled: \['/.*'\] -> \[\]"):
        run_study(TINY_BUDGET, ["scratch"], [0], ["full"], dataclasses.replace(data, unlabeled=[]), folder,
                  device="cpu", progress=False)
    with _study_lock(folder), pytest.raises(DataError, match=f"{folder} is in use by another `soco study` run"):
        run_study(TINY_BUDGET, ["scratch"], [0], ["full"], data, folder, device="cpu", progress=False)


def test_arm_names_and_command_errors(tmp_path, capsys):
    assert select_arms(None, BUDGETS["cpu"]) == ["scratch", "byol_image", "byol", "soco", "scrl", "insloc",
                                                 "detco", "soco@75", "soco@150"]
    assert select_arms(["soco@20", "scratch", "soco@20"], BUDGETS["cpu"]) == ["soco@20", "scratch"]
    assert select_arms(["soco@300", "soco"], BUDGETS["cpu"]) == ["soco"]  # the budget's own length
    assert parse_length_arm("insloc@40") == ("insloc", 40) and parse_length_arm("soco") == ("soco", None)
    with pytest.raises(ConfigError, match="unknown arm 'moco'"):
        select_arms(["moco"], BUDGETS["cpu"])
    with pytest.raises(ConfigError, match="unknown arm 'scratch@10'"):
        select_arms(["scratch@10"], BUDGETS["cpu"])
    assert main(["study", "--train", str(tmp_path / "a.json"), "--out", str(tmp_path / "s")]) == 2
    assert "--train and --val go together" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_each_arm_pretrains_with_its_method_s_preset_and_overrides(capsys):
    cpu, gpu = BUDGETS["cpu"], BUDGETS["gpu"]
    shared = [*cpu.pretrain_overrides, "train.steps=300", "train.device=cpu"]
    heads = list(cpu.head_overrides)
    queue = ["method.queue_size=256"]  # the cpu budget's MoCo queues, shorter than an epoch of its data
    expected = {"byol_image": ("byol_image_small", shared), "byol": ("byol_small", shared),
                "soco": ("soco_small", [*shared, *heads]),
                "scrl": ("scrl_small", shared), "insloc": ("insloc_small", [*shared, *heads, *queue]),
                "detco": ("detco_small", [*shared, *queue])}
    for arm, (preset, overrides) in expected.items():
        assert pretraining_settings(arm, cpu, "cpu") == (preset, overrides), arm
    assert pretraining_settings("soco@75", cpu, "cpu")[1][3] == "train.steps=75"
    r50 = {arm: pretraining_settings(arm, gpu, "cuda") for arm in expected}
    assert {arm: preset for arm, (preset, _) in r50.items()} == {
        "byol_image": "byol_image_r50", "byol": "byol_r50_100ep", "soco": "soco_r50_fpn", "scrl": "scrl_r50_200ep",
        "insloc": "insloc_r50_fpn_200ep", "detco": "detco_r50_200ep"}
    assert all(overrides == [*gpu.pretrain_overrides, "train.steps=3000", "train.device=cuda"]
               for _, overrides in r50.values())
    assert main(["study", "--arms", "insloc", "scratch", "--plan", "--device", "cpu"]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert plan[0] == "soco study, cpu budget: 2 arm(s), seeds 0 1 2"
    assert plan[1].startswith("insloc: InsLoc: backbone, FPN and box head; method insloc, preset insloc_small (")
    assert plan[1].endswith("method.queue_size=256), 300 steps; exports torchvision; fine-tuned full, frozen")
    assert plan[2] == "scratch: random init of the whole detector; fine-tuned full, frozen"


def test_sigterm_ends_a_study_through_its_finally_blocks():
    import os
    import signal

    from soco.cli.study_command import _stop_cleanly_on_signals

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell's `cmd &` leaves it
        _stop_cleanly_on_signals()
        for sig in (signal.SIGTERM, signal.SIGINT):
            cleaned = []
            with pytest.raises(KeyboardInterrupt):
                try:
                    os.kill(os.getpid(), sig)  # the handler runs before the next line
                finally:
                    cleaned.append(sig)
            assert cleaned == [sig]
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_a_bad_arm_configuration_is_refused_before_the_study_folder_is_made(tmp_path, monkeypatch, capsys):
    from soco.study import design

    bad = dataclasses.replace(BUDGETS["cpu"], pretrain_overrides=("train.batch_size=0",))
    monkeypatch.setitem(design.BUDGETS, "cpu", bad)
    (train, _), (val, _) = make_coco_set(tmp_path / "train"), make_coco_set(tmp_path / "val")
    study_dir = tmp_path / "study"
    assert main(["study", "--train", str(train), "--val", str(val), "--arms", "scratch", "soco", "--out",
                 str(study_dir), "--quiet"]) == 2
    assert "train.batch_size: must be at least 1, not 0" in capsys.readouterr().err
    assert not study_dir.exists()


@pytest.mark.slow
def test_a_finished_seed_is_not_reused_after_the_train_annotations_change(tmp_path, monkeypatch):
    train = make_coco_set(tmp_path / "train", count=2, size=(64, 64), seed=0)
    val = make_coco_set(tmp_path / "val", count=2, size=(64, 64), seed=1)
    data = StudyData(*train, *val, name="tiny synthetic")
    folder = tmp_path / "study"
    run_study(TINY_BUDGET, ["scratch"], [0], ["full"], data, folder, device="cpu", progress=False, probe=False,
              log=lambda _: None)
    seed0 = finetune_dir(folder, "full", "scratch", 0) / "metrics.json"
    kept = seed0.read_bytes()
    # The same files given by relative paths are the same study, and its finished seed is read, not rerun.
    monkeypatch.chdir(tmp_path)
    relative = StudyData(Path("train/annotations.json"), Path("train/images"), Path("val/annotations.json"),
                         Path("val/images"), name="tiny synthetic")
    run_study(TINY_BUDGET, ["scratch"], [0], ["full"], relative, Path("study"), device="cpu", progress=False,
              probe=False, log=lambda _: None)
    assert seed0.read_bytes() == kept
    cut = json.loads(train[0].read_text())
    cut["annotations"] = cut["annotations"][:1]
    train[0].write_text(json.dumps(cut))
    with pytest.raises(DataError) as refused:
        run_study(TINY_BUDGET, ["scratch"], [0, 1], ["full"], data, folder, device="cpu", progress=False,
                  probe=False, log=lambda _: None)
    message = str(refused.value)
    assert "\n" not in message and f"the train annotations {train[0].resolve()} changed" in message
    assert "another --out" in message and str(seed0.parent) in message
    assert seed0.read_bytes() == kept and not finetune_dir(folder, "full", "scratch", 1).exists()
