"""Tests of soco.transfer.detector and finetune: the v2 architecture, weight loading, recipe, tiny resumable runs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import pytest
import torch
from torch import nn
from torchvision.models.detection import fasterrcnn_resnet50_fpn_v2, maskrcnn_resnet50_fpn_v2
from torchvision.ops import MultiScaleRoIAlign

pytest.importorskip("pycocotools")

from soco.cli.main import main  # noqa: E402
from soco.cli.transfer_commands import add_transfer_arguments, resolve_transfer_config, run_transfer  # noqa: E402
from soco.errors import ConfigError, DataError, SocoError  # noqa: E402
from soco.run_folder import MARKER  # noqa: E402
from soco.transfer.detector import build_detector, convert_sync_bn, load_pretrained  # noqa: E402
from soco.transfer.finetune import (  # noqa: E402
    CHECKPOINT_NAME,
    METRICS_NAME,
    PICTURE_NAME,
    TransferConfig,
    _epoch_batches,
    apply_overrides,
    finetune,
    lr_factor,
)
from soco.transfer.pooler import AlignedMultiScaleRoIAlign  # noqa: E402
from tests.transfer import make_coco_set  # noqa: E402

# Small enough for two slow shared cores: the 4conv1fc head costs ~0.12 GFLOP per RoI.
TINY = TransferConfig(
    depth=18, min_size=64, max_size=64, epochs=2, batch_size=2, eval_batch_size=2, roi_batch_per_image=16,
    rpn_pre_nms_train=200, rpn_post_nms_train=64, rpn_pre_nms_test=100, rpn_post_nms_test=32,
    detections_per_img=20, picture_images=2,
)
TINY_OVERRIDES = [f"{f.name}={json.dumps(getattr(TINY, f.name))}" for f in dataclasses.fields(TINY)
                  if getattr(TINY, f.name) != getattr(TransferConfig(), f.name)]


def _state(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}


@pytest.mark.slow
@pytest.mark.parametrize("builder,name", [(fasterrcnn_resnet50_fpn_v2, "faster_rcnn"),
                                          (maskrcnn_resnet50_fpn_v2, "mask_rcnn")])
def test_depth_50_is_torchvisions_v2_detector(builder, name):
    ours = build_detector(name, num_classes=3, depth=50)
    reference = builder(weights=None, weights_backbone=None, num_classes=3)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    # The same modules, except that the RoI poolers pool as pretraining did (aligned, adaptive sampling).
    assert [type(m) for m in ours.modules()] == [
        AlignedMultiScaleRoIAlign if type(m) is MultiScaleRoIAlign else type(m) for m in reference.modules()]
    assert all(p.requires_grad for p in ours.parameters())  # nothing frozen
    # Zero-initialised residual BN, as in pretraining (torchvision's builder leaves gamma at 1).
    assert not ours.backbone.body.layer1[0].bn3.weight.detach().any()


def test_smaller_depth_keeps_the_architecture():
    model = build_detector("faster_rcnn", depth=18, min_size=96, max_size=128)
    assert model.transform.min_size == (96,) and model.transform.max_size == 128
    assert isinstance(model.roi_heads.box_head[0][1], nn.BatchNorm2d)
    assert not any(type(m).__name__ == "FrozenBatchNorm2d" for m in model.modules())
    synced = convert_sync_bn(model, world_size=2, device=torch.device("cuda"))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    alone = build_detector("faster_rcnn", depth=18)
    assert convert_sync_bn(alone, world_size=1, device=torch.device("cuda")) is alone
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in alone.modules())


def _weights_file(path, depth=18, seed=123):
    """What `soco export --to torchvision` writes: backbone.* and roi_heads.box_head.* of a detector."""
    torch.manual_seed(seed)
    source = build_detector("faster_rcnn", depth=depth)
    for p in source.parameters():  # not the init values, so that loading is visible
        p.data.normal_()
    subset = {**_state(source, "backbone."), **_state(source, "roi_heads.box_head.")}
    torch.save(subset, path)
    return source, subset


@pytest.mark.slow
def test_load_pretrained_takes_backbone_fpn_and_box_head_strictly(tmp_path):
    source, subset = _weights_file(tmp_path / "w.pt")
    torch.manual_seed(0)
    model = build_detector("faster_rcnn", depth=18)
    rpn_before = _state(model, "rpn.")
    report = load_pretrained(model, tmp_path / "w.pt")
    assert set(report.loaded) == {"backbone.body", "backbone.fpn", "roi_heads.box_head"}
    assert sum(report.loaded.values()) == len(subset)
    assert report.random == ["rpn.head", "roi_heads.box_predictor"]
    for key, value in subset.items():
        assert torch.equal(model.state_dict()[key], value), key
    for key, value in rpn_before.items():
        assert torch.equal(model.state_dict()[key], value)
    assert "loaded backbone.body" in report.line()


@pytest.mark.slow
def test_load_pretrained_reads_safetensors_and_bare_resnets(tmp_path):
    from safetensors.torch import save_file

    _, subset = _weights_file(tmp_path / "w.pt")
    save_file({k: v.contiguous() for k, v in subset.items()}, str(tmp_path / "w.safetensors"))
    model = build_detector("faster_rcnn", depth=18)
    report = load_pretrained(model, tmp_path / "w.safetensors")
    assert set(report.loaded) == {"backbone.body", "backbone.fpn", "roi_heads.box_head"}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in subset.items())
    body = {k[len("backbone.body."):]: v for k, v in subset.items() if k.startswith("backbone.body.")}
    torch.save(body, tmp_path / "resnet.pt")  # what `soco export --to backbone` writes
    report = load_pretrained(build_detector("faster_rcnn", depth=18), tmp_path / "resnet.pt")
    assert report.loaded == {"backbone.body": len(body)}
    assert report.random == ["backbone.fpn", "rpn.head", "roi_heads.box_head", "roi_heads.box_predictor"]


@pytest.mark.slow
def test_load_pretrained_errors_name_the_file(tmp_path):
    model = build_detector("faster_rcnn", depth=18)
    _, subset = _weights_file(tmp_path / "ok.pt")
    torch.save({**subset, "projector.linear1.weight": torch.zeros(2, 2)}, tmp_path / "extra.pt")
    with pytest.raises(SocoError, match="extra.pt: 1 key.*projector.linear1.weight"):
        load_pretrained(model, tmp_path / "extra.pt")
    torch.save({k: v for k, v in subset.items() if k != "backbone.fpn.inner_blocks.0.0.weight"},
               tmp_path / "missing.pt")
    with pytest.raises(SocoError, match="missing.pt does not fit the detector's backbone.fpn.*missing 1"):
        load_pretrained(model, tmp_path / "missing.pt")
    _weights_file(tmp_path / "r34.pt", depth=34)
    with pytest.raises(SocoError, match="r34.pt does not fit the detector's backbone.body.*unexpected"):
        load_pretrained(model, tmp_path / "r34.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(SocoError, match="junk.pt cannot be read"):
        load_pretrained(model, tmp_path / "junk.pt")
    # BN counters may be left out: they do not change the network.
    torch.save({k: v for k, v in subset.items() if not k.endswith("num_batches_tracked")}, tmp_path / "nbt.pt")
    assert load_pretrained(model, tmp_path / "nbt.pt").loaded


def test_overrides_are_strict():
    config = apply_overrides(TransferConfig(), ["lr=0.01", "transfer.epochs=3", "steps=[0.5, 0.75]"])
    assert config.lr == 0.01 and config.epochs == 3 and config.steps == [0.5, 0.75]
    with pytest.raises(ConfigError, match="unknown transfer key 'weight_decai'; did you mean 'weight_decay'"):
        apply_overrides(TransferConfig(), ["weight_decai=1e-4"])
    with pytest.raises(ConfigError, match="epochs: expected an integer"):
        apply_overrides(TransferConfig(), ["epochs=1.5"])
    increasing = (r"^transfer\.steps: must be increasing shares of training in \(0, 1\], not \[0\.9, 0\.5\] "
                  r"\(set by steps=\[0\.9, 0\.5\]\)$")
    with pytest.raises(ConfigError, match=increasing):
        apply_overrides(TransferConfig(), ["steps=[0.9, 0.5]"])
    with pytest.raises(ConfigError, match="^transfer.model: must be one of 'auto', "):
        apply_overrides(TransferConfig(), ["model=yolo"])


def test_lr_schedule_warmup_and_steps():
    # 90 iterations, warm-up 10 from 0.001, x0.1 at 60 and 80 (Detectron2's 1x shape).
    def f(i):
        return lr_factor(i, 10, 0.001, [60, 80], 0.1)

    assert f(0) == pytest.approx(0.001)
    assert f(5) == pytest.approx(0.001 * 0.5 + 0.5)
    assert f(10) == f(59) == 1.0
    assert f(60) == pytest.approx(0.1) and f(79) == pytest.approx(0.1)
    assert f(80) == pytest.approx(0.01) and f(89) == pytest.approx(0.01)


def test_epoch_batches_are_seeded_and_cover_the_set():
    first = _epoch_batches(10, 4, seed=1, epoch=0, rank=0, world_size=1)
    assert [len(b) for b in first] == [4, 4, 2]
    assert sorted(i for b in first for i in b) == list(range(10))
    assert first == _epoch_batches(10, 4, seed=1, epoch=0, rank=0, world_size=1)
    assert first != _epoch_batches(10, 4, seed=1, epoch=1, rank=0, world_size=1)
    # Two processes: the same number of non-empty batches each, together the whole set.
    ranks = [_epoch_batches(10, 2, seed=1, epoch=0, rank=r, world_size=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3 and all(b for r in ranks for b in r)
    assert set(i for r in ranks for b in r for i in b) == set(range(10))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(train annotations, train images, val annotations, val images) of tiny synthetic sets."""
    root = tmp_path_factory.mktemp("coco")
    train = make_coco_set(root / "train", count=2, size=(64, 64), seed=0)
    val = make_coco_set(root / "val", count=2, size=(64, 64), seed=1)
    return (*train, *val)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """An uninterrupted 2-epoch run from scratch: (run folder, metrics)."""
    out = tmp_path_factory.mktemp("straight")
    metrics = finetune(TINY, *data, out, weights=None, progress=False, log=lambda _: None)
    return out, metrics


@pytest.mark.slow
def test_run_from_scratch_writes_metrics_picture_and_checkpoint(straight):
    out, metrics = straight
    saved = json.loads((out / METRICS_NAME).read_text())
    assert saved["finished"] and saved["weights"] == "none" and saved["seed"] == 0
    assert {"AP", "AP50", "AP75"} <= set(saved["bbox"]) and 0.0 <= saved["bbox"]["AP"] <= 1.0
    assert [h["epoch"] for h in saved["history"]] == [1, 2]
    assert json.loads((out / MARKER).read_text())["kind"] == "transfer"  # the folder says what it holds
    assert all(h["loss"] > 0 for h in saved["history"])
    assert saved["settings"]["depth"] == 18 and saved["model"] == "faster_rcnn"
    assert saved["precision"] == "fp32"  # resolved by the engine's one resolver, as pretraining's
    assert saved["plan"]["total_iters"] == 2 and saved["plan"]["lr"] == pytest.approx(0.02 * 2 / 16)
    assert (out / PICTURE_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = torch.load(out / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert state["epoch"] == 2 and {"model", "optimizer", "scheduler", "rng"} <= set(state)


@pytest.mark.slow
def test_resume_after_epoch_one_equals_the_straight_run(data, straight, tmp_path):
    out, metrics = straight
    first = finetune(TINY, *data, tmp_path, progress=False, stop_after_epochs=1, log=lambda _: None)
    assert not first["finished"] and "bbox" not in first
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["epoch"] == 1
    with pytest.raises(SocoError, match="already holds a fine-tuning run"):
        finetune(TINY, *data, tmp_path, progress=False, log=lambda _: None)
    with pytest.raises(SocoError, match="other settings \\(seed"):
        finetune(dataclasses.replace(TINY, seed=5), *data, tmp_path, resume=True, progress=False,
                 log=lambda _: None)
    torch.save({}, tmp_path / "other.pt")
    with pytest.raises(SocoError, match="started from weights none"):
        finetune(TINY, *data, tmp_path, weights=tmp_path / "other.pt", resume=True, progress=False,
                 log=lambda _: None)
    resumed = finetune(TINY, *data, tmp_path, resume=True, progress=False, log=lambda _: None)
    straight_state = torch.load(out / CHECKPOINT_NAME, weights_only=True)["model"]
    resumed_state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["model"]
    assert straight_state.keys() == resumed_state.keys()
    for key in straight_state:
        assert torch.equal(straight_state[key], resumed_state[key]), key
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in metrics["history"]]
    assert resumed["bbox"] == metrics["bbox"]


@pytest.mark.slow
def test_cli_run_with_a_weights_file(data, tmp_path, capsys):
    _weights_file(tmp_path / "soco.pt")
    train_ann, train_images, val_ann, val_images = data
    parser = argparse.ArgumentParser()
    add_transfer_arguments(parser)
    args = parser.parse_args([
        "--weights", str(tmp_path / "soco.pt"), "--train", str(train_ann), "--val", str(val_ann),
        "--epochs", "1", "--seed", "7", "--out", str(tmp_path / "run"), "--quiet", *TINY_OVERRIDES,
    ])
    assert resolve_transfer_config(args).epochs == 1  # the flag wins over the key=value
    assert run_transfer(args) == 0
    printed = capsys.readouterr().out
    assert "loaded backbone.body" in printed and "box AP on 2 validation images" in printed
    saved = json.loads((tmp_path / "run" / METRICS_NAME).read_text())
    assert saved["weights"] == str(tmp_path / "soco.pt") and saved["seed"] == 7
    assert set(saved["weights_loaded"]["loaded"]) == {"backbone.body", "backbone.fpn", "roi_heads.box_head"}
    assert {"AP", "AP50", "AP75"} <= set(saved["bbox"])
    assert (tmp_path / "run" / PICTURE_NAME).is_file() and (tmp_path / "run" / CHECKPOINT_NAME).is_file()


def test_cli_errors(data, tmp_path):
    train_ann, _, val_ann, _ = data
    parser = argparse.ArgumentParser()
    add_transfer_arguments(parser)
    args = parser.parse_args(["--weights", str(tmp_path / "absent.pt"), "--train", str(train_ann),
                              "--val", str(val_ann)])
    with pytest.raises(SocoError, match="absent.pt does not exist"):
        run_transfer(args)
    args = parser.parse_args(["--weights", "none", "--train", str(train_ann), "--val", str(val_ann), "epoch=3"])
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        run_transfer(args)


@pytest.mark.slow
def test_mask_annotations_select_mask_rcnn_and_mask_ap(tmp_path):
    train = make_coco_set(tmp_path / "train", count=2, size=(64, 64), seed=0, masks=True)
    val = make_coco_set(tmp_path / "val", count=1, size=(64, 64), seed=1, masks=True)
    config = dataclasses.replace(TINY, epochs=1, picture_images=0)
    metrics = finetune(config, *train, *val, tmp_path / "run", progress=False, log=lambda _: None)
    assert metrics["model"] == "mask_rcnn"
    assert {"AP", "AP50", "AP75"} <= set(metrics["bbox"]) and {"AP", "AP50", "AP75"} <= set(metrics["segm"])
    boxes_only = make_coco_set(tmp_path / "boxes", count=1, size=(64, 64), seed=2)
    with pytest.raises(SocoError, match="mask_rcnn needs masks"):
        finetune(dataclasses.replace(config, model="mask_rcnn"), *boxes_only, *val, tmp_path / "run2",
                 progress=False, log=lambda _: None)


@pytest.mark.slow
def test_loads_what_soco_export_writes(tmp_path):
    pytest.importorskip("soco.export")
    from soco.export import export_checkpoint
    from tests.export.test_export import randomised_encoder, write_run

    model_settings = dict(depth=18, projector_hidden=64, projection_dim=32)
    encoder = randomised_encoder(3, **model_settings)
    write_run(tmp_path / "run", encoder, **model_settings)
    export_checkpoint(tmp_path / "run", "torchvision", tmp_path / "tv.pt")
    detector = build_detector("faster_rcnn", depth=18)
    report = load_pretrained(detector, tmp_path / "tv.pt")
    assert set(report.loaded) == {"backbone.body", "backbone.fpn", "roi_heads.box_head"}
    ours = detector.state_dict()
    for name, value in encoder.state_dict().items():
        if name.startswith("backbone."):
            assert torch.equal(ours[name], value), name
        elif name.startswith("box_head."):
            assert torch.equal(ours["roi_heads." + name], value), name


@pytest.mark.slow
def test_frozen_backbone_keeps_resnet_fpn_and_bn_statistics_while_heads_train(data, tmp_path):
    config = dataclasses.replace(TINY, epochs=1, freeze="backbone", picture_images=0)
    torch.manual_seed(config.seed)
    initial = build_detector("faster_rcnn", num_classes=2, depth=18, min_size=64, max_size=64).state_dict()
    lines = []
    finetune(config, *data, tmp_path, progress=False, log=lines.append)
    trained = torch.load(tmp_path / CHECKPOINT_NAME, map_location="cpu", weights_only=True)["model"]
    backbone = [k for k in initial if k.startswith("backbone.")]
    assert any(k.endswith("running_mean") for k in backbone) and any(".fpn." in k for k in backbone)
    assert all(torch.equal(trained[k], initial[k]) for k in backbone)  # weights and BN statistics alike
    heads = [k for k in initial if k.startswith(("rpn.", "roi_heads.")) and initial[k].is_floating_point()]
    assert sum(not torch.equal(trained[k], initial[k]) for k in heads) > len(heads) // 2
    assert any(line.startswith("frozen: the backbone and FPN") for line in lines)
    assert lines.count("precision: fp32") == 1


@pytest.mark.slow
def test_width_settings_build_that_detector_and_must_agree_with_the_weights(data, tmp_path):
    config = dataclasses.replace(TINY, epochs=1, picture_images=0, fpn_channels=32, box_head_convs=[16, 16],
                                 box_head_fcs=[24])
    finetune(config, *data, tmp_path / "scratch", progress=False, log=lambda _: None)
    state = torch.load(tmp_path / "scratch" / CHECKPOINT_NAME, map_location="cpu", weights_only=True)["model"]
    assert state["backbone.fpn.inner_blocks.0.0.weight"].shape[0] == 32
    assert state["roi_heads.box_head.1.0.weight"].shape[:2] == (16, 16)
    assert state["roi_heads.box_head.3.weight"].shape == (24, 16 * 7 * 7)
    # a file with a 256-wide FPN cannot go into a 32-wide one
    weights = tmp_path / "fpn256.pt"
    torch.save(build_detector("faster_rcnn", 2, depth=18).state_dict(), weights)
    with pytest.raises(ConfigError, match=r"fpn_channels=32, but .*fpn256.pt holds fpn_channels=256"):
        finetune(config, *data, tmp_path / "mismatch", weights=weights, progress=False, log=lambda _: None)
    with pytest.raises(ConfigError, match="^transfer.freeze: must be one of 'none', 'backbone', not 'fpn'"):
        apply_overrides(TINY, ["freeze=fpn"])


def _renamed_copy(annotations, folder, categories):
    """A copy of a COCO file, beside the same images, with other categories."""
    data = json.loads(annotations.read_text())
    data["categories"] = categories
    folder.mkdir(parents=True)
    copy = folder / "annotations.json"
    copy.write_text(json.dumps(data))
    return copy


def test_a_validation_file_naming_category_1_otherwise_is_refused_before_any_training(data, tmp_path, capsys):
    train_ann, train_images, val_ann, val_images = data
    renamed = _renamed_copy(val_ann, tmp_path / "renamed", [{"id": 1, "name": "tree"}])
    out = tmp_path / "run"
    with pytest.raises(DataError, match=f"^{renamed}: category 1 is 'tree', but 'box' in {train_ann}: "):
        finetune(TINY, train_ann, train_images, renamed, val_images, out, progress=False, log=lambda _: None)
    assert not out.exists()  # refused in the set-up: the run folder was never made
    status = main(["transfer", "--weights", "none", "--train", str(train_ann), "--val", str(renamed),
                   "--val-images", str(val_images), "--out", str(out), "--quiet", *TINY_OVERRIDES])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and f"{renamed}: category 1 is 'tree', but 'box' in" in err
    assert not out.exists()


def test_a_category_id_given_twice_is_refused_before_any_training(data, tmp_path):
    train_ann, train_images, val_ann, val_images = data
    doubled = _renamed_copy(train_ann, tmp_path / "doubled", [{"id": 1, "name": "box"}, {"id": 1, "name": "tree"}])
    out = tmp_path / "run"
    with pytest.raises(DataError, match=f"^{doubled}: category id 1 appears twice, as 'box' and as 'tree'$"):
        finetune(TINY, doubled, train_images, val_ann, val_images, out, progress=False, log=lambda _: None)
    doubled_val = _renamed_copy(val_ann, tmp_path / "doubled_val", [{"id": 1, "name": "box"}, {"id": 1, "name": "box"}])
    with pytest.raises(DataError, match=f"^{doubled_val}: category id 1 appears twice"):
        finetune(TINY, train_ann, train_images, doubled_val, val_images, out, progress=False, log=lambda _: None)
    assert not out.exists()


@pytest.mark.slow
def test_a_checkpoint_write_cut_short_ends_the_run_in_one_line_and_keeps_the_last_checkpoint(data, tmp_path, capsys,
                                                                                              monkeypatch):
    train_ann, train_images, val_ann, val_images = data
    out = tmp_path / "run"
    real_save, saves = torch.save, []

    def fail_the_second_save(payload, destination, *args, **kwargs):
        saves.append(destination)
        if len(saves) == 2:  # epoch 2's checkpoint
            with open(destination, "wb") if isinstance(destination, (str, os.PathLike)) else destination as handle:
                handle.write(b"PK\x03\x04")  # the part that fitted
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real_save(payload, destination, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fail_the_second_save)
    status = main(["transfer", "--weights", "none", "--train", str(train_ann), "--val", str(val_ann),
                   "--val-images", str(val_images), "--out", str(out), "--quiet", *TINY_OVERRIDES])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert err.startswith(f"soco: error: cannot write checkpoint {out / CHECKPOINT_NAME}: the write was cut short")
    assert torch.load(out / CHECKPOINT_NAME, weights_only=True)["epoch"] == 1
    assert not [path.name for path in out.iterdir() if path.name.startswith(".")]  # no temporary file left


@pytest.mark.slow
def test_a_resume_after_the_annotations_change_is_refused_and_the_same_files_by_another_path_resume(
        tmp_path, monkeypatch, capsys):
    train_ann, train_images = make_coco_set(tmp_path / "train", count=2, size=(64, 64), seed=0)
    val_ann, val_images = make_coco_set(tmp_path / "val", count=2, size=(64, 64), seed=1)
    out = tmp_path / "run"
    first = finetune(TINY, train_ann, train_images, val_ann, val_images, out, progress=False, stop_after_epochs=1,
                     log=lambda _: None)
    assert first["inputs"]["train_annotations"]["path"] == str(train_ann.resolve())
    original = train_ann.read_text()
    cut = json.loads(original)
    cut["annotations"] = cut["annotations"][:3]  # 4 boxes cut to 3, the same images: the plan stays the same
    train_ann.write_text(json.dumps(cut))
    kept = {name: (out / name).read_bytes() for name in (CHECKPOINT_NAME, METRICS_NAME)}
    status = main(["transfer", "--weights", "none", "--train", str(train_ann), "--val", str(val_ann), "--out",
                   str(out), "--resume", "--quiet", *TINY_OVERRIDES])
    err = capsys.readouterr().err
    assert status != 0 and err.count("\n") == 1, err
    assert f"the train annotations {train_ann.resolve()} changed" in err and "another --out" in err
    assert {name: (out / name).read_bytes() for name in kept} == kept  # nothing written is lost or replaced
    # The same files given by relative paths are the same run.
    train_ann.write_text(original)
    monkeypatch.chdir(tmp_path)
    lines = []
    resumed = finetune(TINY, "train/annotations.json", "train/images", "val/annotations.json", "val/images", "run",
                       resume=True, progress=False, log=lines.append)
    assert resumed["finished"] and any(line.startswith("resuming run after epoch 1") for line in lines)
