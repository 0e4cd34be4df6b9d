"""The Method contract, for every registered method: two steps, a bitwise resume after a kill, an export,
and the layering that lets a method be added without touching the engine, the data set or export."""

import ast
import importlib
import inspect
import pkgutil
import signal
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision

import soco
from soco import registry
from soco.cli.main import main
from soco.config.loading import load_config
from soco.declarations import MethodPresets, StudyArm
from soco.errors import ConfigError
from soco.engine.trainer import build_dataset, pretrain
from soco.export import export_checkpoint
from soco.export.formats import FORMAT_NAMES, UnsupportedLayoutError
from soco.methods.base import ENCODER_PARTS, EncoderLayout, Method
from soco.registry import method_class, method_names, register_method, study_arms
from soco.study.design import BUDGETS, arms, select_arms
from tests.data.proposals.conftest import make_image_folder
from tests.killed_run import run_killed_after_step_2

SOURCE = Path(soco.__file__).parent
# What a package below methods/ may import from it: the contract, never a method (the registry is soco.registry).
CONTRACT_MODULES = {"soco.methods", "soco.methods.base"}



def tiny(name, *overrides):
    return load_config(method_class(name).tiny_preset, ["train.device=cpu", *overrides])


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("name", method_names())
def test_the_smallest_batch_a_method_declares_trains_and_one_image_fewer_is_refused_at_loading(name, tiny_data):
    cls = method_class(name)
    fewest, why = cls.smallest_batch_size(load_config(cls.tiny_preset).method)
    assert fewest >= 1 and (fewest == 1 or why)
    if fewest > 1:
        refused = rf"^train\.batch_size: must be at least {fewest} for method {name}, not {fewest - 1}: .+ \(set by"
        with pytest.raises(ConfigError, match=refused):
            tiny(name, f"train.batch_size={fewest - 1}")
    config = tiny(name, f"train.batch_size={fewest}")
    torch.manual_seed(0)
    method = cls(config.method).train()
    images, store = tiny_data
    dataset = build_dataset(method, images, store if cls.uses_proposals(config.method) else None, 0)
    batch = dataset.collate([dataset[position] for position in range(fewest)])
    assert torch.isfinite(method.training_step(batch)["loss"])


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


@pytest.mark.parametrize("package", ["engine", "data", "labelled", "export", "models", "config", "transfer"])
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


def methods_defined_in_files() -> dict[str, type]:
    """name -> class of every Method a module file of soco/methods defines itself (one with its own `name`)."""
    defined = {}
    for info in pkgutil.iter_modules([str(SOURCE / "methods")]):
        module = importlib.import_module(f"soco.methods.{info.name}")
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, Method) and value.__module__ == module.__name__
                    and value.__dict__.get("name") and not inspect.isabstract(value)):
                defined[value.name] = value
    return defined


def test_every_method_file_is_found_and_a_name_is_taken_once():
    defined = methods_defined_in_files()
    assert {"soco", "byol", "scrl", "insloc", "detco"} <= set(defined)
    for name, cls in defined.items():
        assert method_class(name) is cls, f"{cls.__module__}.{cls.__qualname__} is not registered"
    assert set(method_names()) == set(defined)  # and the registry holds no method of no file

    class Impostor:
        name = "soco"

    with pytest.raises(TypeError, match="taken"):
        register_method(Impostor)
    assert method_class("soco").__module__ == "soco.methods.soco"


def test_an_arm_name_is_taken_once_and_scratch_is_the_study_s():
    class ArmThief:
        name = "arm_thief"
        presets = MethodPresets(tiny="soco_tiny", small="soco_small", r50="soco_r50_fpn")
        study_arms = (StudyArm("byol_image", "another baseline"),)

    with pytest.raises(TypeError, match="study arm 'byol_image' of .* is taken by soco.methods.soco.SoCo"):
        register_method(ArmThief)
    assert "arm_thief" not in method_names()
    with pytest.raises(TypeError, match="'@'"):
        StudyArm("soco@2", "an arm at another length is the study's")
    with pytest.raises(TypeError, match="exports 'detectron2'"):
        StudyArm("mine", "not a format the study reads", exports="detectron2")
    # the study's arms are the methods' declared ones, in their order, after scratch
    assert list(arms()) == ["scratch", *(arm.name for arm in study_arms())]
    assert list(arms()) == ["scratch", "byol_image", "byol", "soco", "scrl", "insloc", "detco"]
    assert arms()["insloc"].overrides_for("cpu") == ("method.queue_size=256",) == arms()["detco"].overrides_for("cpu")
    assert arms()["soco"].overrides_for("cpu") == () and arms()["insloc"].overrides_for("gpu") == ()
    assert arms()["byol_image"].presets.for_size("small") == "byol_image_small"
    assert arms()["scrl"].presets == method_class("scrl").presets  # an arm without presets takes its method's
    assert [name for name, arm in arms().items() if arm.pretrains_fpn_and_head] == ["soco", "insloc"]


def test_a_method_that_leaves_out_part_of_the_contract_cannot_be_built():
    class Incomplete(Method):
        name = "incomplete"

        def sample_transform(self):
            return None

    with pytest.raises(TypeError, match="abstract"):
        Incomplete(None)


TOY_METHOD = '''
"""Toy: two views of each image pulled together through a ResNet-18 (the contract test's method, outside soco)."""

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from soco.declarations import MethodPresets, StudyArm
from soco.methods.base import Method, backbone_only_layout
from soco.models.backbone import ResNetBody, build_resnet
from soco.registry import register_method
from soco_toy_transform import ToyTransform


@dataclass
class ToyViewsConfig:
    size: int = 32


@dataclass
class ToyConfig:
    name: str = "toy"
    views: ToyViewsConfig = field(default_factory=ToyViewsConfig)
    projection_dim: int = 8


class ToyEncoder(nn.Module):
    def __init__(self, projection_dim):
        super().__init__()
        self.backbone = ResNetBody(build_resnet(18), "layer4")
        self.projector = nn.Linear(self.backbone.out_channels, projection_dim)

    def forward(self, images):
        return self.projector(self.backbone(images)["0"].mean(dim=(2, 3)))


@register_method
class Toy(Method):
    """Online encoder only: cosine similarity of two views' projections."""

    name = "toy"
    config_class = ToyConfig
    presets = MethodPresets(tiny="toy_tiny", small="toy_small", r50="toy_small", folder=Path(__file__).parent)
    study_arms = (StudyArm("toy", "toy: backbone only", budget_overrides={"cpu": ("method.projection_dim=4",)}),)
    transform_class = ToyTransform

    def __init__(self, config):
        super().__init__(config)
        self.online = ToyEncoder(config.projection_dim)

    def training_step(self, batch):
        first, second = (F.normalize(self.online(batch[view]).float(), dim=1) for view in ("v1", "v2"))
        return {"loss": 2 - 2 * (first * second).sum(dim=1).mean()}

    def encoder(self):
        return self.online

    def encoder_layout(self):
        return backbone_only_layout(18, "projector.")
'''

TOY_TRANSFORM = '''
"""Toy's views: the whole image resized to a square, flipped at random."""

import torch
import torch.nn.functional as F


class ToyTransform:
    needs_proposals = False

    def __init__(self, views):
        self.size = views.size

    def __call__(self, image, proposals, generator, source):
        pixels = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255
        square = F.interpolate(pixels, size=(self.size, self.size), mode="bilinear", align_corners=False)[0]
        flips = torch.rand(2, generator=generator) < 0.5
        return {view: square.flip(-1) if flip else square for view, flip in zip(("v1", "v2"), flips.tolist())}

    def collate(self, samples):
        return {view: torch.stack([sample[view] for sample in samples]) for view in ("v1", "v2")}
'''

TOY_PRESETS = {
    "toy_small": "method: {name: toy, views: {size: 32}}\ntrain: {steps: 2, batch_size: 2, workers: 0, log_every: 1, "
                 "checkpoint_every: 1}\n",
    "toy_tiny": "base: toy_small\ntrain: {steps: 1}\n",
}


@pytest.fixture
def toy_method(tmp_path, monkeypatch):
    """A toy Method, its transform and its presets written to tmp_path and imported: registered until the end."""
    method_names()  # the built-ins are discovered first, so the registry put back after the test holds them
    monkeypatch.setattr(registry, "_REGISTERED", dict(registry._REGISTERED))
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "soco_toy_method.py").write_text(textwrap.dedent(TOY_METHOD))
    (folder / "soco_toy_transform.py").write_text(textwrap.dedent(TOY_TRANSFORM))
    for preset, text in TOY_PRESETS.items():
        (folder / f"{preset}.yaml").write_text(text)
    monkeypatch.syspath_prepend(str(folder))
    yield importlib.import_module("soco_toy_method").Toy
    for module in ("soco_toy_method", "soco_toy_transform"):
        sys.modules.pop(module, None)


@pytest.mark.slow
def test_a_method_in_its_own_files_is_everywhere_with_no_other_edit(toy_method, tmp_path, capsys):
    assert method_class("toy") is toy_method
    assert (toy_method.default_preset, toy_method.tiny_preset) == ("toy_small", "toy_tiny")
    assert load_config(toy_method.tiny_preset).train.steps == 1  # found in the method's folder, its base too

    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert "\ntoy: Toy: two views of each image pulled together" in listing
    assert "presets: toy_small, toy_tiny (tiny: toy_tiny, small: toy_small, r50: toy_small)" in listing
    assert "study arm toy: toy: backbone only; exports torchvision; cpu budget: method.projection_dim=4" in listing

    images = make_image_folder(tmp_path / "images", 4, size=(48, 40))
    run = tmp_path / "run"
    assert main(["pretrain", "--method", "toy", "--data", str(images), "--out", str(run), "--device", "cpu",
                 "--quiet"]) == 0
    assert "steps: 2 (2 this run)" in capsys.readouterr().out
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["method"] == "toy"

    assert main(["export", str(run), "--to", "backbone", "-o", str(tmp_path / "toy-backbone.pt")]) == 0
    assert main(["export", str(run), "--to", "torchvision", "-o", str(tmp_path / "toy-torchvision.pt")]) == 0
    backbone = torch.load(tmp_path / "toy-backbone.pt", weights_only=True)
    missing, unexpected = torchvision.models.resnet18().load_state_dict(backbone, strict=False)
    assert unexpected == [] and all(key.startswith("fc.") for key in missing)

    assert select_arms(["toy"], BUDGETS["cpu"]) == ["toy"] and "toy" in select_arms(None, BUDGETS["cpu"])
    assert main(["study", "--arms", "toy", "scratch", "--plan", "--device", "cpu"]) == 0
    plan = capsys.readouterr().out
    assert ("toy: toy: backbone only; method toy, preset toy_small (train.batch_size=16 optim.warmup_epochs=1 "
            "train.checkpoint_every=50 train.steps=300 train.device=cpu method.projection_dim=4), 300 steps; "
            "exports torchvision; fine-tuned full, frozen") in plan
    with pytest.raises(SystemExit):
        main(["study", "--help"])
    assert "scratch byol_image byol soco scrl insloc detco toy," in " ".join(capsys.readouterr().out.split())


def test_the_toy_method_is_gone_after_its_test():
    assert "toy" not in method_names() and "toy" not in arms()
    with pytest.raises(ConfigError, match="unknown preset 'toy_small'"):
        load_config("toy_small")
