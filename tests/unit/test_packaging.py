"""The three stage folders install under `slimdiff`; every package folder is listed."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[2]


def _config():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_listed_in_pyproject():
    cfg = _config()
    listed = set(cfg["packages"])
    dirs = cfg["package-dir"]
    found = set()
    for pkg, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([pkg, *rel.parts]) if rel.parts else pkg)
    assert found - listed == set(), f"add these to [tool.setuptools] packages: {found - listed}"
    # Data-only folders (toy:shapes' weights) are listed too, each with its package data.
    data = {p for p in listed - found if p in cfg["package-data"]}
    assert listed - found - data == set(), f"listed but missing an __init__.py: {listed - found}"
    for pkg in data:
        folder = ROOT / "slimdiff" / Path(*pkg.split(".")[1:])
        assert folder.is_dir() and not list(folder.glob("*.py")), pkg


def test_stage_folders_import_under_one_root():
    import slimdiff.compress
    import slimdiff.export
    import slimdiff.runtime

    for mod, folder in (
        (slimdiff.compress, "compress"),
        (slimdiff.export, "export"),
        (slimdiff.runtime, "runtime"),
    ):
        assert Path(mod.__file__).parent == ROOT / folder


def test_builtin_recipes_ship_as_package_data():
    from slimdiff.recipe import builtin_recipes

    names = builtin_recipes()
    assert "tiny-sdxl-fp32" in names
    assert all(p.suffix == ".yaml" for p in names.values())
    assert "*.yaml" in _config()["package-data"]["slimdiff.recipes"]


def test_python_m_slimdiff_is_the_cli():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "slimdiff", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("slimdiff, version ")
