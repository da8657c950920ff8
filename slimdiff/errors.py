"""Errors that reach users: one line that names the problem and the fix.

The CLI turns any `UserError` into that line on stderr and exit code 2; everything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import re

__all__ = ["UserError", "out_of_memory"]


class UserError(Exception):
    """Bad input from the user (recipe, model folder, bundle, argument): exit code 2.

    Example:
        raise UserError(f"{path}: no model_index.json; pass a diffusers pipeline folder")
    """

    exit_code = 2
    #: every problem found, one line each, where there were several (the message names
    #: the first); `slimdiff validate` prints them all
    details: tuple[str, ...] = ()


# What onnxruntime (CPU arena and CUDA), torch (CPU allocator and CUDA) and the C++
# runtime say when an allocation fails; their exception classes differ and are not all
# importable here (onnxruntime's are unexported), so the message is what is matched.
_OUT_OF_MEMORY = re.compile(
    r"out of memory|failed to allocate memory|bad_alloc|can't allocate memory|"
    r"cannot allocate memory|ALLOC_FAILED",
    re.IGNORECASE,
)
_BYTES = re.compile(r"(?:buffer of size|allocate) (\d{6,})")
_FIXES = {
    "run": "run a smaller --size or fewer --images, or add --low-memory",
    "bench": "bench a smaller size (bench.size) or fewer images",
    "export": "export with --weights stream, or on a machine with more memory",
    "compress": "lower the recipe's batch sizes or calibration size, or use a machine with "
    "more memory (or a GPU: --device)",
}


def out_of_memory(err: BaseException, command: str | None) -> UserError | None:
    """One line for an allocation that failed (MemoryError, torch's OutOfMemoryError,
    onnxruntime's arena errors), naming the fix for `command`; None for any other error.
    Exit code 1: the input was valid, this machine lacks the memory for it."""
    text = str(err)
    if not (isinstance(err, MemoryError) or _OUT_OF_MEMORY.search(text)):
        return None
    size = _BYTES.search(text)
    what = type(err).__name__
    if size:
        n = int(size.group(1))
        what = f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
        what += " in one block"
    fix = _FIXES.get(command or "", "use smaller inputs or a machine with more memory")
    error = UserError(f"out of memory ({what}); {fix}")
    error.exit_code = 1
    return error
