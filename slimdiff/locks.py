"""One slimdiff run per output: advisory file locks that die with their process.

- `exclusive`: a folder that runs add to (compress's, bench's): FOLDER/.slimdiff.lock.
- `exclusive_beside`: an output replaced whole (a bundle): `.NAME.lock` beside it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from slimdiff.errors import UserError

__all__ = ["LOCK_NAME", "exclusive", "exclusive_beside"]

LOCK_NAME = ".slimdiff.lock"


@contextlib.contextmanager
def exclusive(folder: str | Path) -> Iterator[None]:
    """Hold `folder` for this process while the block runs: a second slimdiff run on the
    same output folder stops at once with one line, instead of both writing into it.

    An advisory flock on FOLDER/.slimdiff.lock (the file holds the owner's pid, for the
    message); the kernel releases it when the process ends, however it ends, so a killed
    run never leaves the folder locked.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {folder} is a file; pass a folder path")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _lock_or_refuse(fd, f"{folder} is in use by")
        yield
    finally:
        # A run refused before it wrote anything leaves no folder behind.
        if created and os.listdir(folder) == [LOCK_NAME]:
            with contextlib.suppress(OSError):
                (folder / LOCK_NAME).unlink()
                folder.rmdir()
        os.close(fd)  # releases the lock


def _lock_or_refuse(fd: int, what: str) -> None:
    """Take an exclusive flock on `fd` and write this process's pid in it; UserError
    ("{what} another slimdiff run (pid N); ...") when another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
        raise UserError(
            f"{what} another slimdiff run ({owner}); wait for it to finish or pass another --out"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)


@contextlib.contextmanager
def exclusive_beside(path: str | Path) -> Iterator[None]:
    """`exclusive` for an output that is replaced whole (a bundle): the lock is a file
    beside it, `.NAME.lock`, removed when the block ends. A run that locks a file its
    holder has just removed sees another inode at the name and locks again."""
    target = Path(os.path.realpath(path))  # as fsutil spells it
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.parent / f".{target.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock_or_refuse(fd, f"{path} is being written by")
        except UserError:
            os.close(fd)
            raise
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)  # its holder removed it while this run opened it: lock the new one
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # still held: no other run can take it in between
        os.close(fd)
