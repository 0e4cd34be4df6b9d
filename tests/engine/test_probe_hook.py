"""The box probe during pretraining (`soco pretrain --probe-labels`): records, resume, no effect on training."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from soco.cli.main import main
from soco.cli.pretrain_command import DEFAULT_PROBE_MAX_IMAGES, build_probe_hook, probe_paths
from soco.config.loading import load_config
from soco.engine.hooks import StepHook, hook_due
from soco.engine.run_log import RunLog, read_metrics
from soco.engine.trainer import pretrain
from soco.registry import build_method
from tests.transfer import make_coco_set

PROBE_KEYS = {"probe/knn", "probe/linear", "probe/knn_random", "probe/linear_random", "probe/majority"}
# The tiny runs: a batch of 2 views of 48 px, so that each run of a few steps takes seconds.
SMALL = ["method.views.v1_size=48", "method.views.v2_size=48", "method.views.v3_size=24", "train.batch_size=2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def probe_set(tmp_path_factory):
    """(COCO file, images folder) of 6 noise images of 64x48 with two bright boxes each."""
    return make_coco_set(tmp_path_factory.mktemp("probe") / "set", count=6, size=(64, 48))


def pretrain_argv(images, store, out, *extra):
    """`soco pretrain` of the tiny SoCo on the tiny data, on the CPU."""
    return ["pretrain", "--config", "soco_tiny", "--data", str(images), "--proposals", str(store), "--out", str(out),
            "--device", "cpu", "--quiet", *extra, *SMALL]


def probe_hook(labels, every: int, config, no_background: bool = False):
    """The CLI's probe hook for `config`, as `soco pretrain --probe-labels LABELS --probe-every EVERY` builds it."""
    args = argparse.Namespace(probe_labels=str(labels), probe_images=None, probe_every=every, probe_stage=None,
                              probe_max_images=DEFAULT_PROBE_MAX_IMAGES, probe_no_background=no_background,
                              quiet=True)
    return build_probe_hook(args, config, probe_paths(args))


@pytest.mark.slow
def test_probe_without_background_boxes_scores_the_labelled_classes_only(tmp_path):
    labels, _ = make_coco_set(tmp_path / "set", count=6, size=(64, 48))
    two_classes = labels.read_text().replace('"categories": [{"id": 1, "name": "box"}]',
                                             '"categories": [{"id": 1, "name": "box"}, {"id": 2, "name": "other"}]')
    # Every second box becomes class 2, so that the labelled classes alone are two.
    data = json.loads(two_classes)
    for annotation in data["annotations"][1::2]:
        annotation["category_id"] = 2
    labels.write_text(json.dumps(data))
    config = load_config("soco_tiny", ["train.device=cpu", *SMALL])
    with_background = probe_hook(labels, 1, config).floor
    without = probe_hook(labels, 1, config, no_background=True).floor
    # 6 images of 2 boxes, 3 of them held out: 6 test boxes, and as many background boxes by default.
    assert without.classes == {"box": 6, "other": 6} and without.test_crops == 6
    assert with_background.classes == {"box": 6, "other": 6, "background": 12} and with_background.test_crops == 12
    assert probe_hook(labels, 1, config, no_background=True).background is False


@pytest.mark.slow
def test_probe_every_two_steps_is_logged_and_leaves_training_bitwise_unchanged(tiny_data, probe_set, tmp_path):
    images, store = tiny_data
    labels, _ = probe_set
    probed, plain = tmp_path / "probed", tmp_path / "plain"
    assert main(pretrain_argv(images, store, probed, "--steps", "5", "--probe-labels", str(labels),
                              "--probe-every", "2")) == 0
    assert main(pretrain_argv(images, store, plain, "--steps", "5")) == 0

    records = read_metrics(probed / "metrics.jsonl")
    probes = [r for r in records if "probe/knn" in r]
    # every second step and the last; each probe record holds the scores and nothing else
    assert [r["step"] for r in probes] == [2, 4, 5] and all(set(r) == {"step", *PROBE_KEYS} for r in probes)
    assert all(0.0 <= r[key] <= 1.0 for r in probes for key in PROBE_KEYS)
    # The floor is measured once, and every probe scores the same crops: one majority-class share.
    assert len({(r["probe/knn_random"], r["probe/linear_random"], r["probe/majority"]) for r in probes}) == 1
    training = [r for r in records if "loss" in r]
    assert [r["step"] for r in training] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in training] == [r["loss"] for r in read_metrics(plain / "metrics.jsonl")]

    probed_state = torch.load(probed / "checkpoints" / "last.pt", weights_only=True)["method_state"]
    plain_state = torch.load(plain / "checkpoints" / "last.pt", weights_only=True)["method_state"]
    assert probed_state.keys() == plain_state.keys()
    changed = [name for name, tensor in plain_state.items() if not torch.equal(tensor, probed_state[name])]
    assert changed == []  # weights and BatchNorm statistics, online and target

    events = EventAccumulator(str(probed / "tensorboard"))
    events.Reload()
    assert PROBE_KEYS <= set(events.Tags()["scalars"]) and "train/loss" in events.Tags()["scalars"]
    linear = events.Scalars("probe/linear")  # TensorBoard keeps float32
    assert [e.step for e in linear] == [2, 4, 5]
    assert [e.value for e in linear] == pytest.approx([r["probe/linear"] for r in probes], rel=1e-6)
    log = (probed / "train.log").read_text()
    assert log.count("random init (step 0): k-NN") == 1
    knn = probes[0]["probe/knn"]
    assert f"probe at step 2: k-NN {knn:.1%} (random init {probes[0]['probe/knn_random']:.1%})" in log
    assert "probe at step 5: k-NN" in log and "probe at step 3" not in log
    plain_events = EventAccumulator(str(plain / "tensorboard"))
    plain_events.Reload()
    assert not any(tag.startswith("probe/") for tag in plain_events.Tags()["scalars"])


class Killed(Exception):
    """Stands for a SIGKILL in the middle of a run."""


class KilledWhileProbing:
    """A probe hook whose process dies at step `at`: in the middle of the probe, or just after it wrote its record."""

    def __init__(self, hook, at: int, record_written: bool):
        self.hook, self.every, self.at, self.record_written = hook, hook.every, at, record_written

    def start(self, step, method, log):
        self.hook.start(step, method, log)

    def after_step(self, step, method, log):
        if step == self.at and not self.record_written:
            raise Killed
        self.hook.after_step(step, method, log)
        if step == self.at:
            raise Killed


@pytest.mark.slow
@pytest.mark.parametrize("record_written", [False, True], ids=["while-probing", "after-the-record"])
def test_a_run_killed_at_a_probe_resumes_with_each_step_probed_once(tiny_data, probe_set, tmp_path, record_written):
    images, store = tiny_data
    labels, _ = probe_set
    config = load_config("soco_tiny", ["train.device=cpu", "train.steps=4", "train.checkpoint_every=1", *SMALL])
    hook = probe_hook(labels, 1, config)
    assert isinstance(hook, StepHook)
    run = tmp_path / "run"
    with pytest.raises(Killed):
        pretrain(config, run, images, store, progress=False, hooks=[KilledWhileProbing(hook, 3, record_written)])
    # The hook runs before the step's checkpoint: the run dies with the checkpoint of step 2.
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 2
    probed = [1, 2, 3] if record_written else [1, 2]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "probe/knn" in r] == probed

    # The resume cuts the records back to step 2, then trains and probes step 3 again.
    summary = pretrain(config, run, images, store, resume=True, progress=False, hooks=[hook])
    assert summary.steps_this_run == 2
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records if "probe/knn" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    log = (run / "train.log").read_text()
    assert log.count("probe at step 3:") == (2 if record_written else 1)  # train.log keeps every session's lines
    assert log.count("random init (step 0)") == 2  # the floor, once per session
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("probe/knn")] == [1, 2, 3, 4]  # the first session's step 3 is purged


@pytest.mark.slow
def test_the_probe_leaves_random_state_modes_and_weights_alone(probe_set, tmp_path):
    labels, _ = probe_set
    config = load_config("soco_tiny", ["train.device=cpu", "train.seed=3"])
    hook = probe_hook(labels, 5, config)
    # The floor is the run's own step-0 encoder: the method the trainer builds after seeding with train.seed.
    torch.manual_seed(3)
    initial = build_method(config.method)
    from soco.transfer.probe import probe_backbone

    assert probe_backbone(initial.encoder(), hook.dataset, stage="c5", seed=3) == hook.floor

    torch.manual_seed(11)
    method = build_method(config.method)
    method.train()
    method.encoder().backbone.body.layer4.eval()  # mixed modes come back as they were, not all in training mode
    modes = {name: module.training for name, module in method.named_modules()}
    state = {name: tensor.clone() for name, tensor in method.state_dict().items()}
    random_state = torch.get_rng_state()
    log = RunLog(tmp_path / "run")
    hook.after_step(5, method, log)
    log.close()
    assert torch.equal(torch.get_rng_state(), random_state)
    assert {name: module.training for name, module in method.named_modules()} == modes
    assert all(torch.equal(tensor, state[name]) for name, tensor in method.state_dict().items())
    (record,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert record["step"] == 5 and record["probe/knn_random"] == hook.floor.knn_accuracy


def test_when_hooks_run():
    hook = argparse.Namespace(every=3)
    assert [step for step in range(1, 11) if hook_due(hook, step, total_steps=10)] == [3, 6, 9, 10]
    assert not any(hook_due(argparse.Namespace(every=0), step, total_steps=10) for step in range(1, 11))


@pytest.mark.parametrize("extra, message", [
    (["--probe-labels", "{tmp}/missing.json"], "--probe-labels: annotation file {tmp}/missing.json does not exist"),
    (["--probe-labels", "{tmp}"], "--probe-labels: annotation file {tmp} is not a file"),
    (["--probe-every", "2"], "--probe-every needs --probe-labels"),
    (["--probe-no-background"], "--probe-no-background needs --probe-labels"),
    (["--probe-labels", "{tmp}/bare.json"], "--probe-images: image folder {tmp}/images does not exist (the default"),
    (["--probe-labels", "{tmp}/bare.json", "--probe-images", "{tmp}"], "{tmp}/bare.json: not a JSON file"),
    (["--probe-labels", "{set}", "--config", "soco_r50_c4", "--probe-stage", "c5"],
     "--probe-stage c5: the soco encoder's ResNet ends at c4"),
])
def test_bad_probe_options_are_one_line_and_make_no_folder(probe_set, tmp_path, capsys, extra, message):
    (tmp_path / "bare.json").write_text("{not json")
    labels, _ = probe_set
    out = tmp_path / "run"
    # No --data: the built-in photos would be assembled after the probe's checks, which must fail first.
    argv = ["pretrain", "--config", "soco_tiny", "--out", str(out), "--device", "cpu", "--quiet",
            *(a.format(tmp=tmp_path, set=labels) for a in extra)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(tmp=tmp_path) in err, err
    assert not out.exists()
