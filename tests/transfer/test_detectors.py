"""Tests of soco transfer's five detectors: their architecture, loading real `soco export` files, one epoch each."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torchvision.models.detection import fcos_resnet50_fpn, retinanet_resnet50_fpn_v2

pytest.importorskip("pycocotools")

from soco.cli.main import main  # noqa: E402
from soco.cli.transfer_commands import add_transfer_arguments, run_transfer  # noqa: E402
from soco.config.loading import load_config  # noqa: E402
from soco.engine.checkpoint import save_checkpoint  # noqa: E402
from soco.engine.trainer import checkpoint_state  # noqa: E402
from soco.errors import ConfigError, SocoError  # noqa: E402
from soco.export import export_checkpoint  # noqa: E402
from soco.methods.soco import SoCo  # noqa: E402
from soco.transfer.detector import build_detector, load_pretrained  # noqa: E402
from soco.transfer.finetune import METRICS_NAME, TransferConfig  # noqa: E402
from soco.transfer.pooler import AlignedMultiScaleRoIAlign  # noqa: E402
from soco.transfer.weights import (  # noqa: E402
    check_depth,
    detector_widths,
    read_weights,
    resnet_depth,
)
from tests.transfer import make_coco_set  # noqa: E402

MODELS = ("faster_rcnn", "mask_rcnn", "faster_rcnn_c4", "retinanet", "fcos")
ONE_STAGE = ("retinanet", "fcos")
# Two 64-pixel images, R18, few RoIs: one epoch of any detector takes a few seconds on a CPU.
TINY = TransferConfig(
    depth=18, min_size=64, max_size=64, epochs=1, batch_size=2, eval_batch_size=2, roi_batch_per_image=16,
    rpn_pre_nms_train=200, rpn_post_nms_train=64, rpn_pre_nms_test=100, rpn_post_nms_test=32,
    detections_per_img=20, picture_images=0,
)
TINY_OVERRIDES = [f"{f.name}={json.dumps(getattr(TINY, f.name))}" for f in dataclasses.fields(TINY)
                  if getattr(TINY, f.name) != getattr(TransferConfig(), f.name)]


def _pretraining_run(folder, overrides=()):
    """(run folder, method): soco_tiny (R18) with a checkpoint written by the trainer's own checkpoint_state."""
    config = load_config("soco_tiny", list(overrides))
    torch.manual_seed(0)
    method = SoCo(config.method)
    with torch.no_grad():  # away from the init values, so that loading them shows
        for module in method.online.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.8, 1.2)
    state = checkpoint_state(method, torch.optim.SGD(method.parameters(), lr=0.1), SimpleNamespace(scaler=None),
                             config, step=4, loss=1.0, total_steps=4, skipped=0)
    save_checkpoint(state, folder / "checkpoints" / "last.pt")
    return folder, method.eval()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """soco_tiny pretrained as FPN and as C4, each exported where `soco export` puts it without -o."""
    root = tmp_path_factory.mktemp("pretrain")
    fpn_run, fpn_method = _pretraining_run(root / "fpn")
    c4_run, c4_method = _pretraining_run(root / "c4", ["method.model.variant=c4", "method.views.use_v3=false"])
    return {
        "fpn": SimpleNamespace(run=fpn_run, method=fpn_method,
                               file=export_checkpoint(fpn_run, "torchvision").output),
        # The torchvision format is R-FPN only; a C4 model's ResNet (res5 included) goes --to backbone.
        "c4": SimpleNamespace(run=c4_run, method=c4_method, file=export_checkpoint(c4_run, "backbone").output),
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(train annotations, val annotations) of tiny synthetic sets with masks (mask_rcnn needs them)."""
    root = tmp_path_factory.mktemp("coco")
    train, _ = make_coco_set(root / "train", count=2, size=(64, 64), seed=0, masks=True)
    val, _ = make_coco_set(root / "val", count=2, size=(64, 64), seed=1, masks=True)
    return train, val


def _file_state(path):
    """The export as the detector sees it: a bare ResNet (`--to backbone`) is the detector's backbone.body."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if all(not key.startswith(("backbone.", "roi_heads.")) for key in state):
        state = {"backbone.body." + key: value for key, value in state.items()}
    return state


def _expected_place(key: str, model: str) -> str | None:
    """Where a file tensor must land in `model` (None: the model has no place for it), written out by hand."""
    if model == "faster_rcnn_c4":
        if key.startswith("backbone.body.layer4."):
            return "roi_heads.box_head." + key[len("backbone.body."):]  # res5 is the C4 box head
        if key.startswith(("backbone.fpn.", "roi_heads.box_head.")):
            return None
    if model in ONE_STAGE:
        block = re.match(r"^backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d)\.(.+)$", key)
        if block:  # the file's C2..C5 are blocks 0..3; the detector's C3..C5 are 0..2
            level = int(block[2])
            return None if level == 0 else f"backbone.fpn.{block[1]}.{level - 1}.{block[3]}"
        if key.startswith("roi_heads.box_head."):
            return None
    return key


# (export, model) -> (parts loaded, file blocks not loaded, parts left at their own initialisation).
EXPECTED = {
    ("fpn", "faster_rcnn"): ({"backbone.body", "backbone.fpn", "roi_heads.box_head"}, set(),
                             {"rpn.head", "roi_heads.box_predictor"}),
    ("fpn", "mask_rcnn"): ({"backbone.body", "backbone.fpn", "roi_heads.box_head"}, set(),
                           {"rpn.head", "roi_heads.mask_head", "roi_heads.box_predictor", "roi_heads.mask_predictor"}),
    ("fpn", "faster_rcnn_c4"): ({"backbone.body", "roi_heads.box_head"}, {"backbone.fpn", "roi_heads.box_head"},
                                {"rpn.head", "roi_heads.box_predictor"}),
    ("fpn", "retinanet"): ({"backbone.body", "backbone.fpn"},
                           {"backbone.fpn.inner_blocks.0", "backbone.fpn.layer_blocks.0", "roi_heads.box_head"},
                           {"backbone.fpn.extra_blocks", "head"}),
    ("c4", "faster_rcnn"): ({"backbone.body"}, set(),
                            {"backbone.fpn", "rpn.head", "roi_heads.box_head", "roi_heads.box_predictor"}),
    ("c4", "mask_rcnn"): ({"backbone.body"}, set(), {"backbone.fpn", "rpn.head", "roi_heads.box_head",
                                                     "roi_heads.mask_head", "roi_heads.box_predictor",
                                                     "roi_heads.mask_predictor"}),
    ("c4", "faster_rcnn_c4"): ({"backbone.body", "roi_heads.box_head"}, set(), {"rpn.head", "roi_heads.box_predictor"}),
    ("c4", "retinanet"): ({"backbone.body"}, set(), {"backbone.fpn", "backbone.fpn.extra_blocks", "head"}),
}
EXPECTED[("fpn", "fcos")] = EXPECTED[("fpn", "retinanet")]
EXPECTED[("c4", "fcos")] = EXPECTED[("c4", "retinanet")]


def _nan_filled(model: str, state: dict) -> nn.Module:
    """A detector of the file's widths with every floating-point tensor NaN, so that whatever is not loaded shows."""
    detector = build_detector(model, num_classes=3, depth=18, **detector_widths(state))
    with torch.no_grad():
        for tensor in detector.state_dict().values():
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))
    return detector


@pytest.mark.slow
@pytest.mark.parametrize("export", ["fpn", "c4"])
@pytest.mark.parametrize("model", MODELS)
def test_every_exported_tensor_loads_or_is_named(runs, export, model):
    state = _file_state(runs[export].file)
    detector = _nan_filled(model, state)
    report = load_pretrained(detector, runs[export].file)
    loaded, not_loaded, random = EXPECTED[(export, model)]
    assert set(report.loaded) == loaded and set(report.not_loaded) == not_loaded and set(report.random) == random
    after = detector.state_dict()
    placed = 0
    for key, value in state.items():
        target = _expected_place(key, model)
        if target is None:
            assert any(key == group or key.startswith(group + ".") for group in report.not_loaded), key
            continue
        assert torch.equal(after[target], value), (key, target)
        placed += 1
    assert sum(report.loaded.values()) == placed
    assert sum(int(why.split()[0]) for why in report.not_loaded.values()) == len(state) - placed
    # Nothing else was written: the random parts are still all NaN, every other tensor is finite.
    for key, value in after.items():
        if value.is_floating_point():
            if any(key.startswith(part + ".") for part in report.random):
                assert torch.isnan(value).all(), key
            else:
                assert torch.isfinite(value).all(), key
    for group in report.not_loaded:
        assert group in report.line()


def test_the_tiny_export_sets_the_detector_widths(runs):
    state = read_weights(runs["fpn"].file)
    # soco_tiny: fpn_channels 32, four 256-wide head convs (torchvision's), head_fc_dim 64.
    assert detector_widths(state) == {"fpn_channels": 32, "box_head_convs": [256] * 4, "box_head_fcs": [64]}
    assert resnet_depth(state) == 18 and resnet_depth(read_weights(runs["c4"].file)) == 18
    assert detector_widths(read_weights(runs["c4"].file)) == {}
    with pytest.raises(ConfigError, match="holds a ResNet-18, but depth is 50: pass --depth 18"):
        check_depth(state, 50, runs["fpn"].file)
    # torchvision's widths do not take the file: its FPN is 32 wide.
    with pytest.raises(SocoError, match="does not fit the detector's backbone.fpn.*shape"):
        load_pretrained(build_detector("retinanet", depth=18), runs["fpn"].file)


def test_c4_detector_takes_its_own_names_and_res5_under_the_box_head(runs, tmp_path):
    """A torchvision-style C4 file (res5 as roi_heads.box_head.layer4.*, the detector's own names) loads too."""
    body = _file_state(runs["c4"].file)
    renamed = {("roi_heads.box_head." + k[len("backbone.body."):] if k.startswith("backbone.body.layer4.") else k): v
               for k, v in body.items()}
    torch.save(renamed, tmp_path / "c4.pt")
    detector = build_detector("faster_rcnn_c4", depth=18)
    report = load_pretrained(detector, tmp_path / "c4.pt")
    assert report.loaded == {"backbone.body": sum(k.startswith("backbone.body.") for k in renamed),
                             "roi_heads.box_head": sum(k.startswith("roi_heads.box_head.") for k in renamed)}
    assert detector.state_dict().keys() >= renamed.keys()
    assert all(torch.equal(detector.state_dict()[k], v) for k, v in renamed.items())
    # The same res5 into an FPN detector goes back to the trunk.
    fpn_detector = build_detector("faster_rcnn", depth=18)
    assert load_pretrained(fpn_detector, tmp_path / "c4.pt").loaded == {"backbone.body": len(renamed)}
    assert all(torch.equal(fpn_detector.state_dict()[k], v) for k, v in body.items())


def test_one_stage_p3_to_p5_are_pretrainings_p3_to_p5(runs):
    """The pretrained C3..C5 lateral and output convs give RetinaNet/FCOS exactly pretraining's P3, P4, P5."""
    method = runs["fpn"].method
    torch.manual_seed(4)
    images = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        pretraining = method.online.backbone(images)  # P2..P5 as "0".."3", and the max-pooled "pool"
        for model in ONE_STAGE:
            detector = build_detector(model, depth=18, **detector_widths(read_weights(runs["fpn"].file)))
            load_pretrained(detector, runs["fpn"].file)
            levels = detector.eval().backbone(images)
            assert list(levels) == ["0", "1", "2", "p6", "p7"]
            for ours, theirs in (("0", "1"), ("1", "2"), ("2", "3")):
                assert levels[ours].abs().mean() > 0.05
                torch.testing.assert_close(levels[ours], pretraining[theirs], rtol=0, atol=1e-6)
            assert levels["p7"].shape[-1] == 1  # 128 / 128: P7 is stride 128


def _without_fpn_norms(shapes: dict) -> dict:
    """Shapes other than the FPN's lateral/output BN (ours) and conv biases (torchvision's one-stage builders)."""
    fpn_extra = re.compile(r"^backbone\.fpn\.(inner|layer)_blocks\.\d\.(1\.|0\.bias)")
    return {k: v for k, v in shapes.items() if not fpn_extra.match(k)}


@pytest.mark.slow
@pytest.mark.parametrize("model,builder", [("retinanet", retinanet_resnet50_fpn_v2), ("fcos", fcos_resnet50_fpn)])
def test_one_stage_depth_50_is_torchvisions_but_for_bn_in_the_fpn(model, builder):
    ours = {k: tuple(v.shape) for k, v in build_detector(model, num_classes=4, depth=50).state_dict().items()}
    reference = {k: tuple(v.shape) for k, v in
                 builder(weights=None, weights_backbone=None, num_classes=4).state_dict().items()}
    assert _without_fpn_norms(ours) == _without_fpn_norms(reference)
    bn_keys = {k for k in ours if re.match(r"^backbone\.fpn\.(inner|layer)_blocks\.\d\.1\.", k)}
    assert len(bn_keys) == 2 * 3 * 5  # lateral and output convs of C3..C5, five BN tensors each
    assert not any(re.match(r"^backbone\.fpn\.(inner|layer)_blocks\.\d\.0\.bias$", k) for k in ours)


def test_c4_detector_is_detectron2s_r_c4():
    detector = build_detector("faster_rcnn_c4", num_classes=5, depth=50)
    body = detector.backbone.body
    assert list(body) == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"]  # res5 is not here
    assert detector.backbone.out_channels == 1024
    pool = detector.roi_heads.box_roi_pool
    assert isinstance(pool, AlignedMultiScaleRoIAlign) and pool.output_size == (14, 14) and pool.sampling_ratio == -1
    assert detector.roi_heads.box_head.layer4[0].conv2.stride == (2, 2)  # 14x14 -> 7x7
    assert detector.roi_heads.box_predictor.cls_score.in_features == 2048
    assert detector.roi_heads.box_predictor.cls_score.out_features == 5
    assert detector.rpn.head.conv[0][0].in_channels == 1024
    assert detector.rpn.head.cls_logits.out_channels == 15  # five sizes x three ratios on the one map
    with torch.no_grad():
        assert detector.roi_heads.box_head.eval()(torch.rand(3, 1024, 14, 14)).shape == (3, 2048)


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_each_detector_fine_tunes_one_epoch_from_an_export_and_reports_ap(runs, data, model, tmp_path, capsys):
    export = "c4" if model == "faster_rcnn_c4" else "fpn"
    train, val = data
    parser = argparse.ArgumentParser()
    add_transfer_arguments(parser)
    args = parser.parse_args(["--weights", str(runs[export].file), "--train", str(train), "--val", str(val),
                              "--model", model, "--out", str(tmp_path), "--quiet", *TINY_OVERRIDES])
    assert run_transfer(args) == 0
    printed = capsys.readouterr().out
    assert "box AP on 2 validation images" in printed and ("mask AP" in printed) == (model == "mask_rcnn")
    metrics = json.loads((tmp_path / METRICS_NAME).read_text())
    assert metrics["finished"] and metrics["model"] == model and len(metrics["history"]) == 1
    assert 0.0 <= metrics["bbox"]["AP"] <= 1.0 and metrics["history"][0]["loss"] > 0
    assert set(metrics["weights_loaded"]["loaded"]) == EXPECTED[(export, model)][0]
    assert set(metrics["weights_loaded"]["not_loaded"]) == EXPECTED[(export, model)][1]


def _error_line(capsys, weights, data, tmp_path, *extra) -> str:
    """`soco transfer --weights WEIGHTS` through the command line: its one-line error message."""
    train, val = data
    code = main(["transfer", "--weights", str(weights), "--train", str(train), "--val", str(val),
                 "--out", str(tmp_path / "out"), "--quiet", *TINY_OVERRIDES, *extra])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.slow
def test_weights_errors_are_one_clear_line(runs, data, tmp_path, capsys):
    fpn_run = runs["fpn"].run
    exported = fpn_run / "exported" / "torchvision.pt"
    line = _error_line(capsys, fpn_run / "checkpoints" / "last.pt", data, tmp_path)
    assert "is a `soco pretrain` checkpoint, not exported weights" in line and f"--weights {exported}" in line
    line = _error_line(capsys, fpn_run, data, tmp_path)
    assert f"--weights {fpn_run} is a `soco pretrain` run folder" in line and f"--weights {exported}" in line
    assert "run folder" in _error_line(capsys, fpn_run / "checkpoints", data, tmp_path)
    # A run not exported yet: the message says how.
    fresh = tmp_path / "fresh"
    (fresh / "checkpoints").mkdir(parents=True)
    shutil.copy(fpn_run / "checkpoints" / "last.pt", fresh / "checkpoints" / "last.pt")
    line = _error_line(capsys, fresh, data, tmp_path)
    assert f"run `soco export {fresh} --to torchvision`" in line
    line = _error_line(capsys, fresh / "checkpoints" / "last.pt", data, tmp_path)
    assert "is a `soco pretrain` checkpoint" in line and f"run `soco export {fresh} --to torchvision`" in line

    pkl = export_checkpoint(fpn_run, "detectron2", tmp_path / "d2.pkl").output
    line = _error_line(capsys, pkl, data, tmp_path)
    assert f"weights file {pkl} is a Detectron2 .pkl" in line
    assert "soco transfer takes a torchvision state dict (.pt/.safetensors)" in line
    mmdet = export_checkpoint(fpn_run, "mmdet", tmp_path / "mm.pth").output
    assert "is an MMDetection checkpoint" in _error_line(capsys, mmdet, data, tmp_path)
    (tmp_path / "empty").mkdir()
    assert "is a folder, not a weights file" in _error_line(capsys, tmp_path / "empty", data, tmp_path)
    assert "does not exist" in _error_line(capsys, tmp_path / "absent.pt", data, tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    assert "junk.pt cannot be read with torch.load" in _error_line(capsys, tmp_path / "junk.pt", data, tmp_path)
    line = _error_line(capsys, runs["fpn"].file, data, tmp_path, "--depth", "50")
    assert line.endswith("holds a ResNet-18, but depth is 50: pass --depth 18")
