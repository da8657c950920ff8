"""The base install runs bundles; the `compress` and `cpu`/`gpu` extras add the rest.

Every third-party package the code imports is declared in pyproject.toml, in the group of
the layer that imports it, and a command whose extra is missing ends in one line naming it.
"Not installed" is simulated as test_runtime_vs_diffusers does it for onnxruntime: the path
finder is told to find nothing for those names, in a fresh interpreter.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from slimdiff.app import extras

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[2]
# distribution -> the module it installs, where the two names differ
MODULE = {"pillow": "PIL", "pyyaml": "yaml", "onnxruntime-gpu": "onnxruntime"}
MODULE["cuda-python"] = "cuda"
# imported but not declared, each for its reason
UNDECLARED = {
    "typing_extensions": "pydantic's own dependency (runtime/manifest.py's TypedDict)",
    "httpx": "huggingface_hub's transport; slimdiff/models/hub.py catches its errors if present",
    "onnxruntime_ep_nv_tensorrt_rtx": "the TensorRT-RTX plugin EP, installed by hand (README)",
}


def _modules(requirements: list[str]) -> set[str]:
    names = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}
    return {MODULE.get(n, n.replace("-", "_")) for n in names}


def _groups() -> dict[str, set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"base": _modules(project["dependencies"])}
    groups |= {k: _modules(v) for k, v in project["optional-dependencies"].items()}
    return groups


def _imports(folder: str) -> dict[str, set[str]]:
    """Third-party top-level module -> the files under `folder` that import it (any depth)."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "slimdiff" and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_the_compress_extra_is_what_the_cli_checks():
    assert set(extras.COMPRESS) == _groups()["compress"]


def test_the_base_install_has_no_torch_and_no_onnxruntime():
    groups = _groups()
    assert not groups["base"] & {"torch", "diffusers", "transformers", "onnx", "onnxruntime"}
    assert groups["cpu"] == groups["gpu"] == {"onnxruntime"}


def test_every_import_is_declared():
    groups = _groups()
    declared = set().union(*groups.values()) | set(UNDECLARED)
    for folder in ("slimdiff", "compress", "export", "runtime"):
        missing = {m: sorted(f) for m, f in _imports(folder).items() if m not in declared}
        assert not missing, f"imported but not in pyproject.toml: {missing}"


def test_the_runtime_imports_only_the_base_install_and_its_backends():
    groups = _groups()
    # backend -> what only it may import (lazily; tests/unit/test_runtime_imports.py checks
    # that importing the runtime loads none of them)
    backends = {
        "torch": {"runtime/backends/aoti.py"},
        "tensorrt": {"runtime/trt_engine.py"},
        "cuda": {"runtime/trt_engine.py"},
        "onnxruntime_ep_nv_tensorrt_rtx": {"runtime/backends/trt_rtx.py"},
    }
    allowed = groups["base"] | groups["cpu"] | {"typing_extensions"}
    for module, files in _imports("runtime").items():
        if module not in allowed:
            assert files <= backends.get(module, set()), f"runtime imports {module}: {files}"


CLI_WITHOUT = textwrap.dedent(
    """
    import importlib.machinery, sys

    HIDDEN = set(sys.argv[1].split(","))
    find = importlib.machinery.PathFinder.find_spec

    def hidden(name, path=None, target=None):
        return None if name.split(".")[0] in HIDDEN else find(name, path, target)

    importlib.machinery.PathFinder.find_spec = hidden
    from slimdiff.cli import main

    main(sys.argv[2:], prog_name="slimdiff")
    """
)


def cli_without(hidden: tuple[str, ...], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CLI_WITHOUT, ",".join(hidden), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_commands_without_the_compress_extra_say_what_to_install(tmp_path):
    for command in (
        ["export", "tiny:sd15", "--out", "b"],
        ["compress", "tiny-sdxl-fp32", "--out", "c"],
        ["bench", "tiny-sdxl-fp32", "--out", "d"],
        ["inspect", "tiny:sd15"],
    ):
        out = cli_without(extras.COMPRESS, *command, cwd=tmp_path)
        assert out.returncode == 2, (command, out.stderr)
        assert "Traceback" not in out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert f"slimdiff {command[0]} needs the `compress` extra" in lines[0]
        assert "torch, diffusers" in lines[0]
        assert "pip install 'slimdiff[compress,cpu]'" in lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing started


def test_commands_without_onnxruntime_say_what_to_install(tmp_path):
    out = cli_without(("onnxruntime",), "export", "tiny:sd15", "--out", "b", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: slimdiff export needs onnxruntime, which is not installed: pip install "
        "'slimdiff[cpu]', or 'slimdiff[gpu]' for onnxruntime-gpu (never both: they install "
        "the same module)"
    ]
    assert not (tmp_path / "b").exists()


def test_the_base_install_commands_run_without_the_extras(tmp_path):
    hidden = (*extras.COMPRESS, "onnxruntime")
    assert cli_without(hidden, "export", "--help", cwd=tmp_path).returncode == 0
    out = cli_without(hidden, "recipes", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "sdxl-ssd-1b" in out.stdout
    recipes = ("sdxl-ssd-1b", "sdxl-quest-w8a8", "flux-ecodiff-20")
    out = cli_without(hidden, "validate", *recipes, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("ok: ") == 3


def test_inspect_and_convert_need_no_onnxruntime(monkeypatch):
    monkeypatch.setattr(extras, "_installed", lambda module: module != "onnxruntime")
    extras.require("inspect")
    extras.require("convert")
    with pytest.raises(extras.UserError, match="slimdiff bench needs onnxruntime"):
        extras.require("bench")


def test_ort_cuda_names_the_fix_when_both_onnxruntimes_are_installed(monkeypatch):
    import importlib.metadata

    from slimdiff.runtime.backends import ort

    installed = {"onnxruntime": "1.27.0", "onnxruntime-gpu": "1.27.0"}

    def version(name):
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in (
        ort._both_installed()
    )
    del installed["onnxruntime"]
    assert ort._both_installed() == ""
