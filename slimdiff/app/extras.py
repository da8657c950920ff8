"""What a command needs beyond the base install, checked before it imports any of it.

The base install (`pip install slimdiff`) is the torch-free runtime and the CLI, so that an
edge device needs no torch: `run`, `verify`, `validate` and `recipes` work with it. The
commands that load torch models need the `compress` extra, and those that write or run
ONNX need onnxruntime, from the `cpu` or the `gpu` extra (pyproject.toml says why they are
extras). Without them a command would end in an ImportError traceback from deep inside;
here it ends in one line naming the extra to install.
"""

from __future__ import annotations

import importlib.util

from slimdiff.errors import UserError

# The import names of the `compress` extra (pyproject.toml; tests/unit/test_extras.py keeps
# the two lists equal).
COMPRESS = (
    "torch",
    "diffusers",
    "accelerate",
    "transformers",
    "huggingface_hub",
    "safetensors",
    "onnx",
    "onnxscript",
    "matplotlib",
    "scipy",
    "peft",
)
# command -> whether it also needs onnxruntime (export writes ONNX and checks it with ORT;
# bench runs the bundles). inspect and convert load torch models only.
NEEDS_ONNXRUNTIME = {
    "compress": True,
    "export": True,
    "bench": True,
    "inspect": False,
    "convert": False,
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails, a broken __spec__
        return False


def require(command: str) -> None:
    """Refuse `command` in one line when the packages it imports are not installed."""
    missing = [m for m in COMPRESS if not _installed(m)]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        named = ", ".join(missing[:3]) + more
        raise UserError(
            f"slimdiff {command} needs the `compress` extra; {named} "
            f"{'is' if len(missing) == 1 else 'are'} not installed: pip install "
            f"'slimdiff[compress,cpu]' (install the torch build you want first; on an NVIDIA "
            f"GPU use [compress,gpu]). run, verify, validate and recipes need only the base "
            f"install"
        )
    if NEEDS_ONNXRUNTIME[command] and not _installed("onnxruntime"):
        raise UserError(
            f"slimdiff {command} needs onnxruntime, which is not installed: pip install "
            f"'slimdiff[cpu]', or 'slimdiff[gpu]' for onnxruntime-gpu (never both: they "
            f"install the same module)"
        )
