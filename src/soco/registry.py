"""The method registry: `method.name` -> Method class, so that the engine builds a method it does not know.

Every module of the `soco.methods` package is imported on the first lookup, by name, and its methods
register themselves with `@register_method`; the registry imports no method itself, so it sits below
every package that looks a method up (config, engine, cli). A method of one's own registers the same
way when its module is imported. Adding a file to `soco/methods/` is therefore all a built-in needs.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil

from soco.errors import ConfigError

METHODS_PACKAGE = "soco.methods"
_REGISTERED: dict[str, type] = {}
_discovered = False


def register_method(cls: type) -> type:
    """Class decorator: make a Method subclass available under its `name` (a name is taken once)."""
    name = getattr(cls, "name", "")
    if not name:
        raise TypeError(f"{cls.__name__} has no `name`")
    known = _REGISTERED.get(name)
    if known is not None and f"{known.__module__}.{known.__qualname__}" != f"{cls.__module__}.{cls.__qualname__}":
        raise TypeError(f"method name '{name}' is taken by {known.__module__}.{known.__qualname__}")
    _REGISTERED[name] = cls
    return cls


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


def build_method(method_config) -> "Method":  # noqa: F821 - the base class is not imported here on purpose
    """An instance of the method the config section names, built from that section."""
    return method_class(method_config.name)(method_config)
