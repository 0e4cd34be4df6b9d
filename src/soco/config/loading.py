"""Build a typed Config from a preset or YAML file plus `section.key=value` overrides, strictly.

Every value is checked (`validation.py`) as the Config is built, once, so a command refuses a bad value
before it builds a network or writes a file; the shared sections are checked before the method registry
is consulted, so their mistakes are reported without importing any method (and torch). A refused value's
line ends with where it came from: the override that set it, the preset or file, or the default.
"""

from __future__ import annotations

import copy
import importlib
import dataclasses
from dataclasses import dataclass
import difflib
import json
import math
import re
import types
import typing
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from soco.config.schema import DEFAULT_METHOD, Config
from soco.config.validation import _shown, validate_method_needs, validate_section, validate_shared
from soco.errors import ConfigError

PRESET_PACKAGE = "soco.config.presets"
# Whole numbers beyond this are not exact as floats: 1e3 may stand for an integer key, 1e30 may not.
LARGEST_EXACT_INTEGER = 2**53


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers as people write them (1e-4, 1e30 and -.5 are floats), refusing duplicates.

    PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent (1.0e+30), so that 1e30
    would silently be the string '1e30'; and it lets a key given twice keep its last value without a word.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        """A mapping whose keys are each given once; a repeated key is an error naming both lines."""
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: PyYAML's own error follows
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice (lines {first.start_mark.line + 1} and "
                    f"{key_node.start_mark.line + 1})", key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+
                  |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?)$""", re.VERBOSE),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """YAML text parsed with `ConfigLoader` (numbers as people write them)."""
    return yaml.load(text, Loader=ConfigLoader)


def list_presets() -> list[str]:
    """Names of the YAML presets shipped inside the package."""
    folder = resources.files(PRESET_PACKAGE)
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _method_preset_files() -> dict[str, Path]:
    """Preset name -> file, from the folders registered methods declare (`MethodPresets.folder`)."""
    from soco.registry import preset_folders  # the registry, not a method: a method outside the package

    files: dict[str, Path] = {}
    for folder in preset_folders():
        for path in sorted(folder.glob("*.yaml")):
            files.setdefault(path.stem, path)
    return files


def every_preset() -> list[str]:
    """Every preset name a configuration can start from: the package's, then those of methods' own folders.

    A name the package has is the package's preset, whichever method folder holds a file of that name too.
    """
    shipped = list_presets()
    return [*shipped, *(name for name in _method_preset_files() if name not in shipped)]


def _preset_text(name: str) -> str | None:
    """The YAML text of a preset by name: the package's own first, then a registered method's folder."""
    if name in list_presets():
        return (resources.files(PRESET_PACKAGE) / f"{name}.yaml").read_text()
    path = _method_preset_files().get(name)
    return path.read_text() if path is not None else None


def _suggest(word: str, candidates: list[str]) -> str:
    """A ' (did you mean X?)' hint for the closest candidate, or an empty string."""
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved type annotations of a dataclass's fields."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, expected: Any, key: str, known_keys: KnownKeys = None) -> Any:
    """Check `value` against the annotation `expected`; allow the lossless int -> float widening."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(expected):
            try:
                return _coerce(value, option, key, known_keys)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} matches none of {expected}")
    if expected is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(expected)
        item_type = args[0] if args else Any
        items = [_coerce(item, item_type, f"{key}[{i}]", known_keys) for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if expected is Any:
        return value
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if expected is int:
        # 1e3 is how people write a thousand: a whole float that is exact is taken as the integer
        if isinstance(value, float) and value.is_integer() and abs(value) <= LARGEST_EXACT_INTEGER:
            return int(value)
        if isinstance(value, float) and not math.isfinite(value):  # 1e400 reads as inf, which no one wrote
            raise ConfigError(f"{key}: expected an integer, got a number that is not finite")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if expected is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if dataclasses.is_dataclass(expected):
        return _build(expected, value, key, known_keys)
    raise ConfigError(f"{key}: unsupported type {expected}")


KnownKeys = list[str] | Callable[[], list[str]] | None


def _build(cls: type, values: Any, prefix: str, known_keys: KnownKeys = None) -> Any:
    """Instantiate dataclass `cls` from a mapping, naming any unknown key and its closest valid one.

    `known_keys` are every dotted key of the whole configuration (or a function giving them, called
    only for an unknown key), for hints about a key given in the wrong section; by default those of
    `cls` itself.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {values!r}")
    types_by_name = _field_types(cls)
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in types_by_name:
            if known_keys is None:
                known_keys = dataclass_keys(cls, prefix)
            elif callable(known_keys):
                known_keys = known_keys()
            valid = [f"{prefix}.{n}" if prefix else n for n in types_by_name]
            same_leaf = [k for k in known_keys if k.rsplit(".", 1)[-1] == name and k != key]
            sections = sorted({k.rsplit(".", 1)[0] for k in known_keys if "." in k})
            same_section = [s for s in sections if s.rsplit(".", 1)[-1] == name and s != key]
            if same_leaf:  # a key given without (or with the wrong) section
                hint = "; did you mean " + " or ".join(f"'{k}'" for k in same_leaf) + "?"
            elif same_section:  # a section given without the section it sits in (views -> method.views)
                hint = "; did you mean " + " or ".join(f"'{k}'" for k in same_section) + "?"
            else:
                hint = _suggest(key, valid) or _suggest(key, known_keys)
            raise ConfigError(f"unknown key '{key}'{hint} (valid here: {', '.join(valid)})")
        kwargs[name] = _coerce(value, types_by_name[name], key, known_keys)
    return cls(**kwargs)


def build_dataclass(cls: type, values: dict, prefix: str = "") -> Any:
    """Any configuration dataclass from a nested mapping, strictly: unknown keys, wrong types, bad values are errors."""
    instance = _build(cls, values or {}, prefix)
    validate_section(instance, prefix)
    return instance


# A rule that needs the loader lives beside it, so that validation.py imports nothing of config.
@dataclass(frozen=True)
class KeywordsOf:
    """Keywords of another configuration dataclass (`target`, 'module:Class', imported when a value is checked).

    The mapping must build that dataclass as a section named `prefix` would: known keys, right types, and
    every key within its own rule.
    """

    target: str
    prefix: str

    def problem(self, value: Any) -> str | None:
        """What is wrong with the keywords (the target's own one-line error), or None."""
        if not isinstance(value, dict):
            return f"must be a mapping of {self.prefix} keys, not {_shown(value)}"
        module, _, name = self.target.partition(":")
        try:
            build_dataclass(getattr(importlib.import_module(module), name), value, self.prefix)
        except ConfigError as error:
            return f"holds a bad {self.prefix} setting: {error}"
        return None



def keywords_of(target: str, prefix: str) -> KeywordsOf:
    """The keywords of the configuration dataclass `target` ('module:Class'), checked as its section `prefix`."""
    return KeywordsOf(target, prefix)



def _method_config_class(values: dict) -> type:
    """The config dataclass of the method named in a raw `method` section (default: SoCo)."""
    from soco.registry import (
        method_config_class,  # the registry, not a method: looked up by name
    )

    section = values.get("method") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"method: expected a mapping of keys, got {section!r}")
    name = section.get("name", DEFAULT_METHOD)
    if not isinstance(name, str):
        raise ConfigError(f"method.name: expected a string, got {name!r}")
    return method_config_class(name)


def config_from_dict(values: dict) -> Config:
    """A checked Config from a nested mapping; missing keys take their defaults, the method section its method's."""
    if not isinstance(values or {}, dict):
        raise ConfigError("config: expected a mapping of sections")
    values = dict(values or {})
    method_section = values.pop("method", None)

    def known_keys() -> list[str]:
        return all_keys(method_class=_method_config_class({"method": method_section}))

    config = _build(Config, values, "", known_keys)
    validate_shared(config)  # before the registry imports the methods
    method_class = _method_config_class({"method": method_section})
    config.method = _build(method_class, method_section or {}, "method", known_keys)
    validate_section(config.method, "method")
    validate_method_needs(config)
    return config


def config_to_dict(config: Any) -> dict:
    """A plain nested dict of a Config (tuples as lists), ready for YAML or JSON."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(config))


def dataclass_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a configuration dataclass, e.g. 'proposals.workers'."""
    keys = []
    for name, annotation in _field_types(cls).items():
        key = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(annotation):
            keys.extend(dataclass_keys(annotation, key))
        else:
            keys.append(key)
    return keys


def all_keys(method_class: type | None = None) -> list[str]:
    """Every dotted key of a pretraining configuration, the method section's included (SoCo's by default)."""
    if method_class is None:
        method_class = _method_config_class({})
    keys = []
    for key in dataclass_keys(Config):
        if key == "method":
            keys.extend(dataclass_keys(method_class, "method"))
        else:
            keys.append(key)
    return keys


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split 'section.key=value' into its key path and YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        problem = " ".join(str(error).split())  # PyYAML's message spans lines
        raise ConfigError(f"override '{text}': the value is not valid YAML ({problem})") from None
    return key.split("."), value


def _set_path(tree: dict, path: list[str], value: Any, full_key: str) -> None:
    """Set a dotted key in a nested dict, creating sections as needed."""
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{full_key}': '{part}' is a value, not a section")
        node = child
    node[path[-1]] = value


def _read_yaml(path: Path, label: str) -> dict:
    """Parse one YAML mapping, with errors naming the file; an empty file is refused, not read as defaults."""
    try:
        values = parse_yaml(path.read_text())
    except yaml.YAMLError as error:
        problem = " ".join(str(error).split())  # PyYAML's message spans lines
        raise ConfigError(f"{label}: not valid YAML: {problem}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{label}: cannot be read ({error})") from None
    if values is None:
        # Nothing would be set, and the schema's defaults are the paper's full-size run.
        raise ConfigError(f"{label}: the file holds no settings; write at least 'base: PRESET' "
                          "(`soco methods` lists the presets) or sections of keys")
    if not isinstance(values, dict):
        raise ConfigError(f"{label}: expected a mapping of sections at the top level")
    return values


def _merge(base: dict, update: dict) -> dict:
    """Recursive dict merge: values of `update` win, sections merge."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_preset_values(name_or_path: str, _chain: tuple[str, ...] = ()) -> dict:
    """Raw values of a preset name or a YAML file, following its optional `base:` chain."""
    if name_or_path in _chain:
        raise ConfigError(f"config {_chain[0]}: the base chain comes back to {name_or_path} "
                          f"({' -> '.join([*_chain, name_or_path])})")
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if candidate.is_dir():
            raise ConfigError(f"config file {candidate} is a folder, not a YAML file")
        if not candidate.is_file():
            raise ConfigError(f"config file {candidate} does not exist")
        values = _read_yaml(candidate, str(candidate))
    else:
        text = _preset_text(name_or_path)
        if text is None:
            presets = every_preset()
            raise ConfigError(
                f"unknown preset '{name_or_path}'{_suggest(name_or_path, presets)} "
                f"(presets: {', '.join(presets)}; or give a .yaml file)"
            )
        values = parse_yaml(text) or {}
    base = values.pop("base", None)
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{name_or_path}: base must be a preset name or a YAML file, not {base!r}")
        if candidate.is_file():
            base = _beside(candidate, base)
        values = _merge(load_preset_values(base, (*_chain, name_or_path)), values)
    return values


def _beside(config_file: Path, base: str) -> str:
    """A relative file `base:` read from the folder of the file that names it (a preset name stays a name)."""
    path = Path(base).expanduser()
    names_a_file = path.suffix in (".yaml", ".yml") or len(path.parts) > 1
    return str(config_file.parent / path) if names_a_file and not path.is_absolute() else base


def load_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The resolved Config: schema defaults, then the preset or file, then each override in order.

    A value that breaks its rule is refused in one line that ends with where the value came from.
    """
    values = load_preset_values(preset) if preset else {}
    from_preset = copy.deepcopy(values)  # what the preset set, before the overrides
    for text in overrides:
        path, value = parse_override(text)
        _set_path(values, path, value, text)
    try:
        return config_from_dict(values)
    except ConfigError as error:
        key = getattr(error, "key", None)
        if key is None:  # not a value's rule (an unknown key, a wrong type): the message names the override
            raise
        raise ConfigError(f"{error} ({value_origin(key, preset, from_preset, overrides)})") from None


def value_origin(key: str, preset: str | None, preset_values: dict, overrides: list[str] | tuple[str, ...]) -> str:
    """Where a key's value came from, in words: the last override that set it, the preset or file, or the default."""
    for text in reversed(list(overrides)):
        given = text.split("=", 1)[0].strip()
        if given == key or key.startswith(given + "."):
            return f"set by {text}"
    node: Any = preset_values
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return "the default" if not preset else f"the default; {preset} does not set it"
        node = node[part]
    return f"set by {preset}"


Flag = tuple[str, str, Any]  # (the option as typed, e.g. "--steps", the key it sets, its value or None)


def with_flags(overrides: list[str] | tuple[str, ...], flags: list[Flag]) -> list[str]:
    """The `key=value` overrides followed by those of the options given; a key set both ways is an error.

    Otherwise the option would silently win, and a bad override under it (train.steps=abc --steps 2)
    would never be read.
    """
    combined = list(overrides)
    for option, key, value in flags:
        if value is None:
            continue
        for text in overrides:
            given = text.split("=", 1)[0].strip()
            if given == key or key.startswith(given + "."):
                raise ConfigError(f"{key} is set twice, by {option} ({key}={_flag_text(value)}) and by {text}; "
                                  "give one of them")
        combined.append(f"{key}={_flag_text(value)}")
    return combined


def _flag_text(value: Any) -> str:
    """An option's value as an override's YAML: strings quoted, so that a path such as 'a: b' stays a string."""
    return json.dumps(value) if isinstance(value, str) else repr(value)


def save_config(config: Config, path: str | Path) -> Path:
    """Write the resolved configuration as YAML next to a run's outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return path


def apply_overrides(instance: Any, overrides: list[str] | tuple[str, ...], prefix: str = "") -> Any:
    """A copy of a configuration dataclass with `key=value` overrides applied, strictly checked.

    Keys may carry the section name `prefix` (e.g. 'transfer.epochs=12' as well as 'epochs=12').
    """
    values = config_to_dict(instance)
    for text in overrides:
        path, value = parse_override(text)
        if prefix and path[0] == prefix and len(path) > 1:
            path = path[1:]
        _set_path(values, path, value, text)
    try:
        return build_dataclass(type(instance), values, prefix)
    except ConfigError as error:
        key = getattr(error, "key", None)
        if key is None:
            raise
        bare = [text if text.startswith(f"{prefix}.") or not prefix else f"{prefix}.{text}" for text in overrides]
        origin = next((f"set by {text}" for text, full in zip(reversed(overrides), reversed(bare))
                       if key == full.split("=", 1)[0].strip()), "the default")
        raise ConfigError(f"{error} ({origin})") from None
