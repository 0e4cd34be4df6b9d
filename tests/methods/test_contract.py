"""The Method contract, for every registered method: two steps, a bitwise resume after a kill, an export,
and the layering that lets a method be added without touching the engine, the data set or export."""

import ast
import signal
from pathlib import Path

import pytest
import torch
import torchvision

import soco
from soco.config.loading import load_config
from soco.engine.trainer import pretrain
from soco.export import export_checkpoint
from soco.export.formats import FORMAT_NAMES, UnsupportedLayoutError
from soco.methods.base import ENCODER_PARTS, EncoderLayout, Method
from soco.registry import method_class, method_names, register_method
from tests.killed_run import run_killed_after_step_2

SOURCE = Path(soco.__file__).parent
# What a package below methods/ may import from it: the contract, never a method (the registry is soco.registry).
CONTRACT_MODULES = {"soco.methods", "soco.methods.base"}



def tiny(name, *overrides):
    return load_config(method_class(name).tiny_preset, ["train.device=cpu", *overrides])


@pytest.mark.parametrize("name", method_names())
def test_method_declares_the_contract(name):
    cls = method_class(name)
    assert issubclass(cls, Method) and cls.name == name
    config = load_config(cls.tiny_preset)
    assert isinstance(config.method, cls.config_class) and config.method.name == name
    assert load_config(cls.default_preset).method.name == name
    method = cls(config.method)
    layout = method.encoder_layout()
    assert isinstance(layout, EncoderLayout) and EncoderLayout.from_dict(layout.to_dict()) == layout
    assert layout.parts and set(layout.parts) <= set(ENCODER_PARTS) and layout.parts[0] == "backbone"
    encoder_keys = set(method.encoder().state_dict())
    for part in layout.parts:
        assert any(key.startswith(layout.prefixes[part]) for key in encoder_keys), part
    transform = method.sample_transform()
    assert callable(transform) and callable(transform.collate)
    assert transform.needs_proposals == cls.uses_proposals(config.method)


@pytest.mark.parametrize("name", method_names())
def test_two_steps_resume_bitwise_after_a_kill_and_export(name, tiny_data, tmp_path):
    images, store = tiny_data
    store = store if method_class(name).uses_proposals(load_config(method_class(name).tiny_preset).method) else None
    whole = pretrain(tiny(name, "train.steps=4"), tmp_path / "whole", images, store, progress=False)
    assert whole.steps == 4

    killed = tmp_path / "killed"
    process = run_killed_after_step_2(images, store, killed, method_class(name).tiny_preset, ["train.device=cpu"],
                                      timeout=600)
    assert process.returncode == -signal.SIGKILL
    assert torch.load(killed / "checkpoints" / "last.pt", weights_only=True)["step"] == 2
    resumed = pretrain(tiny(name, "train.steps=4", "train.checkpoint_every=1"), killed, images, store,
                       resume=True, progress=False)
    assert resumed.steps_this_run == 2
    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)
    assert a["method"] == b["method"] == name
    for key, tensor in a["method_state"].items():
        assert torch.equal(tensor, b["method_state"][key]), key

    layout = a["encoder_layout"]
    exported = 0
    for format_name in FORMAT_NAMES:
        try:
            export_checkpoint(tmp_path / "whole", format_name, tmp_path / f"out-{format_name}.pt"
                              if format_name != "detectron2" else tmp_path / "out.pkl")
            exported += 1
        except UnsupportedLayoutError:
            assert layout["kind"] != "fpn", f"an FPN encoder must export to {format_name}"
    assert exported >= 1
    backbone = torch.load(tmp_path / "out-backbone.pt", weights_only=True)
    resnet = getattr(torchvision.models, f"resnet{layout['depth']}")()
    missing, unexpected = resnet.load_state_dict(backbone, strict=False)
    assert unexpected == [] and all(key.startswith(("fc.", "layer4.")) for key in missing)


def is_soco_module(dotted: str) -> bool:
    """Whether a dotted name is a module or package of soco's source tree."""
    if not dotted.startswith("soco."):
        return False
    relative = SOURCE.joinpath(*dotted.split(".")[1:])
    return relative.with_suffix(".py").is_file() or (relative / "__init__.py").is_file()


def imported_modules(path: Path) -> set[str]:
    """Every module a source file imports (at the top or inside functions)."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
            # `from soco.methods import soco` imports a module too; `from x import name` only a name
            modules.update(f"{node.module}.{alias.name}" for alias in node.names
                           if is_soco_module(f"{node.module}.{alias.name}"))
    return modules


@pytest.mark.parametrize("package", ["engine", "data", "export", "models", "config", "transfer"])
def test_no_package_below_methods_imports_a_method(package):
    offenders = []
    for path in sorted((SOURCE / package).rglob("*.py")):
        for module in imported_modules(path):
            if module.startswith("soco.methods") and module not in CONTRACT_MODULES:
                offenders.append(f"{path.relative_to(SOURCE)} imports {module}")
    assert offenders == []


def test_the_import_check_sees_a_method_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from soco.methods.soco import SoCo\n    from soco.methods import soco_transform\n")
    assert {"soco.methods.soco", "soco.methods.soco_transform"} <= imported_modules(probe)


def test_every_method_file_is_found_and_a_name_is_taken_once():
    assert {"soco", "scrl"} <= set(method_names())

    class Impostor:
        name = "soco"

    with pytest.raises(TypeError, match="taken"):
        register_method(Impostor)
    assert method_class("soco").__module__ == "soco.methods.soco"


def test_a_method_that_leaves_out_part_of_the_contract_cannot_be_built():
    class Incomplete(Method):
        name = "incomplete"

        def sample_transform(self):
            return None

    with pytest.raises(TypeError, match="abstract"):
        Incomplete(None)
