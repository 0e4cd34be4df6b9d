"""The method registry: `method.name` -> Method class, so that the engine builds a method it does not know.

Every module of the `soco.methods` package is imported on the first lookup, by name, and its methods
register themselves with `@register_method`; the registry imports no method itself, so it sits below
every package that looks a method up (config, engine, study, cli). A method of one's own registers the same
way when its module is imported. Adding a file to `soco/methods/` is therefore all a built-in needs.

What a method declares besides its code (`soco.declarations`) is read here too: its presets' folders, for
the configuration loader, and its study arms, for `soco study`.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from dataclasses import replace
from pathlib import Path

from soco.declarations import MethodPresets, StudyArm
from soco.errors import ConfigError

METHODS_PACKAGE = "soco.methods"
_REGISTERED: dict[str, type] = {}
_discovered = False


def register_method(cls: type) -> type:
    """Class decorator: make a Method subclass available under its `name` (a name, and an arm's name, is taken once)."""
    name = getattr(cls, "name", "")
    if not name:
        raise TypeError(f"{cls.__name__} has no `name`")
    known = _REGISTERED.get(name)
    if known is not None and _qualified(known) != _qualified(cls):
        raise TypeError(f"method name '{name}' is taken by {_qualified(known)}")
    _check_declarations(cls)
    _REGISTERED[name] = cls
    return cls


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_declarations(cls: type) -> None:
    """TypeError unless the presets and study arms of `cls` are declared as soco.declarations describes."""
    presets = getattr(cls, "presets", None)
    if presets is not None and not isinstance(presets, MethodPresets):
        raise TypeError(f"{cls.__name__}.presets must be a MethodPresets, not {presets!r}")
    arms = getattr(cls, "study_arms", ())
    if not isinstance(arms, tuple) or not all(isinstance(arm, StudyArm) for arm in arms):
        raise TypeError(f"{cls.__name__}.study_arms must be a tuple of StudyArm")
    if presets is None and any(arm.presets is None for arm in arms):
        raise TypeError(f"{cls.__name__}: a study arm without presets of its own needs the method's presets")
    names = [arm.name for arm in arms]
    for other in _REGISTERED.values():
        if _qualified(other) == _qualified(cls):
            continue
        taken = set(names) & {arm.name for arm in getattr(other, "study_arms", ())}
        if taken:
            raise TypeError(f"study arm {sorted(taken)[0]!r} of {_qualified(cls)} is taken by {_qualified(other)}")
    if len(set(names)) != len(names):
        raise TypeError(f"{cls.__name__}.study_arms names an arm twice")


def _discover() -> None:
    """Import every module of soco.methods once, so that the built-in methods register."""
    global _discovered
    if _discovered:
        return
    package = importlib.import_module(METHODS_PACKAGE)
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{METHODS_PACKAGE}.{module.name}")
    _discovered = True


def method_names() -> list[str]:
    """Every method that can be named in a configuration."""
    _discover()
    return sorted(_REGISTERED)


def method_class(name: str) -> type:
    """The Method class called `name`; ConfigError naming the closest known method otherwise."""
    if name not in _REGISTERED:
        _discover()
    if name not in _REGISTERED:
        close = difflib.get_close_matches(name, method_names(), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"method.name: unknown method '{name}'{hint} (methods: {', '.join(method_names())})")
    return _REGISTERED[name]


def method_config_class(name: str) -> type:
    """The config dataclass of the `method:` section of method `name`."""
    return method_class(name).config_class


def study_arms() -> list[StudyArm]:
    """Every registered method's study arms, presets filled in, by rising `order` (then by name)."""
    _discover()
    arms = []
    for cls in _REGISTERED.values():
        for arm in getattr(cls, "study_arms", ()):
            arms.append(arm if arm.presets is not None else replace(arm, presets=cls.presets))
    return sorted(arms, key=lambda arm: (arm.order, arm.name))


def preset_folders() -> list[Path]:
    """The folders registered methods keep their presets in, besides the package's own (in registry order)."""
    _discover()
    folders = []
    for cls in _REGISTERED.values():
        for presets in (getattr(cls, "presets", None), *(arm.presets for arm in getattr(cls, "study_arms", ()))):
            if presets is not None and presets.folder is not None and presets.folder not in folders:
                folders.append(presets.folder)
    return folders


def build_method(method_config) -> "Method":  # noqa: F821 - the base class is not imported here on purpose
    """An instance of the method the config section names, built from that section."""
    return method_class(method_config.name)(method_config)
