"""Per-family knowledge lives in slimdiff/models (the ArchSpecs and their KindSpecs) only.

A syntax-level check over every source file outside slimdiff/models: no comparison with a
family name, no `family`/`kind` compared with a string, no table keyed by family or denoiser
kind names, no use of the retired `denoiser_kind`. Data lookups (`get_arch("sdxl")`, a
preset's declared family) are fine; branches are not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("slimdiff", "compress", "export", "runtime", "tools")
FAMILY_NAMES = {"sd15", "sdxl", "sd3", "flux"}
KIND_NAMES = FAMILY_NAMES | {"unet", "mmdit", "dit"}
ENCODER_KINDS = {"clip", "t5"}
FAMILY_IDENTS = {"family", "denoiser_kind", "family_name"}  # compared with any string: a branch
KIND_IDENTS = {"kind", "encoder_kind"}  # compared with a family/kind/encoder-kind name


def _files() -> list[Path]:
    files = []
    for top in SOURCES:
        for path in sorted((ROOT / top).rglob("*.py")):
            if (ROOT / "slimdiff" / "models") in path.parents:
                continue
            files.append(path)
    return files


def _strings(node: ast.AST) -> set[str]:
    """The string constants `node` is, or holds as a tuple/list/set literal."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {
            e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)
        }
    return set()


def _ident(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def violations(source: str, filename: str = "<string>") -> list[str]:
    """Per-family branches in `source`, as "file:line: what" strings."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            literals = set().union(*(_strings(s) for s in sides))
            if literals & FAMILY_NAMES:
                found.append(
                    f"{where}: compares with a family name {sorted(literals & FAMILY_NAMES)}"
                )
            elif literals and any(_ident(s) in FAMILY_IDENTS for s in sides):
                found.append(f"{where}: compares a family with {sorted(literals)}")
            elif literals & (KIND_NAMES | ENCODER_KINDS) and any(
                _ident(s) in KIND_IDENTS for s in sides
            ):
                found.append(f"{where}: compares a kind with {sorted(literals)}")
        elif isinstance(node, ast.Dict):
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
            if keys & KIND_NAMES and len(keys & KIND_NAMES) >= 2:
                found.append(f"{where}: a table keyed by family/kind names {sorted(keys)}")
        elif isinstance(node, ast.Attribute) and node.attr == "denoiser_kind":
            found.append(f"{where}: reads denoiser_kind (use the ArchSpec/KindSpec fields)")
        elif isinstance(node, ast.match_case):
            literals = _strings(getattr(node.pattern, "value", node.pattern))
            if literals & FAMILY_NAMES:
                found.append(f"{where}: a match case on a family name")
    return found


def test_no_per_family_branch_outside_slimdiff_models():
    found = []
    for path in _files():
        found += violations(path.read_text(), str(path.relative_to(ROOT)))
    assert not found, "declare it in the family's ArchSpec instead:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "code",
    [
        'if arch.family == "sdxl":\n    pass',
        'x = 1 if kind != "unet" else 2',
        'if spec.kind in ("t5", "clip"):\n    pass',
        'WRAPPERS = {"unet": A, "sd3": B, "flux": B}',
        "if arch.denoiser_kind:\n    pass",
        'if "flux" == name:\n    pass',
    ],
)
def test_the_check_catches_a_planted_branch(code):
    assert violations(code)


def test_the_check_lets_data_lookups_through():
    code = (
        'arch = get_arch("sdxl")\nfitting = presets_for(arch.family)\nif name in fitting:\n    pass'
    )
    assert violations(code) == []
