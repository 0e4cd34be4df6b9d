"""A run's records stay true: a resume with other settings is refused, metrics hold each step once,
a stop names the step that failed and the checkpoint to resume from, and a run writes only into its own folder."""

import json
import re

import pytest
import torch

from soco.config.loading import load_config
from soco.config.schema import ProposalsConfig
from soco.data.proposals.pipeline import run_proposals
from soco.engine.checkpoint import load_newest_checkpoint
from soco.engine.trainer import TrainingDiverged, pretrain
from soco.errors import SocoError
from soco.methods.soco import SoCo
from soco.run_folder import (
    MARKER,
    changed_settings,
    check_run_folder,
    describe_changes,
    mark_run_folder,
)
from soco.transfer.finetune import TransferConfig, finetune
from tests.data.proposals.conftest import make_image_folder


def tiny(*overrides):
    return load_config("soco_tiny", ["train.device=cpu", *overrides])


def folder_contents(folder):
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def logged_steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def turn_nan_on_call(monkeypatch, number):
    """SoCo's loss becomes NaN on its `number`-th training step (1-based), as a diverging run's would."""
    real_step = SoCo.training_step
    calls = {"count": 0}

    def step(self, batch):
        calls["count"] += 1
        outputs = real_step(self, batch)
        return {**outputs, "loss": outputs["loss"] * float("nan")} if calls["count"] == number else outputs

    monkeypatch.setattr(SoCo, "training_step", step)


@pytest.mark.slow
def test_resume_with_other_settings_is_refused_and_a_finished_run_keeps_its_records(tiny_data, tmp_path):
    images, store = tiny_data
    run = tmp_path / "run"
    pretrain(tiny("train.steps=2"), run, images, store, progress=False)
    before = folder_contents(run)

    with pytest.raises(SocoError) as refused:
        pretrain(tiny("train.steps=3", "train.batch_size=2", "train.seed=5"), run, images, store, resume=True,
                 progress=False)
    message = str(refused.value)
    assert "\n" not in message
    assert "train.steps 2 -> 3, train.batch_size 4 -> 2, train.seed 0 -> 5" in message
    other = make_image_folder(tmp_path / "other", 3, size=(64, 48))
    with pytest.raises(SocoError, match=re.escape(f"data.images {str(images.resolve())!r} -> {str(other)!r}")):
        pretrain(tiny("train.steps=2"), run, other, store, resume=True, progress=False)
    with pytest.raises(SocoError, match="method.name 'soco' -> 'scrl'"):
        pretrain(load_config("scrl_tiny", ["train.device=cpu", "train.steps=2"]), run, images, None, resume=True,
                 progress=False)
    assert folder_contents(run) == before

    # Workers and logging frequency may change; the run had finished, so nothing is trained or rewritten.
    again = pretrain(tiny("train.steps=2", "train.workers=1", "train.log_every=5"), run, images, store,
                     resume=True, progress=False)
    assert (again.steps, again.steps_this_run, again.images_per_second) == (2, 0, 0.0)
    assert again.lines()[0].startswith(f"nothing to train: the run in {run} had already finished its 2 steps")
    assert folder_contents(run) == before


@pytest.mark.slow
def test_a_run_restarted_after_a_nan_stop_logs_each_step_once(tiny_data, tmp_path, monkeypatch):
    images, store = tiny_data
    run = tmp_path / "run"
    turn_nan_on_call(monkeypatch, 2)
    with pytest.raises(TrainingDiverged, match=r"^loss became nan at step 2 \(lr .*\); stopped: no checkpoint"):
        pretrain(tiny("train.steps=2", "train.checkpoint_every=5"), run, images, store, progress=False)
    assert logged_steps(run) == [1]
    monkeypatch.undo()
    pretrain(tiny("train.steps=2", "train.checkpoint_every=5"), run, images, store, progress=False)
    assert logged_steps(run) == [1, 2]


@pytest.mark.slow
def test_resume_after_a_nan_stop_continues_the_metrics_from_the_checkpoint(tiny_data, tmp_path, monkeypatch):
    images, store = tiny_data
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    turn_nan_on_call(monkeypatch, 4)
    with pytest.raises(TrainingDiverged) as stopped:
        pretrain(tiny("train.steps=4", "train.checkpoint_every=2"), run, images, store, progress=False)
    assert str(stopped.value).startswith("loss became nan at step 4 (lr ")
    assert str(stopped.value).endswith(f"stopped: the last good checkpoint is {checkpoints / 'last.pt'} (step 2); "
                                       "periodic checkpoints: step-00000002.pt")
    assert logged_steps(run) == [1, 2, 3]  # step 3 was trained after the checkpoint, then lost
    monkeypatch.undo()
    resumed = pretrain(tiny("train.steps=4", "train.checkpoint_every=2"), run, images, store, resume=True,
                       progress=False)
    assert (resumed.steps, resumed.steps_this_run) == (4, 2)
    assert logged_steps(run) == [1, 2, 3, 4]


@pytest.mark.slow
def test_an_unreadable_last_checkpoint_resumes_from_the_newest_periodic_one(tiny_data, tmp_path):
    images, store = tiny_data
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    config = tiny("train.steps=3", "train.checkpoint_every=2")  # checkpoints at step 2 (last + periodic) and 3
    pretrain(config, run, images, store, progress=False)
    (checkpoints / "last.pt").write_bytes(b"torn by a failing disk")
    resumed = pretrain(config, run, images, store, resume=True, progress=False)
    assert (resumed.steps, resumed.steps_this_run) == (3, 1)
    assert torch.load(checkpoints / "last.pt", weights_only=True)["step"] == 3
    log = (run / "train.log").read_text()
    assert f"checkpoint {checkpoints / 'last.pt'} cannot be read" in log
    assert f"resuming from {checkpoints / 'step-00000002.pt'} (step 2)" in log
    assert logged_steps(run) == [1, 2, 3]


def test_no_readable_checkpoint_is_an_error_naming_each_file(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"\x00" * 10)
    (tmp_path / "step-00000002.pt").write_bytes(b"")
    with pytest.raises(SocoError) as error:
        load_newest_checkpoint(tmp_path)
    assert f"checkpoint {tmp_path / 'last.pt'} cannot be read" in str(error.value)
    assert f"checkpoint {tmp_path / 'step-00000002.pt'} cannot be read" in str(error.value)
    assert load_newest_checkpoint(tmp_path / "absent") is None


@pytest.mark.slow
def test_images_the_store_left_out_are_logged_once(tmp_path):
    images = make_image_folder(tmp_path / "images", 4, size=(96, 72))
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    run_proposals(images, tmp_path / "store", ProposalsConfig(workers=1), progress=False)
    pretrain(tiny("train.steps=1"), tmp_path / "run", images, tmp_path / "store", progress=False)
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("1 image left out (failed proposals)") == 1


def test_run_folder_kinds(tmp_path):
    assert check_run_folder(tmp_path / "new", "pretrain") is False
    assert check_run_folder(tmp_path, "pretrain") is False  # empty
    # Another process of the same run writing the marker at this moment.
    (tmp_path / ".soco-run.123.tmp.json").write_text("")
    assert check_run_folder(tmp_path, "pretrain") is False
    mark_run_folder(tmp_path, "pretrain")
    assert json.loads((tmp_path / MARKER).read_text())["kind"] == "pretrain"
    assert check_run_folder(tmp_path, "pretrain") is True
    with pytest.raises(SocoError, match="holds a soco pretrain run, not a transfer run"):
        check_run_folder(tmp_path, "transfer")
    older = tmp_path / "older"  # a pretraining run of a soco without the marker
    (older / "checkpoints").mkdir(parents=True)
    (older / "checkpoints" / "last.pt").write_bytes(b"")
    assert check_run_folder(older, "pretrain") is True


def test_changed_settings_name_each_key_with_old_and_new_values():
    recorded = {"train": {"batch_size": 4, "workers": 0, "seed": 0}, "optim": {"lr": [1, 2]}, "data": {"x": 1}}
    current = {"train": {"batch_size": 8, "workers": 2, "seed": 0}, "optim": {"lr": [1, 3]}, "data": {"x": 2}}
    changes = changed_settings(recorded, current, may_change=("train.workers", "data"))
    assert changes == [("train.batch_size", 4, 8), ("optim.lr", [1, 2], [1, 3])]
    assert describe_changes(changes) == "train.batch_size 4 -> 8, optim.lr [1, 2] -> [1, 3]"
    assert changed_settings({"train": {}}, {"train": {"new_key": 1}}) == []  # a key an older soco did not have


def test_transfer_writes_only_into_a_new_empty_or_transfer_folder(tmp_path):
    def transfer_into(out):
        absent = tmp_path / "absent.json"
        finetune(TransferConfig(device="cpu"), absent, tmp_path, absent, tmp_path, out, progress=False,
                 log=lambda _: None)

    images = make_image_folder(tmp_path / "images", 2, size=(32, 32))
    listing = sorted(images.rglob("*"))
    with pytest.raises(SocoError, match=f"--out {images} is not empty and is not a soco transfer run"):
        transfer_into(images)
    assert sorted(images.rglob("*")) == listing
    pretraining_run = mark_run_folder(tmp_path / "pretrain-run", "pretrain")
    with pytest.raises(SocoError, match="holds a soco pretrain run, not a transfer run"):
        transfer_into(pretraining_run)
    (tmp_path / "weights.pt").write_bytes(b"w")
    with pytest.raises(SocoError, match="weights.pt is a file, not a folder"):
        transfer_into(tmp_path / "weights.pt")
    # A new folder is claimed only once the data has loaded: missing annotations leave nothing behind
    # (a run that starts marks its folder: tests/transfer/test_finetune.py).
    with pytest.raises(SocoError, match="absent.json"):
        transfer_into(tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


@pytest.mark.slow
def test_a_method_without_proposals_resumes_whether_or_not_a_store_is_named(tiny_data, tmp_path):
    images, store = tiny_data
    scrl = load_config("scrl_tiny", ["train.device=cpu", "train.steps=2"])
    run = tmp_path / "scrl"
    pretrain(scrl, run, images, store, progress=False)  # a store named, never read
    before = folder_contents(run)
    again = pretrain(scrl, run, images, None, resume=True, progress=False)
    assert again.steps == 2 and folder_contents(run) == before
    # SoCo reads proposals: for it the store stays part of the run's data
    soco_run = tmp_path / "soco"
    pretrain(tiny("train.steps=2"), soco_run, images, store, progress=False)
    with pytest.raises(SocoError, match="data.proposals"):
        pretrain(tiny("train.steps=2"), soco_run, images, None, resume=True, progress=False)
