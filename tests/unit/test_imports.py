"""Import hygiene: the CLI and the package root stay light (no torch at import)."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(out.stdout.split())


def test_cli_import_does_not_load_torch():
    mods = _modules_after("import slimdiff, slimdiff.cli, slimdiff.errors, slimdiff.recipe")
    heavy = {"torch", "diffusers", "transformers", "onnx", "onnxruntime"} & mods
    assert heavy == set(), heavy


def test_help_is_fast_and_torch_free():
    mods = _modules_after(
        "from click.testing import CliRunner\nfrom slimdiff.cli import main\n"
        "assert CliRunner().invoke(main, ['--help']).exit_code == 0"
    )
    assert "torch" not in mods
