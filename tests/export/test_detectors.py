"""Tests of `soco export --detector`: R-C4 and one-stage (RetinaNet, FCOS) key sets, what each drops, and errors."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pickle

import numpy as np
import pytest
import torch

from soco.cli import export_command
from soco.cli.main import main
from soco.export import (
    DETECTOR_NAMES,
    CheckpointNotFoundError,
    ExportError,
    UnknownDetectorError,
    export_checkpoint,
)
from soco.export.formats import formats, unwritable_reason
from tests.export.checkpoints import randomised_encoder, write_run
from tests.export.test_export import REFERENCE, _match_like_detectron2, reference

FIXTURE_TENSORS = 401  # R50-FPN encoder: 318 backbone + 48 FPN + 26 box head + 9 projector tensors
D2_TOP_BLOCK = "top_block."  # RetinaNet's P6/P7: no pretraining network has them
MMDET_EXTRA_CONVS = ("neck.fpn_convs.3.", "neck.fpn_convs.4.")  # the same, in MMDetection's neck
P2_DROPPED = {  # the torchvision FPN's P2 lateral and output blocks: a conv weight and five BN tensors each
    "backbone.fpn.inner_blocks.0.* (P2: RetinaNet's FPN is built on C3-C5)": 6,
    "backbone.fpn.layer_blocks.0.* (P2: RetinaNet's FPN is built on C3-C5)": 6,
}
ONE_STAGE_HEAD_DROPPED = {"box_head.* (RetinaNet is one-stage: it has no RoI box head)": 26}


@pytest.fixture(scope="module")
def r50_fpn(tmp_path_factory):
    """(run folder, online state dict) of a randomised R50-FPN encoder with its 4conv1fc head."""
    run_dir = tmp_path_factory.mktemp("r50_fpn")
    return run_dir, write_run(run_dir, randomised_encoder(20))


@pytest.fixture(scope="module")
def r50_c4(tmp_path_factory):
    """(run folder, online state dict) of a randomised R50-C4 encoder."""
    run_dir = tmp_path_factory.mktemp("r50_c4")
    return run_dir, write_run(run_dir, randomised_encoder(21, variant="c4"), variant="c4")


@pytest.fixture(scope="module")
def r18_runs(tmp_path_factory):
    """{layout: (run folder, online state dict)} of small R18 FPN, C4 and C5 encoders."""
    root = tmp_path_factory.mktemp("r18")
    small = dict(depth=18, projector_hidden=32, projection_dim=16, fpn_channels=32, head_fc_dim=64)
    runs = {}
    for seed, (layout, model) in enumerate({"fpn": small, "c4": dict(small, variant="c4"),
                                            "c5": dict(small, fpn=False)}.items()):
        runs[layout] = root / layout, write_run(root / layout, randomised_encoder(30 + seed, **model), **model)
    return runs


def read_d2(path) -> dict[str, np.ndarray]:
    """The weights of an exported .pkl, read as Detectron2 reads it."""
    return pickle.loads(path.read_bytes(), encoding="latin1")["model"]


def read_mmdet(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, meta) of an exported .pth."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return payload["state_dict"], payload["meta"]


# Detectron2


@pytest.mark.slow
def test_detectron2_retinanet_matches_reference(r50_fpn, tmp_path):
    run_dir, state = r50_fpn
    result = export_checkpoint(run_dir, "detectron2", tmp_path / "retina.pkl", detector="retinanet")
    # 3 FPN levels x (lateral + output) x (conv weight + 4 BN tensors); 53 ResNet BNs + 6 FPN BNs counters.
    assert result.counts == {"backbone": 265, "fpn": 30}
    assert result.dropped == {"*.num_batches_tracked": 59, **P2_DROPPED, **ONE_STAGE_HEAD_DROPPED, "projector.*": 9}
    assert sum(result.counts.values()) + sum(result.dropped.values()) == FIXTURE_TENSORS
    assert result.detector.name == "retinanet"

    weights = read_d2(result.output)
    ref = reference("detectron2_retinanet_r50_fpn.json")
    expected = {k: v for k, v in ref["checkpoint_keys"].items() if not k.startswith(D2_TOP_BLOCK)}
    assert len(expected) == len(ref["checkpoint_keys"]) - 4  # p6 and p7, weight and bias
    assert {k: list(v.shape) for k, v in weights.items()} == expected
    # Detectron2's heuristic puts each tensor on one model tensor of the same shape; only P6/P7 stay fresh.
    model_keys = [k for k in ref["model_keys"] if not k.endswith("num_batches_tracked")]
    matches = _match_like_detectron2(model_keys, list(weights))
    assert sorted(set(model_keys) - set(matches)) == ["backbone.top_block.p6.bias", "backbone.top_block.p6.weight",
                                                      "backbone.top_block.p7.bias", "backbone.top_block.p7.weight"]
    assert sorted(matches.values()) == sorted(weights)
    for model_key, checkpoint_key in matches.items():
        assert list(weights[checkpoint_key].shape) == ref["model_keys"][model_key], model_key
    spots = {
        "fpn_lateral3.weight": "backbone.fpn.inner_blocks.1.0.weight",  # torchvision block 1 is C3
        "fpn_lateral5.norm.running_var": "backbone.fpn.inner_blocks.3.1.running_var",
        "fpn_output3.norm.bias": "backbone.fpn.layer_blocks.1.1.bias",
        "res5.2.conv3.norm.weight": "backbone.body.layer4.2.bn3.weight",
    }
    for d2_name, source_name in spots.items():
        np.testing.assert_array_equal(weights[d2_name], state[source_name].numpy(), err_msg=d2_name)
    assert "not pretrained, so built fresh: backbone.top_block.p6/p7 (P6 from res5, P7) and RetinaNet's head" \
        in result.notes
    assert any(note.endswith("BN/SyncBN in MODEL.FPN.NORM; see docs/export.md") for note in result.notes)


def test_detectron2_c4_from_an_fpn_encoder(r50_fpn, tmp_path):
    run_dir, state = r50_fpn
    result = export_checkpoint(run_dir, "d2", tmp_path / "c4.pkl", detector="rcnn-c4")
    weights = read_d2(result.output)
    ref = reference("detectron2_r50_c4.json")
    assert {k: list(v.shape) for k, v in weights.items()} == ref["checkpoint_keys"]  # backbone and res5 head, whole
    # res5: 10 convs (3 blocks, one shortcut) and their 10 BNs' 4 tensors, num_batches_tracked left out
    assert result.counts == {"backbone": 265 - 50, "box head": 50}
    assert result.dropped == {
        "*.num_batches_tracked": 53,
        "backbone.fpn.* (R-C4 Faster/Mask R-CNN has no FPN)": 48,
        "box_head.* (R-C4 Faster/Mask R-CNN's RoI head is res5: it has no 4conv1fc box head)": 26,
        "projector.*": 9,
    }
    np.testing.assert_array_equal(weights["roi_heads.res5.0.shortcut.weight"],
                                  state["backbone.body.layer4.0.downsample.0.weight"].numpy())
    assert "res5 (the C4 head) is written as roi_heads.res5.*, Res5ROIHeads' own names" in result.notes


@pytest.mark.slow
def test_detectron2_retinanet_from_a_c4_encoder(r50_c4, tmp_path):
    run_dir, state = r50_c4
    result = export_checkpoint(run_dir, "detectron2", tmp_path / "retina_c4.pkl", detector="retinanet")
    weights = read_d2(result.output)
    ref = reference("detectron2_retinanet_r50_fpn.json")["checkpoint_keys"]
    # A C4 encoder has no FPN: the whole trunk, res5 (its RoI head) included, and nothing else.
    assert {k: list(v.shape) for k, v in weights.items()} == {
        k: v for k, v in ref.items() if k.startswith(("stem.", "res"))}
    np.testing.assert_array_equal(weights["res5.1.conv2.weight"], state["box_head.layer4.1.conv2.weight"].numpy())
    assert "res5, pretrained as the C4 RoI head, is written as the backbone's res5 (C5)" in result.notes
    assert "the model has no FPN (model.variant=c4): an FPN detector's FPN starts from random weights" in result.notes
    assert not any("box head" in note for note in result.notes)  # a one-stage detector has none to miss


# MMDetection


@pytest.mark.parametrize("detector", ["retinanet", "fcos"])
def test_mmdet_one_stage_matches_reference(r50_fpn, tmp_path, detector):
    run_dir, state = r50_fpn
    result = export_checkpoint(run_dir, "mmdet", tmp_path / f"{detector}.pth", detector=detector)
    assert result.counts == {"backbone": 318, "fpn": 36}
    title = {"retinanet": "RetinaNet", "fcos": "FCOS"}[detector]
    assert result.dropped == {
        f"backbone.fpn.inner_blocks.0.* (P2: {title}'s FPN is built on C3-C5)": 6,
        f"backbone.fpn.layer_blocks.0.* (P2: {title}'s FPN is built on C3-C5)": 6,
        f"box_head.* ({title} is one-stage: it has no RoI box head)": 26,
        "projector.*": 9,
    }
    assert sum(result.counts.values()) + sum(result.dropped.values()) == FIXTURE_TENSORS

    weights, meta = read_mmdet(result.output)
    assert meta["detector"] == detector and meta["layout"] == "fpn"
    ref = reference(f"mmdet_{detector}_r50_fpn.json")["keys"]
    expected = {k: v for k, v in ref.items() if not k.startswith(MMDET_EXTRA_CONVS)}
    assert len(ref) - len(expected) == 12  # two extra ConvModules: a conv weight and five BN tensors each
    assert {k: list(v.shape) for k, v in weights.items()} == expected
    spots = {
        "neck.lateral_convs.0.conv.weight": "backbone.fpn.inner_blocks.1.0.weight",  # start_level=1: index 0 is C3
        "neck.lateral_convs.2.bn.running_mean": "backbone.fpn.inner_blocks.3.1.running_mean",
        "neck.fpn_convs.0.bn.running_var": "backbone.fpn.layer_blocks.1.1.running_var",
        "neck.fpn_convs.2.conv.weight": "backbone.fpn.layer_blocks.3.0.weight",
        "backbone.layer4.2.bn3.running_var": "backbone.body.layer4.2.bn3.running_var",
    }
    for mm_name, source_name in spots.items():
        assert torch.equal(weights[mm_name], state[source_name]), mm_name
    p6_input = {"retinanet": "C5", "fcos": "P5"}[detector]
    assert f"not pretrained, so built fresh: neck.fpn_convs.3/4 (P6 from {p6_input}, P7) and {title}'s bbox_head" \
        in result.notes


def test_mmdet_c4_from_an_fpn_encoder(r50_fpn, tmp_path):
    run_dir, state = r50_fpn
    result = export_checkpoint(run_dir, "mmdet", tmp_path / "c4.pth", detector="rcnn-c4")
    weights, meta = read_mmdet(result.output)
    assert {k: list(v.shape) for k, v in weights.items()} == reference("mmdet_r50_c4.json")["keys"]
    assert meta["detector"] == "rcnn-c4"
    assert result.counts == {"backbone": 318 - 60, "box head": 60}  # res5: 10 convs, 10 BNs of 5 tensors
    assert torch.equal(weights["roi_head.shared_head.layer4.2.bn1.weight"], state["backbone.body.layer4.2.bn1.weight"])


def test_mmdet_rcnn_fpn_from_a_c4_encoder(r50_c4, tmp_path):
    run_dir, state = r50_c4
    result = export_checkpoint(run_dir, "mmdet", tmp_path / "fpn.pth", detector="rcnn-fpn")
    weights, _ = read_mmdet(result.output)
    ref = reference("mmdet_r50_fpn_4conv1fc.json")["keys"]
    assert {k: list(v.shape) for k, v in weights.items()} == {k: v for k, v in ref.items() if k.startswith("backbone.")}
    assert torch.equal(weights["backbone.layer4.0.downsample.1.running_var"],
                       state["box_head.layer4.0.downsample.1.running_var"])
    assert "the model has no box head (model.variant=c4): the detector's head starts untrained" in result.notes


# Every pretrained tensor is written or named as dropped, whatever the detector.


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["fpn", "c4", "c5"])
def test_every_tensor_is_written_or_named(r18_runs, tmp_path, layout):
    run_dir, state = r18_runs[layout]
    for export_format in formats().values():
        for detector in export_format.detectors or (None,):
            output = tmp_path / f"out{export_format.suffix}"
            try:
                result = export_checkpoint(run_dir, export_format.name, output, detector=detector)
            except ExportError as error:  # only torchvision refuses an encoder without FPN
                assert export_format.name == "torchvision" and layout != "fpn", error
                continue
            accounted = sum(result.counts.values()) + sum(result.dropped.values())
            assert accounted == len(state), (export_format.name, detector, result.counts, result.dropped)


# Choosing the detector


def test_unsupported_detectors_are_refused(r18_runs, tmp_path):
    run_dir, _ = r18_runs["fpn"]
    refusal = r"^--to torchvision has no --detector retinanet \(it writes for: rcnn-fpn\); retinanet is written by "
    with pytest.raises(UnknownDetectorError, match=refusal + "--to detectron2 or --to mmdet$"):
        export_checkpoint(run_dir, "torchvision", tmp_path / "tv.pt", detector="retinanet")
    with pytest.raises(UnknownDetectorError, match=r"fcos is written by --to mmdet$"):
        export_checkpoint(run_dir, "detectron2", tmp_path / "d2.pkl", detector="fcos")
    with pytest.raises(UnknownDetectorError, match=r"it is a plain ResNet for any detector"):
        export_checkpoint(run_dir, "backbone", tmp_path / "bb.pt", detector="rcnn-c4")
    with pytest.raises(UnknownDetectorError, match=r"^unknown detector 'yolo' \(detectors: rcnn-fpn, rcnn-c4, "
                                                   r"retinanet, fcos\)$"):
        export_checkpoint(run_dir, "mmdet", tmp_path / "mm.pth", detector="yolo")
    assert not list(tmp_path.iterdir())  # nothing written


def test_default_output_names_the_detector(r18_runs):
    run_dir, _ = r18_runs["fpn"]
    retina = export_checkpoint(run_dir, "detectron2", detector="retinanet")
    assert retina.output == run_dir / "exported" / "detectron2-retinanet.pkl" and retina.output.is_file()
    # The detector the encoder was pretrained as is not named, as before --detector existed.
    assert export_checkpoint(run_dir, "mmdet", detector="rcnn-fpn").output == run_dir / "exported" / "mmdet.pth"
    target = export_checkpoint(run_dir, "mmdet", network="target", detector="fcos")
    assert target.output == run_dir / "exported" / "mmdet-fcos-target.pth"


def test_cli_prints_the_detector_and_what_it_dropped(r18_runs, tmp_path, capsys):
    run_dir, _ = r18_runs["fpn"]
    parser = argparse.ArgumentParser()
    export_command.add_arguments(parser)
    args = parser.parse_args([str(run_dir), "--to", "mmdet", "--detector", "retinanet", "-o", str(tmp_path / "r.pth")])
    assert export_command.run(args) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[2] == "  for RetinaNet (--detector retinanet)"
    start = printed.index("  dropped:")
    assert printed[start + 1:start + 5] == [
        "    backbone.fpn.inner_blocks.0.* (P2: RetinaNet's FPN is built on C3-C5) (6)",
        "    backbone.fpn.layer_blocks.0.* (P2: RetinaNet's FPN is built on C3-C5) (6)",
        "    box_head.* (RetinaNet is one-stage: it has no RoI box head) (26)",
        "    projector.* (9)",
    ]
    with pytest.raises(SystemExit):
        parser.parse_args([str(run_dir), "--to", "mmdet", "--detector", "yolo"])


def test_command_line_detectors_agree_with_the_registry():
    assert list(export_command.DETECTOR_HELP) == list(DETECTOR_NAMES)
    written = {name for export_format in formats().values() for name in export_format.detectors}
    assert written == set(DETECTOR_NAMES)
    assert formats()["detectron2"].detectors == ("rcnn-fpn", "rcnn-c4", "retinanet")
    assert formats()["mmdet"].detectors == ("rcnn-fpn", "rcnn-c4", "retinanet", "fcos")


# One-line errors


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """(exit status, stderr lines) of `soco ...`."""
    status = main(argv)
    return status, capsys.readouterr().err.splitlines()


def test_unwritable_output_is_one_line(r18_runs, tmp_path, capsys):
    run_dir, _ = r18_runs["fpn"]
    (tmp_path / "afile").write_text("a file, not a folder")
    output = tmp_path / "afile" / "out.pth"
    with pytest.raises(ExportError, match=f"^cannot write {output}: {tmp_path / 'afile'} is a file, not a folder$"):
        export_checkpoint(run_dir, "mmdet", output)
    status, err = run_cli(["export", str(run_dir), "--to", "detectron2", "-o", str(tmp_path / "afile" / "d2.pkl")],
                          capsys)
    assert status == 2
    assert err == [f"soco: error: cannot write {tmp_path / 'afile' / 'd2.pkl'}: {tmp_path / 'afile'} is a file, "
                   "not a folder"]
    assert (tmp_path / "afile").read_text() == "a file, not a folder"


def test_permission_denied_names_the_folder(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    hidden_tmp = folder / ".out.123.tmp.pth"  # what atomic_write's failure names
    error = PermissionError(13, "Permission denied", str(hidden_tmp))
    assert unwritable_reason(folder / "out.pth", error) == f"permission denied in {folder}"
    missing = FileNotFoundError(2, "No such file or directory", "/nowhere")
    assert unwritable_reason(tmp_path / "x.pth", missing) == "no such file or directory (/nowhere)"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_refused(r18_runs, tmp_path):
    run_dir, _ = r18_runs["fpn"]
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(ExportError, match=f"^cannot write {folder / 'b.pt'}: permission denied in {folder}$"):
            export_checkpoint(run_dir, "backbone", folder / "b.pt")
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize(("content", "reason"), [
    (b"method: soco\ntrain:\n  steps: 3\n", "it is a text file (it begins 'method: soco')"),
    # 601 bytes: the 512-byte read ends inside a two-byte character, which still makes a text file
    ("a" + "\u00e9" * 300, f"it is a text file (it begins {'a' + chr(0xE9) * 39!r})"),
    (b"", "the file is empty"),
    (b"\x01\x02\x00\x03binary", "it is neither a zip archive nor a pickle, the two forms torch.save writes"),
])
def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, capsys, content, reason):
    path = tmp_path / "notes.txt"
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    with pytest.raises(CheckpointNotFoundError, match="not a readable PyTorch checkpoint"):
        export_checkpoint(path, "mmdet", tmp_path / "mm.pth")
    status, err = run_cli(["export", str(path), "--to", "mmdet", "-o", str(tmp_path / "mm.pth")], capsys)
    assert status == 2
    assert err == [f"soco: error: {path} is not a readable PyTorch checkpoint: {reason}"]


def test_a_damaged_zip_names_the_error_type(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    with pytest.raises(CheckpointNotFoundError, match=r"not a readable PyTorch checkpoint \(RuntimeError: "):
        export_checkpoint(path, "mmdet", tmp_path / "mm.pth")


# The derived reference lists


def test_derived_references_agree_with_the_sourced_ones():
    d2_retina = reference("detectron2_retinanet_r50_fpn.json")
    d2_fpn = reference("detectron2_r50_fpn_4conv1fc.json")
    # The trunk and the P3-P5 blocks are the same modules in Detectron2's R-FPN and RetinaNet backbones.
    shared = ("backbone.bottom_up.", "backbone.fpn_lateral3", "backbone.fpn_lateral4", "backbone.fpn_lateral5",
              "backbone.fpn_output3", "backbone.fpn_output4", "backbone.fpn_output5")
    assert {k: v for k, v in d2_retina["model_keys"].items() if not k.startswith("backbone.top_block.")} == {
        k: v for k, v in d2_fpn["model_keys"].items() if k.startswith(shared)}
    mm_fpn = reference("mmdet_r50_fpn_4conv1fc.json")["keys"]
    for name in ("mmdet_retinanet_r50_fpn.json", "mmdet_fcos_r50_fpn.json"):
        keys = reference(name)["keys"]
        assert {k: v for k, v in keys.items() if k.startswith("backbone.")} == {
            k: v for k, v in mm_fpn.items() if k.startswith("backbone.")}
        # The R-FPN neck's lateral/output i+1 is the one-stage neck's i (start_level=1), shapes included.
        for index in range(3):
            for kind in ("lateral_convs", "fpn_convs"):
                ours = {k.split(f".{index}.", 1)[1]: v for k, v in keys.items()
                        if k.startswith(f"neck.{kind}.{index}.")}
                theirs = {k.split(f".{index + 1}.", 1)[1]: v for k, v in mm_fpn.items()
                          if k.startswith(f"neck.{kind}.{index + 1}.")}
                assert ours == theirs, (name, kind, index)
    retina, fcos = (reference(f"mmdet_{name}_r50_fpn.json")["keys"] for name in ("retinanet", "fcos"))
    assert retina["neck.fpn_convs.3.conv.weight"] == [256, 2048, 3, 3]  # on_input: P6 from C5
    assert fcos["neck.fpn_convs.3.conv.weight"] == [256, 256, 3, 3]  # on_output: P6 from P5
    assert {k for k in retina if k != "neck.fpn_convs.3.conv.weight" and retina[k] != fcos[k]} == set()


def test_derived_references_are_what_the_script_writes(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("derive_one_stage", REFERENCE / "derive_one_stage.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, "HERE", tmp_path)
    script.main()
    written = sorted(path.name for path in tmp_path.iterdir())
    assert written == ["detectron2_retinanet_r50_fpn.json", "mmdet_fcos_r50_fpn.json", "mmdet_retinanet_r50_fpn.json"]
    for name in written:
        assert json.loads((tmp_path / name).read_text()) == reference(name), name
