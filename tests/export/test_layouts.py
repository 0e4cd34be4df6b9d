"""Tests of the checkpoint layouts export reads (format 1 by its keys, format 2 as declared) and of its imports."""

from __future__ import annotations

import argparse
import ast
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import soco.export
from soco.cli import export_command
from soco.export import (
    FORMAT_NAMES,
    ExportError,
    MissingModelError,
    UnsupportedLayoutError,
    export_checkpoint,
    load_into_torchvision,
    load_source,
)
from soco.export.writing import load_state_dict_file
from soco.models.backbone import build_resnet_fpn
from tests.export.checkpoints import (
    LAYOUT1_EXPORTS,
    LAYOUT1_FIXTURE,
    build_encoder,
    randomised_encoder,
    save_layout2,
    to_layout2,
    write_run,
)

SUFFIXES = {"torchvision": ".pt", "detectron2": ".pkl", "mmdet": ".pth", "backbone": ".pt"}
FIXTURE_NOT_EXPORTED = "not exported: predictor, optimizer, rng, target"
LAYOUT2_NOT_EXPORTED = "not exported: method_state, optimizer, rng, encoder_target"


def renamed_entries(note: str) -> str:
    """A format-1 "not exported: ..." note with the entries named as format 2 names them."""
    prefix = "not exported: "
    names = {"predictor": "method_state", "model": "encoder", "target": "encoder_target"}
    return prefix + ", ".join(names.get(entry, entry) for entry in note[len(prefix):].split(", "))


def read_export(path: Path, to: str) -> tuple[dict, dict]:
    """(weights as numpy arrays, the file's other entries) of an exported file."""
    if to == "detectron2":
        payload = pickle.loads(path.read_bytes(), encoding="latin1")
        return payload.pop("model"), payload
    if to == "mmdet":
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return {k: v.numpy() for k, v in payload["state_dict"].items()}, payload["meta"]
    return {k: v.numpy() for k, v in load_state_dict_file(path).items()}, {}


def _args(source, to: str, output, network: str = "online") -> argparse.Namespace:
    """Parsed `soco export` arguments, through the command's own parser."""
    parser = argparse.ArgumentParser()
    export_command.add_arguments(parser)
    return parser.parse_args([str(source), "--to", to, "-o", str(output), "--network", network])


# Format 1: what the code before the redesign exported must not change.


@pytest.mark.slow
@pytest.mark.parametrize("to", FORMAT_NAMES)
def test_layout1_fixture_exports_as_the_old_code_did(tmp_path, to):
    expected = json.loads(LAYOUT1_EXPORTS.read_text())[to]
    result = export_checkpoint(LAYOUT1_FIXTURE, to, tmp_path / f"out{SUFFIXES[to]}")
    weights, _ = read_export(result.output, to)
    assert {name: list(array.shape) for name, array in weights.items()} == expected["keys"]
    assert result.counts == expected["counts"]
    assert result.dropped == expected["dropped"]
    assert result.notes == expected["notes"]
    assert load_source(LAYOUT1_FIXTURE).format_version == 1


def test_builder_matches_the_layout1_fixture():
    checkpoint = torch.load(LAYOUT1_FIXTURE, map_location="cpu", weights_only=True)
    built = build_encoder(**checkpoint["config"]["model"]).state_dict()
    shapes = [(k, tuple(v.shape)) for k, v in checkpoint["model"].items()]
    assert [(k, tuple(v.shape)) for k, v in built.items()] == shapes


# Format 2: the encoder_layout the checkpoint declares.


@pytest.fixture(scope="module")
def layout1_runs(tmp_path_factory):
    """Format-1 checkpoints: the fixture, and randomised R18 FPN, C4 and C5 runs (distinct values in every tensor)."""
    root = tmp_path_factory.mktemp("layout1")
    small = dict(depth=18, projector_hidden=32, projection_dim=16, fpn_channels=32, head_fc_dim=64)
    write_run(root / "fpn", randomised_encoder(10, **small), **small)
    c4 = dict(small, variant="c4")
    write_run(root / "c4", randomised_encoder(11, **c4), **c4)
    c5 = dict(small, fpn=False)
    write_run(root / "c5", randomised_encoder(12, **c5), **c5)
    return {"fixture": LAYOUT1_FIXTURE, **{run: root / run / "checkpoints" / "last.pt" for run in ("fpn", "c4", "c5")}}


def without_reason(note: str) -> str:
    """A note with its parenthesised reason left out."""
    return re.sub(r" \([^)]*\)", "", note)


@pytest.mark.slow
@pytest.mark.parametrize("network", ["online", "target"])
@pytest.mark.parametrize("run", ["fixture", "fpn", "c4", "c5"])
def test_layout2_exports_as_its_layout1_twin(layout1_runs, tmp_path, run, network):
    legacy = layout1_runs[run]
    declared = save_layout2(legacy, tmp_path / "v2" / "last.pt")
    for to in FORMAT_NAMES:
        if run in ("c4", "c5") and to == "torchvision":
            with pytest.raises(UnsupportedLayoutError, match="C4 model" if run == "c4" else "without FPN"):
                export_checkpoint(declared, to, tmp_path / "tv.pt", network=network)
            continue
        old = export_checkpoint(legacy, to, tmp_path / f"old{SUFFIXES[to]}", network=network)
        new = export_checkpoint(declared, to, tmp_path / f"new{SUFFIXES[to]}", network=network)
        old_weights, old_header = read_export(old.output, to)
        new_weights, new_header = read_export(new.output, to)
        assert list(new_weights) == list(old_weights), to
        for name, array in old_weights.items():
            np.testing.assert_array_equal(new_weights[name], array, err_msg=f"{to} {name}")
        # Only where the weights came from may differ: the path and the run's configuration.
        for header in (old_header, new_header):
            header.pop("source", None)
            header.pop("soco_config", None)
        assert new_header == old_header, to
        assert (new.counts, new.dropped) == (old.counts, old.dropped), to
        # The notes agree but for the entries left out, and why a part is absent (the config's key in format
        # 1, the declared layout in format 2), which the two formats name differently.
        assert sum(note.startswith("not exported: ") for note in old.notes) == 1, to
        expected = [renamed_entries(n) if n.startswith("not exported: ") else n for n in old.notes]
        assert [without_reason(n) for n in new.notes] == [without_reason(n) for n in expected], to
        assert new.source.startswith(f"soco checkpoint {declared}, step ") and not old.source.startswith("soco ")


@pytest.mark.slow
def test_declared_prefixes_are_used(tmp_path):
    checkpoint = to_layout2(torch.load(LAYOUT1_FIXTURE, map_location="cpu", weights_only=True))
    renames = {"backbone.body.": "net.trunk.", "backbone.fpn.": "net.neck.", "box_head.": "roi.", "projector.": "proj."}
    checkpoint["encoder"] = {next((new + key[len(old):] for old, new in renames.items() if key.startswith(old)), key): v
                             for key, v in checkpoint["encoder"].items()}
    checkpoint["encoder_layout"]["prefixes"] = {**renames_by_part(renames), "res5": "roi.layer4."}
    torch.save(checkpoint, tmp_path / "renamed.pt")
    for to in FORMAT_NAMES:
        old = export_checkpoint(LAYOUT1_FIXTURE, to, tmp_path / f"old{SUFFIXES[to]}")
        new = export_checkpoint(tmp_path / "renamed.pt", to, tmp_path / f"new{SUFFIXES[to]}")
        old_weights, new_weights = read_export(old.output, to)[0], read_export(new.output, to)[0]
        assert list(new_weights) == list(old_weights), to
        for name, array in old_weights.items():
            np.testing.assert_array_equal(new_weights[name], array, err_msg=f"{to} {name}")
        assert new.counts == old.counts, to
        expected = {reason.replace("projector.", "proj.").replace("backbone.fpn.", "net.neck.").replace(
            "box_head.", "roi."): n for reason, n in old.dropped.items()}
        assert new.dropped == expected, to


def renames_by_part(renames: dict[str, str]) -> dict[str, str]:
    """The new prefix of each part, from a map of old prefix -> new prefix."""
    parts = {"backbone.body.": "backbone", "backbone.fpn.": "fpn", "box_head.": "box_head", "projector.": "projector"}
    return {parts[old]: new for old, new in renames.items()}


def test_layout2_entries_left_out(tmp_path):
    declared = save_layout2(LAYOUT1_FIXTURE, tmp_path / "last.pt")
    assert export_checkpoint(LAYOUT1_FIXTURE, "mmdet", tmp_path / "mm.pth").notes[0] == FIXTURE_NOT_EXPORTED
    assert export_checkpoint(declared, "mmdet", tmp_path / "mm.pth").notes[0] == LAYOUT2_NOT_EXPORTED
    target = export_checkpoint(declared, "mmdet", tmp_path / "mm.pth", network="target")
    assert target.notes[0] == "not exported: method_state, optimizer, rng, encoder"


def test_cli_names_the_method(tmp_path, capsys):
    declared = save_layout2(LAYOUT1_FIXTURE, tmp_path / "run" / "checkpoints" / "last.pt", method="byol")
    assert export_command.run(_args(tmp_path / "run", "mmdet", tmp_path / "mm.pth")) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"exported byol checkpoint {declared}, step 4: R18-FPN 4conv1fc head, online network"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fpn", "c5"])
def test_parts_list_is_authoritative(tmp_path, kind):
    # The fixture's encoder has FPN and box head weights; the layout lists the backbone alone.
    declared = save_layout2(LAYOUT1_FIXTURE, tmp_path / "last.pt", kind=kind, parts=["backbone"])
    legacy = export_checkpoint(LAYOUT1_FIXTURE, "backbone", tmp_path / "legacy.pt")
    result = export_checkpoint(declared, "backbone", tmp_path / "bb.pt")
    weights, _ = read_export(result.output, "backbone")
    assert set(weights) == set(read_export(legacy.output, "backbone")[0])
    assert result.counts == {"backbone": 120}
    assert result.dropped == {"projector.*": 9, "backbone.fpn.* (not among the listed parts)": 48,
                              "box_head.* (not among the listed parts)": 26}
    assert "the model has no box head (no 'box_head' among its encoder_layout parts): " \
           "the detector's head starts untrained" in result.notes

    if kind == "fpn":  # an FPN kind that lists no FPN is refused: the detector would get a half backbone
        with pytest.raises(UnsupportedLayoutError, match="--to torchvision writes an R-FPN detector") as error:
            export_checkpoint(declared, "torchvision", tmp_path / "tv.pt")
        assert str(declared) in str(error.value)
        assert not (tmp_path / "tv.pt").exists()
    else:  # a whole ResNet alone (SCRL, the BYOL baseline): the detector's trunk, its FPN and heads start fresh
        tv = export_checkpoint(declared, "torchvision", tmp_path / "tv.pt")
        tv_weights = torch.load(tv.output, weights_only=True)
        assert tv.counts == {"backbone": 120} and all(k.startswith("backbone.body.") for k in tv_weights)
        assert any("no FPN" in note and "starts from random weights" in note for note in tv.notes)
        detector = torch.nn.Module()
        detector.backbone = build_resnet_fpn(18)
        fpn_before = {k: v.clone() for k, v in detector.backbone.fpn.state_dict().items()}
        loaded = load_into_torchvision(detector, tv.output)
        assert len(loaded) == 120
        for name, tensor in detector.backbone.body.state_dict().items():
            assert torch.equal(tensor, tv_weights["backbone.body." + name]), name
        assert all(torch.equal(v, detector.backbone.fpn.state_dict()[k]) for k, v in fpn_before.items())

    d2 = export_checkpoint(declared, "detectron2", tmp_path / "d2.pkl")
    d2_weights, _ = read_export(d2.output, "detectron2")
    assert d2.counts == {"backbone": 100} and all(name.startswith(("stem.", "res")) for name in d2_weights)


def test_listed_part_without_weights_is_an_error(tmp_path):
    checkpoint = to_layout2(torch.load(LAYOUT1_FIXTURE, map_location="cpu", weights_only=True))
    checkpoint["encoder"] = {k: v for k, v in checkpoint["encoder"].items() if not k.startswith("box_head.")}
    torch.save(checkpoint, tmp_path / "no_head.pt")
    with pytest.raises(ExportError, match="lists the 'box_head' part") as error:
        load_source(tmp_path / "no_head.pt")
    assert str(tmp_path / "no_head.pt") in str(error.value) and "box_head.*" in str(error.value)

    checkpoint["encoder_layout"]["parts"] = ["backbone", "fpn"]
    torch.save(checkpoint, tmp_path / "fpn_only.pt")
    assert load_source(tmp_path / "fpn_only.pt").parts == ("backbone", "fpn")


@pytest.mark.slow
@pytest.mark.parametrize(("change", "message"), [
    ({"parts": ["backbone", "head"]}, r"unknown part\(s\) \['head'\]"),
    ({"parts": ["fpn"]}, "lists no 'backbone' part"),
    ({"kind": "c4"}, r"kind 'c4' cannot hold the part\(s\) \['fpn', 'box_head'\]"),
    ({"kind": "r5"}, "kind 'r5' is not one of"),
    ({"prefixes": {"fpn": "backbone.body."}}, "two parts the same key prefix"),
])
def test_inconsistent_layouts_are_refused(tmp_path, change, message):
    checkpoint = to_layout2(torch.load(LAYOUT1_FIXTURE, map_location="cpu", weights_only=True))
    checkpoint["encoder_layout"].update(change)
    torch.save(checkpoint, tmp_path / "last.pt")
    with pytest.raises(ExportError, match=message):
        export_checkpoint(tmp_path / "last.pt", "backbone", tmp_path / "bb.pt")


def test_unknown_format_version_is_refused(tmp_path):
    checkpoint = to_layout2(torch.load(LAYOUT1_FIXTURE, map_location="cpu", weights_only=True))
    checkpoint["format_version"] = 3
    torch.save(checkpoint, tmp_path / "last.pt")
    with pytest.raises(ExportError, match="format_version 3"):
        load_source(tmp_path / "last.pt")


def test_method_without_target_network(tmp_path, capsys):
    declared = save_layout2(LAYOUT1_FIXTURE, tmp_path / "last.pt", method="simclr", target=False)
    with pytest.raises(MissingModelError, match="the simclr method that wrote it has no target network") as error:
        export_checkpoint(declared, "backbone", tmp_path / "bb.pt", network="target")
    assert str(declared) in str(error.value)
    with pytest.raises(ExportError, match="no target network"):
        export_command.run(_args(declared, "backbone", tmp_path / "bb.pt", network="target"))
    online = export_checkpoint(declared, "backbone", tmp_path / "bb.pt")
    assert online.counts == {"backbone": 120}
    assert not any("encoder_target" in note for note in online.notes)


# The package's modules import one another without a cycle.


EXPORT_DIR = Path(soco.export.__file__).parent


def import_graph(sources: dict[str, str], package: str = "soco.export") -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its text (in functions too), from their source.

    A name taken from the package itself (`from soco.export import X`) depends on __init__ unless X is a module.
    """
    modules = set(sources)
    graph: dict[str, set[str]] = {name: set() for name in sources}

    def module_of(dotted: str) -> str | None:
        """The package module a dotted name lies in, or None outside the package."""
        if not dotted.startswith(package + "."):
            return None
        module = dotted[len(package) + 1:].split(".")[0]
        return module if module in modules else None

    for name, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    graph[name].add("__init__" if alias.name == package else module_of(alias.name))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # a relative import, from within the package
                    base = f"{package}.{base}" if base else package
                if base == package:
                    graph[name].update(alias.name if alias.name in modules else "__init__" for alias in node.names)
                else:
                    graph[name].add(module_of(base))
        graph[name] -= {name, None}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for neighbour in sorted(graph.get(node, ())):
            if state.get(neighbour) == "open":
                return path[path.index(neighbour):] + [neighbour]
            if neighbour not in state:
                cycle = visit(neighbour, path + [neighbour])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_export_modules_import_without_a_cycle():
    sources = {path.stem: path.read_text() for path in sorted(EXPORT_DIR.glob("*.py"))}
    graph = import_graph(sources)
    assert find_cycle(graph) is None, graph
    # The registry imports each format module, and they import the shared modules, not the registry.
    assert {"backbone_format", "detectron2_format", "mmdet_format", "torchvision_format"} <= graph["formats"]
    for module in ("backbone_format", "detectron2_format", "mmdet_format", "torchvision_format"):
        assert "source" in graph[module] and "formats" not in graph[module] and "__init__" not in graph[module]


def test_import_cycle_finder_sees_lazy_and_relative_imports():
    old = {
        "formats": "def formats():\n    from soco.export import backbone_format\n",
        "backbone_format": "from soco.export.formats import Conversion\n",
        "source": "import torch\n",
    }
    assert find_cycle(import_graph(old)) == ["backbone_format", "formats", "backbone_format"]
    relative = {"a": "from .b import x\n", "b": "from . import a\n"}
    assert find_cycle(import_graph(relative)) == ["a", "b", "a"]
    assert find_cycle(import_graph({"a": "from .b import x\n", "b": "import soco.export.c\n", "c": ""})) is None
    through_package = {"__init__": "from soco.export.formats import f\n", "formats": "from soco.export import g\n"}
    assert find_cycle(import_graph(through_package)) == ["__init__", "formats", "__init__"]
    submodule = {"__init__": "from soco.export.formats import f\n", "formats": "from soco.export import source\n",
                 "source": ""}
    assert import_graph(submodule)["formats"] == {"source"} and find_cycle(import_graph(submodule)) is None
