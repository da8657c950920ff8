"""Errors that reach users: one line that names the problem and the fix.

The CLI turns any `UserError` into that line on stderr and exit code 2; everything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import re

__all__ = ["Terminated", "UserError", "disk_error", "first_line", "out_of_memory"]


class UserError(Exception):
    """Bad input from the user (recipe, model folder, bundle, argument): exit code 2.

    Example:
        raise UserError(f"{path}: no model_index.json; pass a diffusers pipeline folder")
    """

    exit_code = 2
    #: every problem found, one line each, where there were several (the message names
    #: the first); `slimdiff validate` prints them all
    details: tuple[str, ...] = ()


def first_line(err: BaseException, limit: int | None = 300) -> str:
    """The first line of a library's error message (at most `limit` characters; None: all
    of it), for a one-line UserError that quotes it; the exception's class name when it
    says nothing."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


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


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (`kill`, `timeout`, `docker stop`, a closed terminal), raised where
    the process is, so temp folders are removed as on Ctrl-C; exit code 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.exit_code = 128 + signum


_NO_SPACE = re.compile(r"no space left on device|disk quota exceeded", re.IGNORECASE)


def disk_error(err: BaseException) -> UserError | None:
    """One line for a file operation the system refused: out of space (exit 1: the input
    was fine), a read-only disk or permission denied (exit 2: a path this user may not
    use); None for anything else.
    Seen as OSError, or in the message of a library's own error (safetensors, onnx)."""
    # a library's error raised from an OSError (`raise ... from`), not a bug met while
    # handling one (an implicit __context__ keeps its traceback)
    errors = [err, *([err.__cause__] if isinstance(err.__cause__, OSError) else [])]
    for e in errors:
        code = getattr(e, "errno", None)
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        if code in (errno.ENOSPC, errno.EDQUOT) or _NO_SPACE.search(str(e)):
            error = UserError(
                f"no space left on the disk{where}; free some, or write elsewhere (--out, and "
                "TMPDIR for temporary files)"
            )
            error.exit_code = 1
            return error
        if code == errno.EROFS:
            return UserError(
                f"cannot write there{where}: {e.strerror}; choose a folder on a writable disk"
            )
        if isinstance(e, PermissionError):  # a read (a prompt file) or a write
            return UserError(
                f"permission denied{where}: {e.strerror or e}; give this user access to it, "
                "or choose another path"
            )
    return None
