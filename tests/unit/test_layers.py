"""The layers import downwards only: cli/app -> compress, export, runtime -> core.

Checked on the syntax tree, so an import hidden in a function body counts as much as one at
the top of a module (the recipe used to import slimdiff.compress inside a method).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
APP = ("slimdiff.app", "slimdiff.cli")
STAGES = ("slimdiff.compress", "slimdiff.export", "slimdiff.runtime")

# folder (as packaged) -> the slimdiff modules it must not import
RULES = {
    "core": (ROOT / "slimdiff", (*APP, *STAGES)),
    "compress": (ROOT / "compress", (*APP, "slimdiff.export", "slimdiff.runtime")),
    "export": (ROOT / "export", (*APP, "slimdiff.compress")),
    "runtime": (ROOT / "runtime", (*APP, "slimdiff.compress", "slimdiff.export")),
}


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import statement in `source`, at any depth."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def _files(layer: str) -> list[Path]:
    folder = RULES[layer][0]
    files = sorted(folder.rglob("*.py"))
    if layer == "core":  # the application layer lives inside the slimdiff folder
        app = ("cli.py", "__main__.py")
        files = [f for f in files if f.name not in app and (folder / "app") not in f.parents]
    return files


@pytest.mark.parametrize("layer", list(RULES))
def test_layer_imports_only_downwards(layer):
    forbidden = RULES[layer][1]
    bad = []
    for path in _files(layer):
        for line, module in imported_modules(path.read_text()):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "\n".join(bad)


def test_the_check_sees_imports_inside_functions():
    code = "def f():\n    from slimdiff.compress import get_pass\n    return get_pass"
    assert (2, "slimdiff.compress") in imported_modules(code)
