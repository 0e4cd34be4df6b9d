"""Tests of `soco export`: torchvision strict loading, Detectron2 and MMDetection key lists, backbone, CLI errors."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from soco.cli import export_command
from soco.errors import SocoError
from soco.export import (
    FORMAT_NAMES,
    CheckpointNotFoundError,
    ExportError,
    MissingModelError,
    UnknownFormatError,
    UnsupportedLayoutError,
    export_checkpoint,
    load_into_torchvision,
    load_source,
)
from soco.export.formats import NETWORKS, formats
from tests.export.checkpoints import randomised_encoder, write_run

REFERENCE = Path(__file__).parent / "reference_keys"


def reference(name: str) -> dict:
    """One reference key list (see reference_keys/README.md)."""
    return json.loads((REFERENCE / name).read_text())


@pytest.fixture(scope="module")
def r50_fpn(tmp_path_factory):
    """(run folder, online state dict) of a randomised R50-FPN encoder."""
    run_dir = tmp_path_factory.mktemp("r50_fpn")
    return run_dir, write_run(run_dir, randomised_encoder(0))


@pytest.fixture(scope="module")
def r50_c4(tmp_path_factory):
    """(run folder, online state dict) of a randomised R50-C4 encoder."""
    run_dir = tmp_path_factory.mktemp("r50_c4")
    return run_dir, write_run(run_dir, randomised_encoder(1, variant="c4"), variant="c4")


@pytest.fixture(scope="module")
def r18_fpn(tmp_path_factory):
    """(run folder, online state dict) of a small R18-FPN encoder, for the CLI tests."""
    run_dir = tmp_path_factory.mktemp("r18_fpn")
    model = dict(depth=18, projector_hidden=64, projection_dim=32)
    return run_dir, write_run(run_dir, randomised_encoder(2, **model), **model)


# torchvision


def _one_box_target(with_mask: bool) -> dict:
    """One 128-px image's annotation: a single box of class 1 (and its mask)."""
    target = {"boxes": torch.tensor([[20.0, 24.0, 90.0, 100.0]]), "labels": torch.tensor([1])}
    if with_mask:
        masks = torch.zeros(1, 128, 128, dtype=torch.uint8)
        masks[0, 24:100, 20:90] = 1
        target["masks"] = masks
    return target


@pytest.mark.slow
@pytest.mark.parametrize("builder", ["fasterrcnn_resnet50_fpn_v2", "maskrcnn_resnet50_fpn_v2"])
def test_torchvision_export_loads_strictly_and_trains(r50_fpn, tmp_path, builder):
    run_dir, state = r50_fpn
    output = tmp_path / "tv.pt"
    result = export_checkpoint(run_dir, "torchvision", output)
    assert result.counts == {"backbone": 318, "fpn": 48, "box head": 26}
    assert result.dropped == {"projector.*": 9}

    exported = torch.load(output, weights_only=True)
    torch.manual_seed(0)
    detector = getattr(torchvision.models.detection, builder)(
        weights=None, weights_backbone=None, num_classes=3, min_size=128, max_size=128,
        # Few proposals and sampled RoIs keep the CPU forward short; the loaded modules are the same.
        rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=32, box_batch_size_per_image=16)
    expected = {k for k in detector.state_dict() if k.startswith(("backbone.", "roi_heads.box_head."))}
    assert set(exported) == expected  # no missing and no unexpected key
    loaded = load_into_torchvision(detector, output)
    assert sorted(loaded) == sorted(expected)

    loaded_state = detector.state_dict()
    for name in expected:
        source_name = name.replace("roi_heads.box_head.", "box_head.")
        assert torch.equal(loaded_state[name], state[source_name]), name

    detector.train()
    losses = detector([torch.rand(3, 128, 128)], [_one_box_target(builder.startswith("mask"))])
    assert losses and all(torch.isfinite(loss) for loss in losses.values())


def test_torchvision_safetensors(r50_fpn, tmp_path):
    pytest.importorskip("safetensors")
    run_dir, state = r50_fpn
    output = tmp_path / "tv.safetensors"
    export_checkpoint(run_dir, "tv", output)
    detector = torchvision.models.detection.fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None)
    loaded = load_into_torchvision(detector, output)
    assert len(loaded) == 392
    assert torch.equal(detector.backbone.fpn.inner_blocks[2][1].running_var,
                       state["backbone.fpn.inner_blocks.2.1.running_var"])


def test_safetensors_missing_is_a_clear_error(r18_fpn, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # makes `import safetensors` fail
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    run_dir, _ = r18_fpn
    with pytest.raises(ExportError, match="pip install safetensors"):
        export_checkpoint(run_dir, "backbone", tmp_path / "r18.safetensors")
    assert not (tmp_path / "r18.safetensors").exists()


@pytest.mark.slow
def test_load_into_torchvision_refuses_another_depth(r18_fpn, tmp_path):
    run_dir, _ = r18_fpn
    output = export_checkpoint(run_dir, "torchvision", tmp_path / "r18.pt").output
    detector = torchvision.models.detection.fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None)
    with pytest.raises(ExportError, match="does not fit model.backbone"):
        load_into_torchvision(detector, output)


# Detectron2


def _match_like_detectron2(model_keys: list[str], checkpoint_keys: list[str]) -> dict[str, str]:
    """Detectron2's matching heuristic: each model key takes the longest checkpoint key that is a dotted suffix."""
    matches = {}
    for model_key in model_keys:
        candidates = [c for c in checkpoint_keys if model_key == c or model_key.endswith("." + c)]
        if candidates:
            matches[model_key] = max(candidates, key=len)
    return matches


def _check_detectron2(path: Path, reference_name: str) -> dict:
    """Load an exported .pkl and compare it with a reference list; returns its model dict."""
    raw = path.read_bytes()
    assert b"numpy._core" not in raw and b"numpy.core" not in raw  # loadable under NumPy 1.x as well as 2.x
    payload = pickle.loads(raw, encoding="latin1")  # as Detectron2 reads it
    assert payload["__author__"] == "soco" and payload["matching_heuristics"] is True
    weights = payload["model"]
    assert all(isinstance(v, np.ndarray) and v.flags.writeable for v in weights.values())
    ref = reference(reference_name)
    assert set(weights) == set(ref["checkpoint_keys"])
    for name, shape in ref["checkpoint_keys"].items():
        assert list(weights[name].shape) == shape, name
    # The heuristic must put every checkpoint tensor on exactly one model tensor of the same shape.
    model_keys = [k for k in ref["model_keys"] if not k.endswith("num_batches_tracked")]
    matches = _match_like_detectron2(model_keys, list(weights))
    assert sorted(matches) == sorted(model_keys)
    assert sorted(matches.values()) == sorted(weights)
    for model_key, checkpoint_key in matches.items():
        assert list(weights[checkpoint_key].shape) == ref["model_keys"][model_key]
    return weights


def test_detectron2_r50_fpn_matches_reference(r50_fpn, tmp_path):
    run_dir, state = r50_fpn
    result = export_checkpoint(run_dir, "detectron2", tmp_path / "d2.pkl")
    assert result.counts == {"backbone": 265, "fpn": 40, "box head": 22}
    weights = _check_detectron2(result.output, "detectron2_r50_fpn_4conv1fc.json")
    spots = {
        "stem.conv1.weight": "backbone.body.conv1.weight",
        "stem.conv1.norm.running_mean": "backbone.body.bn1.running_mean",
        "res2.0.conv1.norm.running_var": "backbone.body.layer1.0.bn1.running_var",
        "res4.0.shortcut.norm.running_var": "backbone.body.layer3.0.downsample.1.running_var",
        "res5.2.conv3.norm.weight": "backbone.body.layer4.2.bn3.weight",
        "fpn_lateral3.weight": "backbone.fpn.inner_blocks.1.0.weight",
        "fpn_output5.norm.running_var": "backbone.fpn.layer_blocks.3.1.running_var",
        "box_head.conv4.norm.bias": "box_head.3.1.bias",
        "box_head.fc1.weight": "box_head.5.weight",
    }
    for d2_name, source_name in spots.items():
        np.testing.assert_array_equal(weights[d2_name], state[source_name].numpy(), err_msg=d2_name)


@pytest.mark.slow
def test_detectron2_r50_c4_matches_reference(r50_c4, tmp_path):
    run_dir, state = r50_c4
    result = export_checkpoint(run_dir, "d2", tmp_path / "d2_c4.pkl")
    weights = _check_detectron2(result.output, "detectron2_r50_c4.json")
    np.testing.assert_array_equal(weights["roi_heads.res5.2.conv3.norm.running_var"],
                                  state["box_head.layer4.2.bn3.running_var"].numpy())
    np.testing.assert_array_equal(weights["roi_heads.res5.0.shortcut.weight"],
                                  state["box_head.layer4.0.downsample.0.weight"].numpy())
    np.testing.assert_array_equal(weights["res4.5.conv2.weight"], state["backbone.body.layer3.5.conv2.weight"].numpy())


def test_detectron2_needs_a_pkl_name(r18_fpn, tmp_path):
    run_dir, _ = r18_fpn
    with pytest.raises(ExportError, match=r"\*\.pkl"):
        export_checkpoint(run_dir, "detectron2", tmp_path / "d2.pth")


# MMDetection


def _check_mmdet(path: Path, reference_name: str) -> dict[str, torch.Tensor]:
    """Load an exported .pth with the weights-only unpickler and compare it with a reference list."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert set(payload) == {"state_dict", "meta"}
    weights = payload["state_dict"]
    assert all(isinstance(v, torch.Tensor) for v in weights.values())
    expected = reference(reference_name)["keys"]
    assert set(weights) == set(expected)
    for name, shape in expected.items():
        assert list(weights[name].shape) == shape, name
    assert payload["meta"]["producer"] == "soco" and payload["meta"]["step"] == 12
    return weights


def test_mmdet_r50_fpn_matches_reference(r50_fpn, tmp_path):
    run_dir, state = r50_fpn
    result = export_checkpoint(run_dir, "mmdet", tmp_path / "mm.pth")
    weights = _check_mmdet(result.output, "mmdet_r50_fpn_4conv1fc.json")
    spots = {
        "backbone.bn1.running_var": "backbone.body.bn1.running_var",
        "backbone.layer2.0.downsample.1.running_var": "backbone.body.layer2.0.downsample.1.running_var",
        "neck.lateral_convs.0.conv.weight": "backbone.fpn.inner_blocks.0.0.weight",
        "neck.lateral_convs.3.bn.running_mean": "backbone.fpn.inner_blocks.3.1.running_mean",
        "neck.fpn_convs.2.bn.running_var": "backbone.fpn.layer_blocks.2.1.running_var",
        "roi_head.bbox_head.shared_convs.3.bn.running_var": "box_head.3.1.running_var",
        "roi_head.bbox_head.shared_convs.0.conv.weight": "box_head.0.0.weight",
        "roi_head.bbox_head.shared_fcs.0.bias": "box_head.5.bias",
    }
    for mm_name, source_name in spots.items():
        assert torch.equal(weights[mm_name], state[source_name]), mm_name


def test_mmdet_r50_c4_matches_reference(r50_c4, tmp_path):
    run_dir, state = r50_c4
    result = export_checkpoint(run_dir, "mmdetection", tmp_path / "mm_c4.pth")
    weights = _check_mmdet(result.output, "mmdet_r50_c4.json")
    assert torch.equal(weights["roi_head.shared_head.layer4.1.bn2.running_var"],
                       state["box_head.layer4.1.bn2.running_var"])
    assert torch.equal(weights["backbone.layer3.0.downsample.0.weight"],
                       state["backbone.body.layer3.0.downsample.0.weight"])


# backbone


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["r50_fpn", "r50_c4"])
def test_backbone_export_loads_into_resnet50(fixture, request, tmp_path):
    run_dir, state = request.getfixturevalue(fixture)
    output = export_checkpoint(run_dir, "backbone", tmp_path / "r50.pt").output
    exported = torch.load(output, weights_only=True)
    resnet = torchvision.models.resnet50()
    missing, unexpected = resnet.load_state_dict(exported, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    for name, tensor in resnet.state_dict().items():
        if name.startswith("fc."):
            continue
        source_name = ("box_head." if fixture == "r50_c4" and name.startswith("layer4.") else "backbone.body.") + name
        assert torch.equal(tensor, state[source_name]), name


# CLI and errors


def _args(source, to: str, output=None, network: str = "online") -> argparse.Namespace:
    """Parsed `soco export` arguments, through the command's own parser."""
    parser = argparse.ArgumentParser()
    export_command.add_arguments(parser)
    argv = [str(source), "--to", to, "--network", network]
    if output is not None:
        argv += ["-o", str(output)]
    return parser.parse_args(argv)


@pytest.mark.slow
@pytest.mark.parametrize(("to", "name"), [("torchvision", "tv.pt"), ("detectron2", "d2.pkl"), ("mmdet", "mm.pth"),
                                          ("backbone", "bb.pt")])
def test_cli_exports_a_run_folder(r18_fpn, tmp_path, capsys, to, name):
    run_dir, _ = r18_fpn
    assert export_command.run(_args(run_dir, to, tmp_path / name)) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / name).is_file()
    assert f"to {to}:" in printed and "backbone:" in printed and "projector.* (9)" in printed
    assert "R18-FPN" in printed and "step 12" in printed
    if to == "detectron2":
        assert "*.num_batches_tracked (" in printed and "STRIDE_IN_1X1=False" in printed


def test_cli_default_output_checkpoint_file_and_target_network(r18_fpn, capsys):
    run_dir, state = r18_fpn
    assert export_command.run(_args(run_dir / "checkpoints" / "last.pt", "backbone", network="target")) == 0
    written = run_dir / "exported" / "backbone-target.pt"
    assert str(written) in capsys.readouterr().out
    exported = torch.load(written, weights_only=True)
    assert torch.equal(exported["layer1.0.conv1.weight"], state["backbone.body.layer1.0.conv1.weight"] + 1)


@pytest.mark.slow
def test_variants_without_fpn_or_head(tmp_path):
    small = dict(depth=18, projector_hidden=32, projection_dim=16)
    write_run(tmp_path / "no_fpn", randomised_encoder(3, fpn=False, **small), fpn=False, **small)
    result = export_checkpoint(tmp_path / "no_fpn", "detectron2", tmp_path / "no_fpn.pkl")
    assert "box head" not in result.counts and any("C5" in reason for reason in result.dropped)
    with pytest.raises(UnsupportedLayoutError, match="without FPN"):
        export_checkpoint(tmp_path / "no_fpn", "torchvision", tmp_path / "x.pt")

    write_run(tmp_path / "no_head", randomised_encoder(4, head=False, **small), head=False, **small)
    result = export_checkpoint(tmp_path / "no_head", "mmdet", tmp_path / "no_head.pth")
    assert set(result.counts) == {"backbone", "fpn"}
    assert any("no box head" in note for note in result.notes)


def test_errors_are_clear(r18_fpn, tmp_path):
    run_dir, state = r18_fpn
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        export_checkpoint(tmp_path / "nowhere", "mmdet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="not a `soco pretrain` run folder"):
        export_checkpoint(tmp_path / "empty", "mmdet")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointNotFoundError, match="not a readable PyTorch checkpoint"):
        export_checkpoint(tmp_path / "notes.txt", "mmdet")

    torch.save({"step": 3, "optimizer": {}}, tmp_path / "no_model.pt")
    with pytest.raises(MissingModelError, match="no 'model' entry"):
        export_checkpoint(tmp_path / "no_model.pt", "mmdet")
    torch.save({"model": {"layer.weight": torch.zeros(1)}}, tmp_path / "foreign.pt")
    with pytest.raises(MissingModelError, match="not a soco ObjectEncoder"):
        export_checkpoint(tmp_path / "foreign.pt", "mmdet")

    c4 = dict(variant="c4", depth=18, projector_hidden=32, projection_dim=16)
    write_run(tmp_path / "c4", randomised_encoder(5, **c4), **c4)
    with pytest.raises(UnsupportedLayoutError, match="C4 model"):
        export_checkpoint(tmp_path / "c4", "torchvision", tmp_path / "c4.pt")

    with pytest.raises(ExportError, match="is a folder"):
        export_checkpoint(run_dir, "mmdet", tmp_path)
    with pytest.raises(UnknownFormatError, match="did you mean 'detectron2'"):
        export_checkpoint(run_dir, "detectron")
    with pytest.raises(UnknownFormatError, match="did you mean 'mmdet'"):
        export_command.run(_args(run_dir, "mmdetect"))
    for error in (CheckpointNotFoundError, MissingModelError, UnsupportedLayoutError, UnknownFormatError):
        assert issubclass(error, SocoError)
    assert load_source(run_dir).layout == "fpn"


def test_command_line_names_agree_with_the_registry():
    assert list(export_command.FORMAT_HELP) == list(FORMAT_NAMES) == list(formats())
    assert export_command.NETWORKS == NETWORKS


# Write failures: one line naming the file, exit status 2, the file it would replace kept


def _old_export(path: Path) -> bytes:
    """A file at `path` from an earlier export, unlike what the next one writes; its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"conv1.weight": torch.ones(2)}, path)
    return path.read_bytes()


@pytest.mark.slow
def test_torch_saves_runtime_error_is_one_line_and_keeps_the_old_file(r18_fpn, tmp_path, monkeypatch, capsys):
    from soco.cli.main import main

    run_dir, _ = r18_fpn
    output = tmp_path / "out" / "backbone.pt"
    before = _old_export(output)

    def short_write(payload, destination, *args, **kwargs):
        with open(destination, "wb") if isinstance(destination, (str, os.PathLike)) else destination as handle:
            handle.write(b"PK\x03\x04")  # the part that fitted
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", short_write)
    assert main(["export", str(run_dir), "--to", "backbone", "-o", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"soco: error: cannot write {output}: the write was cut short") and err.count("\n") == 1
    assert output.read_bytes() == before
    assert os.listdir(output.parent) == ["backbone.pt"]  # the temporary file is gone


def _limit_file_size() -> None:
    """In the child, before it runs soco: any file write past 1 MiB fails (with EFBIG: Python ignores SIGXFSZ)."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE and EFBIG as Linux has them")
@pytest.mark.parametrize("name", ["backbone.pt", "backbone.safetensors"])
def test_a_write_cut_short_by_the_file_size_limit_is_one_line_and_keeps_the_old_file(r18_fpn, tmp_path, name):
    if name.endswith(".safetensors"):
        pytest.importorskip("safetensors")
    run_dir, _ = r18_fpn
    output = tmp_path / "out" / name
    before = _old_export(output)
    done = subprocess.run([sys.executable, "-m", "soco", "export", str(run_dir), "--to", "backbone", "-o", str(output)],
                          capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert (done.returncode, done.stderr) == (2, f"soco: error: cannot write {output}: file too large\n")
    assert output.read_bytes() == before
    assert os.listdir(output.parent) == [name]
