"""Every field of every configuration dataclass of the package declares its rule, beside the dataclass.

How a configuration dataclass is recognised: every dataclass of a `soco` module that carries `@config_rules`,
plus the roots named here (a pretraining `Config`, each registered method's section, `TransferConfig`, the
study's `Budget`) and every dataclass reached from a root through its nested dataclass fields. `Config` only
holds sections (its `method` is any method's section, each of which is a root), so it is followed, not checked.
"""

import dataclasses
import importlib
import pkgutil
import types
import typing

import pytest

import soco
from soco.config.schema import Config
from soco.config.validation import RULES_ATTRIBUTE, at_least, config_rules, fields_without_rules
from soco.registry import method_config_class, method_names

SECTION_CONTAINERS = (Config,)
SKIPPED_MODULES = ("soco.__main__",)  # running it would run the command line


def package_modules() -> list[types.ModuleType]:
    """Every module of the soco package, imported."""
    found = [soco]
    for info in pkgutil.walk_packages(soco.__path__, prefix="soco."):
        if info.name not in SKIPPED_MODULES:
            found.append(importlib.import_module(info.name))
    return found


def config_roots() -> list[type]:
    """The dataclasses a command builds its configuration from."""
    from soco.study.design import Budget
    from soco.transfer.finetune import TransferConfig

    return [Config, TransferConfig, Budget, *(method_config_class(name) for name in method_names())]


def nested_sections(cls: type) -> list[type]:
    """`cls` and every dataclass reached through its fields' annotations, depth first."""
    reached = [cls]
    for annotation in typing.get_type_hints(cls).values():
        if dataclasses.is_dataclass(annotation):
            reached.extend(nested_sections(annotation))
    return reached


def config_dataclasses(modules: list[types.ModuleType], roots: list[type]) -> set[type]:
    """The configuration dataclasses: those of `modules` with @config_rules, and those reached from `roots`."""
    found = {cls for root in roots for cls in nested_sections(root)}
    for module in modules:
        for value in vars(module).values():
            if isinstance(value, type) and dataclasses.is_dataclass(value) and RULES_ATTRIBUTE in value.__dict__:
                found.add(value)
    return found


def missing_rules(classes: set[type]) -> list[str]:
    """'module.Class.field' for every field of a configuration dataclass that declares no rule."""
    return sorted(f"{cls.__module__}.{cls.__qualname__}.{name}" for cls in classes
                  if cls not in SECTION_CONTAINERS for name in fields_without_rules(cls))


def test_every_field_of_every_configuration_dataclass_has_a_rule():
    classes = config_dataclasses(package_modules(), config_roots())
    names = {cls.__name__ for cls in classes}
    # the walk sees every kind of section: shared, methods' (nested and base ones), transfer, study
    assert {"DataConfig", "TrainConfig", "SoCoViewsConfig", "SoCoModelConfig", "InsLocModelConfig", "MoCoConfig",
            "MoCoViewsConfig", "MoCoModelConfig", "SCRLViewsConfig", "DetCoViewsConfig", "TransferConfig",
            "Budget"} <= names
    assert missing_rules(classes) == []


def test_the_check_fails_for_a_dataclass_that_leaves_a_field_without_a_rule():
    @config_rules(side=at_least(1))
    @dataclasses.dataclass
    class Toy:
        side: int = 3
        size: int = 4  # no rule
        flipped: bool = False  # a bool's type is its whole range

    @dataclasses.dataclass
    class ToyRoot:  # no @config_rules: found as a root, and its nested section through its field
        toy: Toy = dataclasses.field(default_factory=Toy)
        count: int = 1

    module = types.ModuleType("toy_module")
    module.Toy = Toy
    assert config_dataclasses([module], []) == {Toy}
    assert missing_rules(config_dataclasses([module], [])) == [f"{__name__}.{Toy.__qualname__}.size"]
    assert config_dataclasses([], [ToyRoot]) == {ToyRoot, Toy}
    assert missing_rules({ToyRoot, Toy}) == [f"{__name__}.{Toy.__qualname__}.size",
                                            f"{__name__}.{ToyRoot.__qualname__}.count"]


@pytest.mark.parametrize("base_rule", [True, False])
def test_a_subclass_inherits_its_bases_rules(base_rule):
    @config_rules(**({"side": at_least(1)} if base_rule else {}))
    @dataclasses.dataclass
    class Base:
        side: int = 3

    @config_rules(size=at_least(1))
    @dataclasses.dataclass
    class Child(Base):
        size: int = 4

    assert fields_without_rules(Child) == ([] if base_rule else ["side"])
