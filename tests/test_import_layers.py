"""The import graph has no arrow running back up: each package of soco imports only from the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "soco"

# From the bottom up, as docs/architecture.md's package table reads; one layer may hold several packages,
# which then do not import one another.
LAYERS = (
    ("errors",),
    ("files",),
    ("run_folder", "declarations", "encoder_layout"),
    ("registry",),
    ("config",),
    ("models",),
    ("data",),
    ("labelled",),
    ("export",),
    ("methods",),
    ("engine",),
    ("transfer",),
    ("study",),
    ("cli",),
    ("__main__",),
)
LAYER_OF = {package: level for level, packages in enumerate(LAYERS) for package in packages}


def package_of(module: str) -> str:
    """'data' for soco.data.views, 'errors' for soco.errors, '__init__' for soco itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def soco_imports(path: Path) -> set[str]:
    """Every soco module a file imports, at its top or inside a function."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return {module for module in modules if module == "soco" or module.startswith("soco.")}


def upward_imports(source: Path) -> list[str]:
    """'engine/x.py imports soco.cli.y' for every import of a package at the same layer or above, unknown ones too."""
    problems = []
    for path in sorted(source.rglob("*.py")):
        relative = path.relative_to(source)
        importer = relative.parts[0].removesuffix(".py")
        if importer == "__init__":
            continue  # soco/__init__.py holds the version only
        for module in sorted(soco_imports(path)):
            imported = package_of(module)
            if imported == importer or imported == "__init__":
                continue
            if importer not in LAYER_OF or imported not in LAYER_OF:
                problems.append(f"{relative} imports {module}: a package missing from LAYERS")
            elif LAYER_OF[imported] >= LAYER_OF[importer]:
                problems.append(f"{relative} imports {module}, which is not below {importer}")
    return problems


def test_every_package_imports_only_from_the_layers_below_it():
    assert upward_imports(SOURCE) == []


@pytest.mark.parametrize("importer, imported", [("data/views.py", "soco.engine.step"), ("models/heads.py", "soco.data"),
                                                ("newpackage/x.py", "soco.errors")])
def test_an_upward_or_unknown_import_is_found(tmp_path, importer, imported):
    path = tmp_path / importer
    path.parent.mkdir(parents=True)
    path.write_text(f"def late():\n    import {imported}\n")
    assert len(upward_imports(tmp_path)) == 1
