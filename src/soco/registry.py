"""The method registry: `method.name` -> Method class, so that the engine builds a method it does not know.

Built-in methods are imported on first use, by module name, so that the registry sits below every
package that looks a method up (config, engine, cli) and imports none of them itself. A user's own
method registers itself with `@register_method` when its module is imported.
"""

from __future__ import annotations

import difflib
import importlib

from soco.errors import ConfigError

# name -> module that defines it; imported lazily so that importing the registry imports no method.
BUILTIN_METHODS = {
    "soco": "soco.methods.soco",
}
_REGISTERED: dict[str, type] = {}


def register_method(cls: type) -> type:
    """Class decorator: make a Method subclass available under its `name`."""
    if not getattr(cls, "name", ""):
        raise TypeError(f"{cls.__name__} has no `name`")
    _REGISTERED[cls.name] = cls
    return cls


def method_names() -> list[str]:
    """Every method that can be named in a configuration."""
    return sorted({*BUILTIN_METHODS, *_REGISTERED})


def method_class(name: str) -> type:
    """The Method class called `name`; ConfigError naming the closest known method otherwise."""
    if name not in _REGISTERED and name in BUILTIN_METHODS:
        importlib.import_module(BUILTIN_METHODS[name])
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
