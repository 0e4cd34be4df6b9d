"""Every value of a configuration checked in one place, before anything is built or written.

A configuration dataclass declares the rule of each of its keys with the `@config_rules(key=rule, ...)`
class decorator, beside the dataclass: the shared sections in `schema.py`, each method's section in its own
file, `TransferConfig` in `transfer/finetune.py`, the study's `Budget` in `study/design.py`. The rules are
ranges (`at_least`, `above`, `between`), choices (`one_of`), `[low, high]` pairs (`interval`), lists of
numbers (`each`) or of other values (`list_of`), mappings (`mapping_of`), the keywords of another
configuration dataclass (`keywords_of`, in `loading.py` since it builds one) and free text (`ANY_TEXT`); a
subclass inherits its bases' rules. Relations between the keys of one section (a minimum below its maximum)
live in the dataclass's optional `check_values(self)` method, which raises ConfigError. The types themselves
are checked while loading (`loading.py`). `validate_section` walks a section and its nested sections; every
problem is a one-line ConfigError that starts with the dotted key. Nothing else checks a value: the methods,
their transforms and the fine-tuning trust a section that was validated when it was loaded.

A field needs no rule when it is a bool (its type is its whole range) or a nested section (its own fields
have rules); `fields_without_rules` names the others that lack one.

The command line's own numbers (`--steps`, `--workers`) are checked by the argparse types at the end; an
option that sets a dataclass's key (`soco transfer --seed`) is checked by that key's rule (`config_argument`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import math
import os
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from soco.errors import ConfigError

RULES_ATTRIBUTE = "__config_rules__"
RELATIONS_HOOK = "check_values"
LEADING_KEY = re.compile(r"[A-Za-z_][\w.]*[\w]")  # the dotted key a relation's message starts with


def _shown(value: Any) -> str:
    """A value as the user would write it in YAML (true, 0.5, 'text', [1, 2])."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_shown(item) for item in value) + "]"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))  # a bound of 0.0 reads as 0
    return str(value)


def _is_number(value: Any) -> bool:
    """True for ints and floats, not for bools."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Range:
    """A finite number between `low` and `high`; either end may be absent or open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        """The range in words: 'at least 1', 'greater than 0', 'in [0, 1)'."""
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{_shown(self.low)}, {_shown(self.high)}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'greater than' if self.low_open else 'at least'} {_shown(self.low)}"
        if self.high is not None:
            return f"{'less than' if self.high_open else 'at most'} {_shown(self.high)}"
        return "a finite number"

    def contains(self, value: Any) -> bool:
        """Whether `value` is a finite number within the range."""
        if not _is_number(value) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value`, or None."""
        if self.contains(value):
            return None
        if _is_number(value) and not math.isfinite(value):
            # 1e400 reads as inf: naming inf would blame a value the user never wrote
            return f"must be {self.describe()}, not a finite number"
        return f"must be {self.describe()}, not {_shown(value)}"


@dataclass(frozen=True)
class OneOf:
    """One of a few named values."""

    choices: tuple

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` (with the closest choice), or None."""
        if value in self.choices:
            return None
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [str(c) for c in self.choices], n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"must be one of {', '.join(_shown(c) for c in self.choices)}, not {_shown(value)}{hint}"


@dataclass(frozen=True)
class Interval:
    """A `[low, high]` pair with low <= high, both ends within `bounds`."""

    bounds: Range

    def problem(self, value: Any) -> str | None:
        """What is wrong with the pair, or None."""
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            return f"must be [low, high], not {_shown(value)}"
        low, high = value
        if not (self.bounds.contains(low) and self.bounds.contains(high)):
            return f"must be [low, high] with both ends {self.bounds.describe()}, not {_shown(value)}"
        if low > high:
            return f"must be [low, high] with low <= high, not {_shown(value)}"
        return None


@dataclass(frozen=True)
class Each:
    """A list whose every item is within `item`, with an exact length or a minimum one."""

    item: Range
    length: int | None = None
    min_length: int = 0

    def problem(self, value: Any) -> str | None:
        """What is wrong with the list, or None."""
        if not isinstance(value, (list, tuple)):
            return f"must be a list, not {_shown(value)}"
        if self.length is not None and len(value) != self.length:
            return f"must hold {self.length} values, not {len(value)}: {_shown(value)}"
        if len(value) < self.min_length:
            return f"must hold at least {self.min_length} value(s), not {_shown(value)}"
        bad = [item for item in value if not self.item.contains(item)]
        if bad:
            return f"every value must be {self.item.describe()}, not {_shown(bad[0])} in {_shown(value)}"
        return None


@dataclass(frozen=True)
class Text:
    """Any string (a path, a free name): declared so that every key of a section has a rule."""

    def problem(self, value: Any) -> str | None:
        """Strings are checked by type while loading; nothing more to say."""
        return None if isinstance(value, str) else f"must be a string, not {_shown(value)}"


@dataclass(frozen=True)
class ListOf:
    """A list (or tuple) whose every item obeys `item`, with at least `min_length` items."""

    item: Any
    min_length: int = 0

    def problem(self, value: Any) -> str | None:
        """What is wrong with the list (the first bad item's problem), or None."""
        if not isinstance(value, (list, tuple)):
            return f"must be a list, not {_shown(value)}"
        if len(value) < self.min_length:
            return f"must hold at least {self.min_length} value(s), not {_shown(value)}"
        for item in value:
            problem = self.item.problem(item)
            if problem:
                return f"every value {problem} in {_shown(value)}"
        return None


@dataclass(frozen=True)
class MappingOf:
    """A mapping from text keys to values that each obey `value` (None: any value, checked where it is used)."""

    value: Any = None

    def problem(self, value: Any) -> str | None:
        """What is wrong with the mapping, or None."""
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            return f"must be a mapping of names, not {_shown(value)}"
        for key, item in value.items():
            problem = self.value.problem(item) if self.value is not None else None
            if problem:
                return f"{key} {problem}"
        return None


Rule = Range | OneOf | Interval | Each | Text | ListOf | MappingOf  # and loading.KeywordsOf


def at_least(low: float) -> Range:
    """A number >= low."""
    return Range(low=low)


def above(low: float) -> Range:
    """A number > low."""
    return Range(low=low, low_open=True)


def between(low: float, high: float) -> Range:
    """A number in [low, high]."""
    return Range(low=low, high=high)


def list_of(item: Rule, min_length: int = 0) -> ListOf:
    """A list whose every item obeys `item` (choices, text)."""
    return ListOf(item, min_length)


def mapping_of(value: Rule | None = None) -> MappingOf:
    """A mapping of names to values obeying `value`."""
    return MappingOf(value)


def one_of(*choices: Any) -> OneOf:
    """One of `choices`."""
    return OneOf(tuple(choices))


def interval(bounds: Range) -> Interval:
    """A [low, high] pair within `bounds`."""
    return Interval(bounds)


def each(item: Range, length: int | None = None, min_length: int = 0) -> Each:
    """A list of numbers within `item`."""
    return Each(item, length, min_length)


MAX_SEED = 2**32 - 1  # numpy's seeds end here, and the sampler's seed * 1_000_003 + epoch stays within 64 bits
SEED = between(0, MAX_SEED)
# The side of an image soco builds (a tile, a scene, a detector's resize): 8192 px is 192 MiB of RGB, more
# than any source image soco tiles; an unbounded side asks numpy for the square of a typo.
MAX_IMAGE_SIDE = 8192
PROBABILITY = between(0.0, 1.0)
FRACTION = Range(0.0, 1.0, low_open=True)  # (0, 1]: a share of an image that cannot be empty
POSITIVE = above(0.0)
ANY_TEXT = Text()


def config_rules(**rules: Rule) -> Callable[[type], type]:
    """Class decorator (above @dataclass): the rule of each named key of a configuration dataclass."""

    def attach(cls: type) -> type:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"@config_rules goes above @dataclass (on {cls.__name__})")
        fields = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(rules) - fields)
        if unknown:
            raise TypeError(f"@config_rules on {cls.__name__} names keys it does not have: {', '.join(unknown)}")
        setattr(cls, RULES_ATTRIBUTE, dict(rules))
        return cls

    return attach


def rules_of(cls: type) -> dict[str, Rule]:
    """The rules of a configuration dataclass's own keys, its base classes' included (not nested sections')."""
    rules: dict[str, Rule] = {}
    for klass in reversed(cls.__mro__):
        rules.update(klass.__dict__.get(RULES_ATTRIBUTE, {}))
    return rules


def fields_without_rules(cls: type) -> list[str]:
    """The fields of a configuration dataclass that declare no rule (bools and nested sections need none)."""
    hints = typing.get_type_hints(cls)
    rules = rules_of(cls)
    missing = []
    for field in dataclasses.fields(cls):
        annotation = hints[field.name]
        if annotation is bool or dataclasses.is_dataclass(annotation) or field.name in rules:
            continue
        missing.append(field.name)
    return missing


def _with_key(error: ConfigError, key: str) -> ConfigError:
    """The error, marked with the dotted key it is about (so that a loader can say where the value came from)."""
    error.key = key
    return error


def validate_section(section: Any, prefix: str) -> None:
    """ConfigError naming the first key of `section` (nested sections included) that breaks its rule or a relation.

    The error's `key` attribute is that dotted key: a relation's message starts with the key it blames.
    """
    rules = rules_of(type(section))
    for field in dataclasses.fields(section):
        key = f"{prefix}.{field.name}" if prefix else field.name
        value = getattr(section, field.name)
        if dataclasses.is_dataclass(value):
            validate_section(value, key)
            continue
        rule = rules.get(field.name)
        problem = rule.problem(value) if rule is not None else None
        if problem:
            raise _with_key(ConfigError(f"{key}: {problem}"), key)
    relations = getattr(section, RELATIONS_HOOK, None)
    if relations is not None:
        try:
            relations()
        except ConfigError as error:
            if getattr(error, "key", None) is None:
                blamed = LEADING_KEY.match(str(error))
                error.key = blamed.group(0) if blamed else prefix
            raise


SHARED_SECTIONS = ("data", "proposals", "optim", "train")


def validate_shared(config: Any) -> None:
    """Check the sections every method shares (data, proposals, optim, train)."""
    for name in SHARED_SECTIONS:
        validate_section(getattr(config, name), name)


def validate_method_needs(config: Any) -> None:
    """ConfigError on train.batch_size when it is below what the method's networks train on (its smallest batch).

    train.batch_size is per process and per micro-batch (train.accumulate adds micro-batches of that size, it does not
    split one). The process count is torchrun's WORLD_SIZE, set before any process starts (init_distributed reads it).
    """
    from soco.registry import method_class  # the registry, not a method: looked up by name

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    fewest, why = method_class(config.method.name).smallest_batch_size(config.method, world_size)
    if config.train.batch_size < fewest:
        raise _with_key(ConfigError(f"train.batch_size: must be at least {fewest} for method {config.method.name}, "
                                    f"not {config.train.batch_size}: {why}"), "train.batch_size")


def validate(config: Any) -> None:
    """Check every value of a pretraining Config: the shared sections, the method's section, what the method needs."""
    validate_shared(config)
    if config.method is not None:
        validate_section(config.method, "method")
        validate_method_needs(config)


# The command line's own numbers: argparse types, so that a bad value is argparse's one-line error. Each
# carries its rule (`NumberArgument.rule`), so that a test can prove every numeric option is bounded.


def _number(text: str) -> float:
    """A number as users write it: 3, 1e3, 0.5, 1_000."""
    try:
        return float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None


class NumberArgument:
    """An argparse type: a finite number obeying a rule (a Range, or a OneOf of numbers), whole when `whole`.

    The rule is given, or read when first needed from a configuration dataclass's declared rule
    (`source` = ('module:Class', key)), so that an option feeding that key is checked by the key's one rule
    without importing the dataclass's module (and torch) while the parser is built.
    """

    def __init__(self, rule: Range | OneOf | None = None, whole: bool = True, note: str = "",
                 source: tuple[str, str] | None = None):
        self._rule, self.whole, self.note, self.source = rule, whole, note, source
        self.__name__ = "whole number" if whole else "number"  # argparse names a type by it

    @property
    def rule(self) -> Range | OneOf:
        """The rule the value must obey (a dataclass's rule is looked up once)."""
        if self._rule is None:
            module, _, name = self.source[0].partition(":")
            rule = rules_of(getattr(importlib.import_module(module), name))[self.source[1]]
            self._rule = rule.item if isinstance(rule, Each) else rule  # an option of several values: each one's
        return self._rule

    def _expected(self) -> str:
        """What the option takes, in words: 'expected a whole number', 'must be a number greater than 0'."""
        if self.whole:
            return "expected a whole number"
        return f"must be a number {self.rule.describe()}" if isinstance(self.rule, Range) else "expected a number"

    def _out_of_range(self, value: float, text: str) -> str | None:
        """What is wrong with a finite value, naming the end of the range it passes (or None)."""
        rule = self.rule
        if isinstance(rule, OneOf):
            return None if value in rule.choices else rule.problem(int(value) if self.whole else value)
        if rule.contains(value):
            return None
        kind = "" if self.whole else "a number "
        if rule.low is not None and rule.high is not None and not (rule.low_open or rule.high_open):
            side = f"at least {_shown(rule.low)}" if value < rule.low else f"at most {_shown(rule.high)}"
            return f"must be {kind}{side}, not {text}"
        return f"must be {kind}{rule.describe()}, not {text}"

    def __call__(self, text: str) -> int | float:
        """The parsed value, or argparse's error naming the problem."""
        value = _number(text)
        if not math.isfinite(value):  # 1e400 reads as inf: the message names the problem, not inf
            raise argparse.ArgumentTypeError(f"{self._expected()}; {text!r} is not a finite number")
        if self.whole and not value.is_integer():
            raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}")
        problem = self._out_of_range(value, text)
        if problem:
            raise argparse.ArgumentTypeError(problem + self.note)
        return int(value) if self.whole else value


def count_argument(minimum: int, note: str = "", maximum: int | None = None) -> NumberArgument:
    """An argparse type: a whole number in [minimum, maximum] ('1e3' is 1000); `note` follows the error message."""
    return NumberArgument(Range(minimum, maximum), whole=True, note=note)


def number_argument(rule: Range) -> NumberArgument:
    """An argparse type: a finite number within `rule` (a share, a rate)."""
    return NumberArgument(rule, whole=False)


def config_argument(target: str, key: str, whole: bool = True) -> NumberArgument:
    """An argparse type for an option setting `key` of the dataclass `target` ('module:Class'), checked by its rule."""
    return NumberArgument(whole=whole, source=(target, key))


positive_number_argument = number_argument(POSITIVE)
seed_argument = count_argument(0, maximum=MAX_SEED)


def names_argument(text: str) -> list[str]:
    """An argparse type: a comma-separated list of at least one name ('a,b'); blank items are refused."""
    names = [name.strip() for name in text.split(",")]
    if not any(names):
        raise argparse.ArgumentTypeError(f"expected names separated by commas, not {text!r}")
    if not all(names):
        raise argparse.ArgumentTypeError(f"a name is empty in {text!r}")
    return names
