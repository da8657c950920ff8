"""The runtime imports nothing heavy: it must run where torch and diffusers are not installed.

Each check runs in a fresh interpreter with a `sys.meta_path` finder that raises
ImportError for the blocked packages, so an import hidden anywhere in the runtime (even in
a function-level import that runs at import time) fails the test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

BLOCKED = (
    "torch",
    "diffusers",
    "transformers",
    "onnx",
    "slimdiff.models",
    "slimdiff.compress",
    "slimdiff.export",
)
# The torch-free parts of slimdiff.models the runtime reads: the package itself resolves its
# names lazily, and kinds.py holds the per-family record bundles carry.
EXEMPT = ("slimdiff.models", "slimdiff.models.kinds")

# Top-level packages the runtime may load at import time, besides the standard library.
# onnxruntime is not among them: the backend imports it only when a backend is built.
# pydantic (the manifest and kind records are strict schemas) brings its own small needs.
ALLOWED = {"slimdiff", "numpy", "tokenizers", "PIL"}
ALLOWED |= {"pydantic", "pydantic_core", "annotated_types", "typing_extensions"}
ALLOWED |= {"typing_inspection"}

_PRELUDE = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys

    BLOCKED = {blocked!r}
    EXEMPT = {exempt!r}

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name in EXEMPT:
                return None
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"{{name}} is blocked for the runtime")
            return None

    sys.meta_path.insert(0, Block())
    STARTUP = set(sys.modules)  # interpreter and site hooks, not the runtime's doing
    """
).format(blocked=BLOCKED, exempt=EXEMPT)


def _run(code: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PRELUDE + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_runtime_and_all_submodules_import_with_heavy_packages_blocked():
    result = _run(
        """
        import slimdiff.runtime as rt
        names = [m.name for m in pkgutil.walk_packages(rt.__path__, "slimdiff.runtime.")]
        for name in names:
            importlib.import_module(name)
        for attr in rt.__all__:
            getattr(rt, attr)
        new = set(sys.modules) - STARTUP
        top = sorted({m.split(".")[0] for m in new} - set(sys.stdlib_module_names))
        print(json.dumps({"imported": names, "top": top}))
        """
    )
    assert {
        "slimdiff.runtime.pipeline",
        "slimdiff.runtime.conditioning",
        "slimdiff.runtime.tokenizer",
        "slimdiff.runtime.manifest",
        "slimdiff.runtime.backends.ort",
    } <= set(result["imported"])
    # sysconfig's platform data module (stdlib, but not in stdlib_module_names)
    extra = {t for t in result["top"] if not t.startswith("_sysconfigdata")} - ALLOWED
    assert not extra, f"runtime imports {sorted(extra)}"
    assert "onnxruntime" not in result["top"]


def test_blocker_really_blocks():
    # Guards the test above against a finder that silently lets imports through.
    result = _run(
        """
        try:
            import torch  # noqa: F401
            ok = False
        except ImportError:
            ok = True
        print(json.dumps({"blocked": ok}))
        """
    )
    assert result["blocked"] is True


def test_cpu_backend_loads_onnxruntime_only_when_built():
    result = _run(
        """
        from slimdiff.runtime import get_backend
        before = "onnxruntime" in sys.modules
        get_backend("ort-cpu")
        print(json.dumps({"before": before, "after": "onnxruntime" in sys.modules}))
        """
    )
    assert result == {"before": False, "after": True}
