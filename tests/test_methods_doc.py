"""docs/methods.md's comparison tables point at real code: every `file:line` `symbol` reference holds the symbol."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS_DOC = ROOT / "docs" / "methods.md"
# `src/soco/methods/soco.py:42` `pool_all_levels`: a path with a line number, then the text found on that line
REFERENCE = re.compile(r"`((?:src|tests|benchmarks)/[\w/.-]+\.(?:py|yaml|md)):(\d+)` `([^`]+)`")
TABLE_HEADER = "| aspect | release (file:line, value) | ours (file:line, value) | default | switch |"


def references(text: str) -> list[tuple[str, int, str]]:
    """(path, line number, symbol) of every code reference in the text."""
    return [(path, int(line), symbol) for path, line, symbol in REFERENCE.findall(text)]


def test_every_code_reference_names_a_line_that_holds_its_symbol():
    text = METHODS_DOC.read_text()
    found = references(text)
    assert len(found) > 100  # the tables of every method
    wrong = []
    for path, line, symbol in found:
        lines = (ROOT / path).read_text().splitlines()
        if not 1 <= line <= len(lines) or symbol not in lines[line - 1]:
            held = lines[line - 1].strip() if 1 <= line <= len(lines) else "(past the end)"
            wrong.append(f"{path}:{line} should hold {symbol!r}, holds {held!r}")
    assert not wrong, "\n".join(wrong)


def test_each_method_has_its_comparison_table():
    text = METHODS_DOC.read_text()
    sections = re.split(r"^### ", text, flags=re.MULTILINE)
    tables = {section.splitlines()[0]: TABLE_HEADER in section for section in sections[1:]}
    for method in ("SoCo", "BYOL", "SCRL", "InsLoc", "DetCo"):
        assert any(title.startswith(method) and has for title, has in tables.items()), method


def test_the_checker_finds_a_wrong_line():
    assert references("see `src/soco/methods/soco.py:1` `no such text`") == [("src/soco/methods/soco.py", 1,
                                                                                 "no such text")]
    first_line = (ROOT / "src/soco/methods/soco.py").read_text().splitlines()[0]
    assert "no such text" not in first_line
