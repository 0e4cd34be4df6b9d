"""Every key of the configuration is read by the code that it configures: no key is silently accepted."""

import ast
from collections import Counter
from pathlib import Path

import soco
from soco.config.loading import all_keys, load_config
from soco.registry import method_config_class, method_names

SOURCE = Path(soco.__file__).parent
# Reading a key to check its value is not using it.
VALIDATORS = ("check_", "validate_")


def attribute_reads() -> tuple[set[str], set[tuple[str, str]], set[str]]:
    """(attribute names read, (owner name, attribute) pairs read, string constants) outside validators."""
    names, pairs, strings = set(), set(), set()
    for path in SOURCE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        skipped = {id(node) for function in ast.walk(tree)
                   if isinstance(function, ast.FunctionDef) and function.name.startswith(VALIDATORS)
                   for node in ast.walk(function)}
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                names.add(node.attr)
                owner = node.value
                if isinstance(owner, ast.Attribute):
                    pairs.add((owner.attr, node.attr))
                elif isinstance(owner, ast.Name):
                    pairs.add((owner.id, node.attr))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                strings.add(node.value)
    return names, pairs, strings


def every_key() -> list[str]:
    """The dotted keys of every method's configuration (the shared sections once)."""
    keys = set()
    for name in method_names():
        keys.update(all_keys(method_config_class(name)))
    return sorted(keys)


def test_every_schema_key_is_read_somewhere_outside_validation():
    names, pairs, strings = attribute_reads()
    keys = every_key()
    leaf_counts = Counter(key.rsplit(".", 1)[-1] for key in keys)
    sections = {part for key in keys for part in key.split(".")[:-1]}
    unread = []
    for key in keys:
        parent, leaf = key.split(".")[-2:]
        if leaf in sections:
            # A leaf that names a section (train.method once) must be read through its own section.
            read = (parent, leaf) in pairs
        elif leaf_counts[leaf] > 1:
            # A leaf in two sections: read through its section, or through a section handed in as `config`.
            read = (parent, leaf) in pairs or ("config", leaf) in pairs
        else:
            read = leaf in names or leaf in strings
        if not read:
            unread.append(key)
    assert unread == []


def test_keys_that_configured_nothing_are_gone_and_refused():
    keys = every_key()
    assert "train.method" not in keys and "proposals.chunk_size" not in keys
    for removed in ("train.method=soco", "proposals.chunk_size=8"):
        try:
            load_config("default", [removed])
        except soco.errors.ConfigError as error:
            assert "unknown key" in str(error)
        else:
            raise AssertionError(f"{removed} was accepted")
