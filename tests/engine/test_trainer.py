"""The training engine end to end on tiny data: outputs, exact resume after SIGKILL, NaN stop, bad data."""

import json
import math
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from soco.config.loading import load_config
from soco.data.proposals.store import ProposalStore
from soco.engine.step import EmptyStep
from soco.engine.trainer import TrainingDiverged, pretrain
from soco.errors import DataError, ImageReadError, ProposalStoreError, SocoError
from soco.methods.soco import SoCo
from tests.data.proposals.conftest import make_image_folder


def tiny(*overrides):
    return load_config("soco_tiny", ["train.device=cpu", *overrides])


@pytest.mark.slow
def test_run_writes_everything_a_person_needs(tiny_data, tmp_path):
    images, store = tiny_data
    summary = pretrain(tiny("train.steps=4"), tmp_path / "run", images, store, progress=False)
    run = tmp_path / "run"
    assert summary.steps == 4 and summary.steps_this_run == 4
    for name in ("config.yaml", "metrics.jsonl", "train.log", "loss.png", "views.png", "summary.json"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").iterdir())
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 4
    model = SoCo(tiny().method)
    model.load_state_dict(state["method_state"])  # the whole method, strictly
    model.encoder().load_state_dict(state["encoder"])  # the online encoder, strictly
    assert state["method"] == "soco" and state["encoder_layout"]["parts"] == ["backbone", "fpn", "box_head"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all({"loss", "lr", "ema_momentum", "images_per_second"} <= set(r) for r in records)
    assert records[0]["ema_momentum"] == pytest.approx(0.99)
    # soco_tiny's 32-pixel views are below AUTO_BF16_MIN_SIDE: `auto` computes them in fp32 on any CPU, and says so.
    log_lines = (run / "train.log").read_text().splitlines()
    assert sum(line.endswith(" precision: fp32 (train.precision=auto)") for line in log_lines) == 1
    assert json.loads((run / "summary.json").read_text())["precision"] == "fp32"


@pytest.mark.slow
def test_existing_run_needs_resume(tiny_data, tmp_path):
    images, store = tiny_data
    pretrain(tiny("train.steps=2"), tmp_path / "run", images, store, progress=False)
    with pytest.raises(SocoError, match="--resume"):
        pretrain(tiny("train.steps=2"), tmp_path / "run", images, store, progress=False)
    again = pretrain(tiny("train.steps=2"), tmp_path / "run", images, store, resume=True, progress=False)
    assert again.steps_this_run == 0


# soco_small's FPN width and view sizes on the tiny images: the pooled windows of a level then pass torch's grain size
# (32,768 values), above which the backward of advanced indexing added float gradients on several threads at once, in
# an order that changed from run to run (before, two such runs differed in 279 of 415 tensors; soco_tiny's own sizes
# stay below it and never showed it).
AS_LARGE_AS_A_RACE = ["method.model.fpn_channels=256", "method.views.v1_size=96", "method.views.v2_size=96"]


@pytest.mark.slow
def test_two_runs_with_one_seed_on_two_threads_give_bitwise_equal_weights(tiny_data, tmp_path, two_threads):
    images, store = tiny_data
    states = []
    for name in ("first", "second"):
        pretrain(tiny("train.steps=3", *AS_LARGE_AS_A_RACE), tmp_path / name, images, store, progress=False)
        states.append(torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)["method_state"])
    differing = [name for name, tensor in states[0].items() if not torch.equal(tensor, states[1][name])]
    assert not differing, f"{len(differing)} of {len(states[0])} tensors differ, e.g. {differing[:3]}"


KILLABLE = f"""
import sys, torch
torch.set_num_threads(2)
from soco.config.loading import load_config
from soco.engine.trainer import pretrain
config = load_config("soco_tiny", ["train.device=cpu", "train.steps=8", "train.checkpoint_every=1",
                                   *{AS_LARGE_AS_A_RACE!r}])
pretrain(config, sys.argv[3], sys.argv[1], sys.argv[2], resume=True, progress=False)
"""


@pytest.mark.slow
def test_sigkilled_run_resumes_bitwise_equal(tiny_data, tmp_path, two_threads):
    images, store = tiny_data
    config = tiny("train.steps=8", "train.checkpoint_every=1", *AS_LARGE_AS_A_RACE)
    pretrain(config, tmp_path / "whole", images, store, progress=False)

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-c", KILLABLE, str(images), str(store), str(killed)])
    last = killed / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 300
    while True:
        assert process.poll() is None, "the run finished before it could be killed"
        assert time.monotonic() < deadline
        if last.exists():
            try:
                if torch.load(last, weights_only=True)["step"] >= 3:
                    break
            except Exception:
                pass
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = torch.load(last, weights_only=True)["step"]
    assert 3 <= killed_at < 8

    summary = pretrain(config, killed, images, store, resume=True, progress=False)
    assert summary.steps == 8 and summary.steps_this_run == 8 - killed_at
    whole_state = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)
    resumed_state = torch.load(last, weights_only=True)
    for part in ("method_state", "encoder", "encoder_target"):
        for name, tensor in whole_state[part].items():
            assert torch.equal(tensor, resumed_state[part][name]), f"{part}.{name}"
    for key, value in whole_state["optimizer"]["state"].items():
        assert torch.equal(value["momentum_buffer"], resumed_state["optimizer"]["state"][key]["momentum_buffer"])


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    images, store = tiny_data
    real_step = SoCo.training_step
    calls = {"count": 0}

    def step_turning_nan(self, batch):
        calls["count"] += 1
        loss = real_step(self, batch)["loss"]
        return {"loss": loss * float("nan") if calls["count"] == 3 else loss}

    monkeypatch.setattr(SoCo, "training_step", step_turning_nan)
    # The third step fails; the checkpoint of the second, which was logged finite, is kept.
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    expected = rf"loss became nan at step 3 .*last good checkpoint is {re.escape(str(last))} \(step 2\)"
    with pytest.raises(TrainingDiverged, match=expected):
        pretrain(tiny("train.steps=5", "train.checkpoint_every=1"), tmp_path / "run", images, store, progress=False)
    assert torch.load(last, weights_only=True)["step"] == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    assert "loss became nan at step 3" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.slow
def test_unreadable_image_during_training_is_skipped_and_counted(tiny_data, tmp_path, monkeypatch):
    images, store = tiny_data
    import soco.data.dataset as dataset_module

    real_load = dataset_module.load_rgb
    bad = ProposalStore(store).path(0)

    def flaky_load(path):
        if str(path).endswith(bad):
            raise ImageReadError(str(path), "truncated image")
        return real_load(path)

    monkeypatch.setattr(dataset_module, "load_rgb", flaky_load)
    # 12 images, batch 4: three steps see every image once, the bad one included.
    summary = pretrain(tiny("train.steps=3"), tmp_path / "run", images, store, progress=False)
    assert summary.steps == 3 and summary.skipped_images == 1


def test_a_folder_of_only_unreadable_images_is_refused_before_anything_is_written(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "b.png", "c.jpeg", "d.jpg", "e.webp"):  # enough to fill the batch of 4
        (images / name).write_bytes(b"not an image")
    expected = rf"^no image in {re.escape(str(images))} can be read: all 5 files tried are unreadable \(e.g. a.jpg: "
    with pytest.raises(DataError, match=expected):
        pretrain(load_config("byol_image_tiny", ["train.device=cpu"]), tmp_path / "run", images, None, progress=False)
    assert not (tmp_path / "run").exists()


def test_a_step_whose_every_image_became_unreadable_stops_without_an_update(tiny_data, tmp_path, monkeypatch):
    images, _ = tiny_data
    import soco.data.dataset as dataset_module

    def failing_disk(path):
        raise ImageReadError(str(path), "cannot read file (Input/output error)")

    # The images went bad after the set-up found one readable: every sample of the first step is unreadable.
    monkeypatch.setattr(dataset_module.ImageDataset, "check_readable", lambda self: None, raising=False)
    monkeypatch.setattr(dataset_module, "load_rgb", failing_disk)
    run = tmp_path / "run"
    with pytest.raises(EmptyStep, match=r"^no sample to train on .* at step 1 .*no checkpoint was written yet$"):
        pretrain(load_config("byol_image_tiny", ["train.device=cpu"]), run, images, None, progress=False)
    assert not (run / "checkpoints" / "last.pt").exists() and not (run / "summary.json").exists()
    assert "no sample to train on" in (run / "train.log").read_text()


def test_store_of_other_images_is_refused(tiny_data, tmp_path):
    _, store = tiny_data
    other = make_image_folder(tmp_path / "other", 5)
    with pytest.raises(ProposalStoreError, match="another image folder"):
        pretrain(tiny(), tmp_path / "run", other, store, progress=False)


@pytest.mark.slow
def test_non_finite_gradient_with_finite_loss_stops_before_the_update(tiny_data, tmp_path, monkeypatch):
    images, store = tiny_data
    real_step = SoCo.training_step
    calls = {"count": 0}

    def step_with_exploding_gradient(self, batch):
        calls["count"] += 1
        outputs = real_step(self, batch)
        if calls["count"] == 2:
            weight = self.predictor.linear2.weight
            weight.register_hook(lambda grad: grad * float("inf"))
        return outputs

    monkeypatch.setattr(SoCo, "training_step", step_with_exploding_gradient)
    with pytest.raises(TrainingDiverged, match=r"gradient became non-finite .* at step 2"):
        pretrain(tiny("train.steps=4", "train.checkpoint_every=1"), tmp_path / "run", images, store, progress=False)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 1
    assert all(torch.isfinite(tensor).all() for tensor in state["method_state"].values() if tensor.is_floating_point())


@pytest.mark.slow
def test_a_methods_extra_metrics_are_averaged_over_micro_batches_and_logged(tiny_data, tmp_path, monkeypatch):
    images, store = tiny_data
    real_step = SoCo.training_step
    calls = {"count": 0}

    def step_with_a_metric(self, batch):
        calls["count"] += 1
        # micro-batches 1, 2 make step 1; 3, 4 make step 2: their means are 1.5 and 3.5
        return {**real_step(self, batch), "probe": torch.tensor(float(calls["count"])), "lr": torch.tensor(-1.0)}

    monkeypatch.setattr(SoCo, "training_step", step_with_a_metric)
    pretrain(tiny("train.steps=2", "train.batch_size=2", "train.accumulate=2"), tmp_path / "run", images, store,
             progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["probe"] for r in records] == [1.5, 3.5]
    assert all(r["lr"] >= 0 for r in records)  # a method's metric cannot overwrite the engine's own
