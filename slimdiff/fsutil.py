"""Atomic writes: a killed run never leaves a file or folder that looks complete.

Every write goes to a temp name in the same folder, is fsynced, then renamed (DESIGN.md):

- `atomic_file`, `atomic_write_bytes`, `atomic_write_text`: one file.
- `atomic_dir`: one folder, built under a temp name and swapped in whole.
- `remove_stale_partials`: clears what killed runs left beside a path.
- `check_replaceable`: refuses, before heavy work starts, to replace a folder slimdiff did
  not write (a `.slimdiff` marker file says which kind of output a folder is).

Temp names carry their owner, so a later run can tell debris from work in progress:

    .NAME.<pid>-<start>.<hex>.partial   a folder atomic_dir is building
    .NAME.<pid>-<start>.<hex>.tmp       a file atomic_file is writing
    .NAME.old-<pid>-<start>             the previous NAME, moved aside (fallback swap only)

`<start>` is the owner's start time in clock ticks since boot (/proc/PID/stat field 22;
left out, with its dash, where there is no /proc). An owner is dead when `os.kill(pid, 0)`
finds no such process, or when that PID now belongs to a process with another start time:
PIDs are reused, and in a container every run of a command gets the same small PID, so a
PID alone would keep a killed run's 10 GB folder forever. Start ticks count from boot, so
no wall clock (which NTP can step) is compared; comparing the folder's mtime instead would
also fail because a long export does not touch its top folder for minutes. Entries named
with this process's own PID are live only while this process has them open. Limits: runs
in other PID namespaces or on other hosts writing the same folder (bind mounts, NFS) look
dead; writing one output from two of them at once is not supported. On Windows
`os.kill(pid, 0)` would terminate the process, so other PIDs are always taken as live.
Temp names from slimdiff before owners were recorded (`.NAME.<8 chars>.partial|.tmp`)
are removed once nothing in them has changed for an hour.

A symlink at the path is followed, as `cp` and a shell `>` do: the file or folder it points
to is replaced and the link kept (replacing the link would silently cut it from its target).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import re
import secrets
import shutil
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from slimdiff import __version__
from slimdiff.errors import UserError

__all__ = [
    "MARKER_NAME",
    "atomic_dir",
    "atomic_file",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_replaceable",
    "remove_stale_partials",
]

log = logging.getLogger(__name__)

MARKER_NAME = ".slimdiff"  # {"kind": ..., "version": ...} in every folder atomic_dir marks
_LEGACY_IDLE_S = 3600.0  # ownerless temp names (older slimdiff) count as debris after this
_OWNED = re.compile(r"(?P<owner>[1-9]\d*(?:-\d+)?)\.[0-9a-f]{8}\.(?P<kind>partial|tmp)")
_LEGACY = re.compile(r"[a-z0-9_]{8}\.(?P<kind>partial|tmp)")  # tempfile's mkdtemp/mkstemp
_OLD = re.compile(r"old-(?P<owner>[1-9]\d*(?:-\d+)?)")
_LIVE: set[Path] = set()  # temp entries this process has open (its own PID is always alive)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to the file `path` atomically (see `atomic_file`).

    Example:
        atomic_write_bytes("out/image.png", png_bytes)
    """
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to the file `path` atomically (see `atomic_file`)."""
    atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; it takes `path`'s name only if the block succeeds.

    Write the temp by name (for writers that take a filename). On success it is fsynced,
    renamed over `path`, and the folder fsynced; on any exception it is deleted and `path`
    is untouched. A crash leaves `path` as it was or complete, plus at most a temp file
    that `remove_stale_partials(path)` clears (the next atomic_file of `path` calls it).
    The file gets the permissions a plain
    `open(path, "w")` gives: an existing file's mode, else 0o666 & ~umask. Anything at
    `path` but a regular file (a folder, a device such as /dev/full, a FIFO, a socket) is
    refused with a `UserError`, before anything is written.

    Example:
        with atomic_file("ckpt/state.safetensors") as tmp:
            save_file(tensors, str(tmp))
    """
    target = _resolve(path)
    _file_mode(path, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)  # a killed writer's temp file of `path`
    tmp = _make_temp(target, "tmp")
    try:
        yield tmp
        mode = _file_mode(path, target)
        if mode is not None:
            os.chmod(tmp, mode)
        _fsync(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        _LIVE.discard(tmp)
    _fsync(target.parent, directory=True)


@contextlib.contextmanager
def atomic_dir(
    path: str | Path,
    overwrite: bool = True,
    *,
    marker: str | None = None,
    legacy: tuple[str, ...] = (),
) -> Iterator[Path]:
    """Build a folder under a temp name beside `path`; it takes `path`'s name only on success.

    Args:
        path: the folder to create or replace.
        overwrite: if False, an existing `path` raises FileExistsError (before the block).
        marker: the kind of output ("bundle", "artifact"). The folder gets a `.slimdiff`
            marker saying so, and an existing `path` is replaced only if it is empty or
            holds a marker of the same kind (see `check_replaceable`, which runs before the
            block and again just before the swap). None: any existing folder is replaced.
        legacy: with `marker`, file names that mark a folder from a slimdiff that wrote no
            marker (("manifest.json",) for bundles, ("slimdiff.json",) for artifacts).

    On entry, debris of killed runs for `path` is cleared (`remove_stale_partials`). The
    yielded folder is `.NAME.<owner>.<hex>.partial`, mode 0o777 & ~umask. When the block
    succeeds, every file and folder in it is fsynced, then it is swapped in:

    - Linux: `renameat2(RENAME_EXCHANGE)` swaps the new folder and the old one in one
      step, the parent is fsynced, and the old one (now under the temp name) is deleted.
    - Elsewhere, or where the filesystem refuses (EINVAL, ENOSYS, EOPNOTSUPP): NAME is
      renamed to `.NAME.old-<owner>`, the temp to NAME, the parent fsynced, the old deleted.
      If the second rename fails, the old one is renamed back before the error propagates.

    What a crash (kill -9, power loss) leaves, and why it is safe:

    - during the block, or before the swap: NAME untouched (the old folder or nothing);
      the temp folder is debris, removed by the next run since its owner is dead.
    - exchange: one atomic step; NAME is the old folder or the new one, never missing.
    - after the exchange: NAME is the new folder, complete (fsynced before the swap); the
      old one, under the temp name, is debris removed by the next run.
    - fallback, between the renames: no NAME; the old folder is whole at `.NAME.old-<owner>`
      and the next run renames it back to NAME (the new temp is removed: a temp name is
      never trusted to be complete). After the second rename: NAME is the new folder and
      the next run deletes `.old-<owner>`.

    After power loss NAME never holds a mix or truncated files, since all data and entries
    are durable before the rename that publishes them. An exception in the block deletes
    the temp folder and leaves NAME as it was.

    Example:
        with atomic_dir("out/bundle", marker="bundle", legacy=("manifest.json",)) as tmp:
            (tmp / "manifest.json").write_text("{}")
    """
    target = _resolve(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    _check_dir(path, target, overwrite, marker, legacy)
    tmp = _make_temp(target, "partial")
    try:
        yield tmp
        if marker is not None:
            marker_text = json.dumps({"kind": marker, "version": __version__})
            (tmp / MARKER_NAME).write_text(marker_text + "\n")
        _fsync_tree(tmp)
        _check_dir(path, target, overwrite, marker, legacy)
        _swap_in(tmp, target)
    finally:
        # After an exchange the temp name holds the old folder; otherwise the unfinished one.
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        _LIVE.discard(tmp)


def check_replaceable(path: str | Path, marker: str, *, legacy: tuple[str, ...] = ()) -> None:
    """Raise UserError unless `atomic_dir(path, marker=marker)` may replace what is at `path`.

    Replaceable: nothing there, an empty folder, a folder whose `.slimdiff` marker has kind
    `marker`, or a folder without a marker that holds one of the `legacy` files (outputs of
    a slimdiff that wrote no marker). Call it before heavy work starts.

    Example:
        check_replaceable(out, "bundle", legacy=("manifest.json",))
    """
    target = _resolve(path)
    _check_dir(path, target, True, marker, legacy)


def remove_stale_partials(path: str | Path) -> list[Path]:
    """Clear what killed runs left beside `path`; return the paths removed.

    Removes temp folders and files for NAME whose owner is dead (see the module docstring)
    and a `.NAME.old-<owner>` whose NAME exists. When NAME is missing, a dead owner's
    `.NAME.old-<owner>` is renamed back to NAME instead (a run killed mid-swap). Logs one
    warning per entry, with its size. `atomic_dir` calls it; callers may call it earlier,
    before heavy work, to tell the user what was reclaimed.

    Example:
        reclaimed = remove_stale_partials(out)  # before loading the model
    """
    target = _resolve(path)
    prefix = f".{target.name}."
    try:
        names = sorted(e.name for e in os.scandir(target.parent) if e.name.startswith(prefix))
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed: list[Path] = []
    olds: list[Path] = []
    for name in names:
        entry = target.parent / name
        rest = name[len(prefix) :]
        if m := _OWNED.fullmatch(rest):
            stale = not _owner_alive(m["owner"], entry)
        elif m := _LEGACY.fullmatch(rest):
            stale = time.time() - _newest_mtime(entry) > _LEGACY_IDLE_S
        else:
            if (old := _OLD.fullmatch(rest)) and not _owner_alive(old["owner"], entry):
                olds.append(entry)
            continue
        what = "partial" if m["kind"] == "partial" else "temp file"
        if stale and _remove(entry, f"stale {what}"):
            removed.append(entry)
    # Two at once only from concurrent runs: the one moved aside last is the newest.
    for old in sorted(olds, key=_ctime, reverse=True):
        if not os.path.lexists(target):
            with contextlib.suppress(FileNotFoundError):  # another run restored it first
                os.replace(old, target)
                _fsync(target.parent, directory=True)
                log.warning("restored %s from %s left by a run killed mid-replace", target, old)
            continue
        if _remove(old, "previous version"):
            removed.append(old)
    return removed


def _resolve(path: str | Path) -> Path:
    # realpath: follow a symlink at NAME (see the module docstring) and spell every path
    # one way, so this process recognises its own temp entries in _LIVE.
    return Path(os.path.realpath(path))


def _describe(path: str | Path, target: Path) -> str:
    return f"{path} (-> {target})" if os.path.islink(path) else str(path)


def _file_mode(path: str | Path, target: Path) -> int | None:
    """Permission bits of the regular file at `target`; None if nothing is there."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise UserError(
            f"{_describe(path, target)}: cannot write there ({err.strerror}); choose a file path"
        ) from None
    if stat.S_ISREG(st.st_mode):
        return stat.S_IMODE(st.st_mode) & 0o777  # not setuid/setgid/sticky
    kind = (
        "a folder"
        if stat.S_ISDIR(st.st_mode)
        else "a device"
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
        else "a FIFO"
        if stat.S_ISFIFO(st.st_mode)
        else "not a regular file"
    )
    raise UserError(
        f"{_describe(path, target)} is {kind}; writing would replace it, choose a file path"
    )


def _check_dir(
    path: str | Path, target: Path, overwrite: bool, marker: str | None, legacy: tuple[str, ...]
) -> None:
    if not os.path.lexists(target):
        return
    where = _describe(path, target)
    if not target.is_dir():
        raise UserError(f"{where} exists and is not a folder; choose another --out")
    if os.path.ismount(target):
        raise UserError(
            f"{where} is a mount point, which cannot be replaced atomically; "
            "choose a folder inside it as --out"
        )
    if not overwrite:
        raise FileExistsError(target)
    if marker is None or not any(target.iterdir()):
        return
    marker_path = target / MARKER_NAME
    if not marker_path.exists():
        if any(_slimdiff_wrote(target / name) for name in legacy):
            return
        raise UserError(
            f"{where} exists and was not written by slimdiff (no {MARKER_NAME} marker); "
            "move it away or choose another --out"
        )
    try:
        kind = json.loads(marker_path.read_text())["kind"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(
            f"{where}: unreadable {MARKER_NAME} marker ({err}); "
            "move it away or choose another --out"
        ) from None
    if kind != marker:
        raise UserError(
            f"{where} holds a slimdiff {kind}, not a {marker}; move it away or choose another --out"
        )


def _slimdiff_wrote(file: Path) -> bool:
    """Whether `file` is the evidence of an older slimdiff's output it names: a bundle's
    manifest.json says `slimdiff_version` (a web app's manifest.json is no evidence); any
    other legacy name (slimdiff.json) is slimdiff's own."""
    if not file.is_file():
        return False
    if file.name != "manifest.json":
        return True
    try:
        data = json.loads(file.read_bytes()[: 1 << 24])
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "slimdiff_version" in data and "files" in data


def _owner() -> str:
    pid = os.getpid()
    start = _start_ticks(pid)
    return f"{pid}" if start is None else f"{pid}-{start}"


def _start_ticks(pid: int) -> int | None:
    """Start time of process `pid` in clock ticks since boot (Linux); None if unknown."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
        # The command name (field 2) may hold spaces and parens: split after the last ")".
        return int(data[data.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _owner_alive(owner: str, entry: Path) -> bool:
    pid_text, _, start_text = owner.partition("-")
    pid = int(pid_text)
    if pid == os.getpid():
        return entry in _LIVE
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    except (OSError, OverflowError):
        return True
    start = _start_ticks(pid)
    return not (start_text and start is not None and str(start) != start_text)


def _make_temp(target: Path, kind: str) -> Path:
    owner = _owner()
    while True:
        tmp = target.parent / f".{target.name}.{owner}.{secrets.token_hex(4)}.{kind}"
        _LIVE.add(tmp)
        try:
            # Modes 0o777/0o666 so the umask applies, as for a plain mkdir/open.
            if kind == "partial":
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            _LIVE.discard(tmp)
        except BaseException:
            _LIVE.discard(tmp)
            raise


def _swap_in(tmp: Path, target: Path) -> None:
    if not os.path.lexists(target):
        os.replace(tmp, target)
        _fsync(target.parent, directory=True)
        return
    if _exchange(tmp, target):
        _fsync(target.parent, directory=True)
        return  # the old folder is now at `tmp`; atomic_dir deletes it
    old = target.with_name(f".{target.name}.old-{_owner()}")
    _LIVE.add(old)
    try:
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(old, target)
            raise
        _fsync(target.parent, directory=True)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        _LIVE.discard(old)


@functools.cache
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no libc symbol (glibc < 2.28, some musl)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap `a` and `b` in one atomic step; False where the OS or filesystem cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    import ctypes

    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _fsync(path: Path, directory: bool = False) -> None:
    if directory and os.name == "nt":
        return  # Windows cannot open a folder to fsync it
    flags = os.O_RDWR if os.name == "nt" else os.O_RDONLY
    fd = os.open(path, flags | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError as err:
        # Some filesystems (FUSE, network) do not fsync folders; their renames stand as is.
        if not directory or err.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every regular file and folder under `root`, files before their folder."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            p = Path(folder, name)
            if stat.S_ISREG(p.lstat().st_mode):
                _fsync(p)
        _fsync(Path(folder), directory=True)


def _ctime(path: Path) -> float:
    try:
        return path.lstat().st_ctime
    except FileNotFoundError:
        return 0.0


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for folder, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                with contextlib.suppress(FileNotFoundError):
                    newest = max(newest, os.lstat(os.path.join(folder, name)).st_mtime)
    return newest


def _size(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def _human(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def _remove(entry: Path, what: str) -> bool:
    """Delete `entry` (folder or file), log it; False if it could not be (or is gone)."""
    try:
        size = _size(entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    except FileNotFoundError:
        return False  # another run removed it first
    except OSError as err:
        log.warning("could not remove %s %s: %s", what, entry, err)
        return False
    log.warning("removed %s %s (%s) left by a killed run", what, entry.name, _human(size))
    return True
