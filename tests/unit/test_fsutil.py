"""Atomic writes: crashes at every step leave the old output or the new one, and the next
run clears the debris; only regular files and slimdiff's own folders are ever replaced."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from slimdiff import fsutil
from slimdiff.errors import UserError
from slimdiff.fsutil import (
    MARKER_NAME,
    atomic_dir,
    atomic_file,
    atomic_write_bytes,
    atomic_write_text,
    check_replaceable,
    remove_stale_partials,
)

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux")

# A child that replaces `target` (holding version.txt == "old") and kills itself with
# SIGKILL at `point`: no except/finally runs, as in kill -9 or a power cut.
_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from slimdiff import fsutil

    target, point = Path(sys.argv[1]), sys.argv[2]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    real_exchange, real_replace, real_rmtree = fsutil._exchange, os.replace, fsutil.shutil.rmtree

    def exchange(a, b):
        if point.startswith("fallback"):
            return False
        swapped = real_exchange(a, b)
        if point == "after-exchange":
            die()
        return swapped

    def replace(src, dst):
        real_replace(src, dst)
        if point == "fallback-between-renames" and Path(src) == target:
            die()

    def rmtree(p, *args, **kwargs):
        if point == "fallback-before-delete" and ".old-" in str(p):
            die()
        real_rmtree(p, *args, **kwargs)

    fsutil._exchange, os.replace, fsutil.shutil.rmtree = exchange, replace, rmtree
    with fsutil.atomic_dir(target) as tmp:
        (tmp / "version.txt").write_text("new")
        if point == "in-body":
            die()
    """
)


def _crash(target: Path, point: str) -> None:
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(target), point], cwd=target.parent, timeout=60
    )
    assert child.returncode == -signal.SIGKILL


def _old_folder(tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "version.txt").write_text("old")
    return target


def _dead_owner() -> str:
    """The owner part of temp names made by a process that has exited."""
    code = "from slimdiff.fsutil import _owner; print(_owner())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return child.stdout.strip()


def _debris(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))


# --- crashes: the old folder survives, the next run restores or cleans -------------------


def test_kill_inside_the_block_keeps_the_old_folder_and_the_next_run_removes_the_partial(
    tmp_path, caplog
):
    target = _old_folder(tmp_path)
    _crash(target, "in-body")
    assert (target / "version.txt").read_text() == "old"
    [partial] = _debris(tmp_path)
    assert partial.startswith(".bundle.") and partial.endswith(".partial")
    caplog.set_level(logging.WARNING, logger="slimdiff.fsutil")
    with atomic_dir(target) as tmp:
        (tmp / "version.txt").write_text("newer")
    assert f"removed stale partial {partial} (3 B) left by a killed run" in caplog.messages
    assert (target / "version.txt").read_text() == "newer"
    assert _debris(tmp_path) == []


@linux_only
def test_kill_after_the_exchange_leaves_the_new_folder_and_the_old_one_as_debris(tmp_path):
    target = _old_folder(tmp_path)
    _crash(target, "after-exchange")
    assert (target / "version.txt").read_text() == "new"
    [leftover] = _debris(tmp_path)  # the old folder, under the temp name
    assert (tmp_path / leftover / "version.txt").read_text() == "old"
    assert remove_stale_partials(target) == [tmp_path / leftover]
    assert _debris(tmp_path) == []


def test_fallback_killed_between_renames_is_restored_by_the_next_run(tmp_path, caplog):
    target = _old_folder(tmp_path)
    _crash(target, "fallback-between-renames")
    assert not target.exists()  # the window the exchange closes
    names = _debris(tmp_path)
    assert len(names) == 2 and any(".old-" in n for n in names)
    with caplog.at_level(logging.WARNING, logger="slimdiff.fsutil"):
        removed = remove_stale_partials(target)
    assert (target / "version.txt").read_text() == "old"
    assert [p.suffix for p in removed] == [".partial"]  # a temp is never taken as complete
    assert any(m.startswith("restored") for m in caplog.messages)
    assert _debris(tmp_path) == []


def test_fallback_killed_before_deleting_the_old_folder(tmp_path):
    target = _old_folder(tmp_path)
    _crash(target, "fallback-before-delete")
    assert (target / "version.txt").read_text() == "new"
    [old] = _debris(tmp_path)
    assert ".old-" in old
    with atomic_dir(target) as tmp:
        (tmp / "version.txt").write_text("newer")
    assert _debris(tmp_path) == []


def test_failed_second_rename_in_the_fallback_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = _old_folder(tmp_path)
    monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)
    real = os.replace

    def replace(src, dst):
        if Path(src).suffix == ".partial":  # the new folder taking NAME
            raise OSError(errno.EIO, "simulated I/O error")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated"), atomic_dir(target) as tmp:
        (tmp / "version.txt").write_text("new")
    assert (target / "version.txt").read_text() == "old"
    assert _debris(tmp_path) == []


def test_failed_exchange_keeps_the_old_folder(tmp_path, monkeypatch):
    target = _old_folder(tmp_path)

    def exchange(a, b):
        raise OSError(errno.EIO, "simulated I/O error")

    monkeypatch.setattr(fsutil, "_exchange", exchange)
    with pytest.raises(OSError, match="simulated"), atomic_dir(target) as tmp:
        (tmp / "version.txt").write_text("new")
    assert (target / "version.txt").read_text() == "old"
    assert _debris(tmp_path) == []


def test_exception_in_the_block_keeps_the_old_folder(tmp_path):
    target = _old_folder(tmp_path)
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "version.txt").write_text("new")
        raise RuntimeError("boom")
    assert (target / "version.txt").read_text() == "old"
    assert _debris(tmp_path) == []


# --- the swap itself --------------------------------------------------------------------


@linux_only
def test_replace_uses_the_exchange_on_linux(tmp_path, monkeypatch):
    target = _old_folder(tmp_path)
    calls = []
    real = fsutil._exchange
    monkeypatch.setattr(fsutil, "_exchange", lambda a, b: calls.append(b) or real(a, b))
    monkeypatch.setattr(os, "replace", lambda *a: pytest.fail(f"renamed instead: {a}"))
    with atomic_dir(target) as tmp:
        (tmp / "version.txt").write_text("new")
    assert calls == [target] and real is not None
    assert (target / "version.txt").read_text() == "new"
    assert _debris(tmp_path) == []


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOSYS])
@linux_only
def test_filesystems_without_exchange_fall_back_to_two_renames(tmp_path, monkeypatch, code):
    import ctypes

    def renameat2(*args):  # what libc returns on a filesystem/kernel without the flag
        ctypes.set_errno(code)
        return -1

    monkeypatch.setattr(fsutil, "_renameat2", lambda: renameat2)
    renames = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda s, d: renames.append(Path(d).name) or real(s, d))
    target = _old_folder(tmp_path)
    with atomic_dir(target) as tmp:
        (tmp / "version.txt").write_text("new")
    assert renames[1] == "bundle" and renames[0].startswith(".bundle.old-")
    assert (target / "version.txt").read_text() == "new"
    assert _debris(tmp_path) == []


@linux_only
def test_every_file_and_folder_is_fsynced_before_the_swap_and_the_parent_after(
    tmp_path, monkeypatch
):
    target = _old_folder(tmp_path)
    events = []
    real_fsync, real_exchange = os.fsync, fsutil._exchange

    def fsync(fd):
        events.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def exchange(a, b):
        events.append("exchange")
        return real_exchange(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(fsutil, "_exchange", exchange)
    with atomic_dir(target) as tmp:
        (tmp / "sub").mkdir()
        for rel in ("a.bin", "sub/b.bin"):
            (tmp / rel).write_bytes(b"x")
    before = events[: events.index("exchange")]
    for rel in ("a.bin", "sub/b.bin", "sub", ""):
        assert str(tmp / rel).rstrip("/") in before, rel
    assert events[events.index("exchange") + 1 :] == [str(tmp_path)]


def test_a_new_folder_is_created_with_a_plain_mkdir_mode(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            assert stat.S_IMODE(tmp.stat().st_mode) == 0o755
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert _debris(tmp_path) == []


def test_overwrite_false_refuses_before_the_block_runs(tmp_path):
    target = _old_folder(tmp_path)
    with pytest.raises(FileExistsError), atomic_dir(target, overwrite=False):
        pytest.fail("the block ran")
    assert _debris(tmp_path) == []


def test_a_file_or_mount_point_at_the_folder_path_is_refused(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(UserError, match="is not a folder"), atomic_dir(tmp_path / "file"):
        pytest.fail("the block ran")
    assert (tmp_path / "file").read_text() == "mine"
    mount = _old_folder(tmp_path)
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == mount)
    with pytest.raises(UserError, match="mount point"), atomic_dir(mount):
        pytest.fail("the block ran")


def test_a_symlinked_folder_is_replaced_through_the_link(tmp_path):
    real = _old_folder(tmp_path)
    (tmp_path / "latest").symlink_to(real)
    with atomic_dir(tmp_path / "latest") as tmp:
        (tmp / "version.txt").write_text("new")
    assert (tmp_path / "latest").is_symlink()
    assert (real / "version.txt").read_text() == "new"


# --- stale partials ---------------------------------------------------------------------


def test_partials_of_dead_owners_are_removed_and_of_live_ones_kept(tmp_path):
    target = tmp_path / "bundle"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live_owner = f"{live.pid}-{fsutil._start_ticks(live.pid)}"
        names = {
            "dead": f".bundle.{_dead_owner()}.0123abcd.partial",
            "dead_no_start": f".bundle.{_dead_owner().split('-')[0]}.0123abcd.partial",
            "live": f".bundle.{live_owner}.0123abcd.partial",
            "live_no_start": f".bundle.{live.pid}.4567abcd.partial",
            # the live PID with another start time: the PID was reused after a kill
            "reused": f".bundle.{live.pid}-1.89abcdef.partial",
            "other_name": f".bundle2.{_dead_owner()}.0123abcd.partial",
            "dead_tmp": f".bundle.{_dead_owner()}.0123abcd.tmp",
        }
        for key, name in names.items():
            if key == "dead_tmp":
                (tmp_path / name).write_bytes(b"x" * 10)
            else:
                (tmp_path / name).mkdir()
                (tmp_path / name / "w.bin").write_bytes(b"x" * 2500)
        removed = {p.name for p in remove_stale_partials(target)}
    finally:
        live.kill()
        live.wait()
    kept = {"live", "live_no_start", "other_name"}
    assert removed == {names[k] for k in names if k not in kept}
    assert set(_debris(tmp_path)) == {names[k] for k in kept}


def test_partials_of_this_process_are_kept_only_while_open(tmp_path):
    target = tmp_path / "bundle"
    with atomic_dir(target) as tmp:
        assert remove_stale_partials(target) == []
        assert tmp.is_dir()
        # A container rerun gets the same PID as the run that was killed: not open here.
        leftover = tmp_path / f".bundle.{fsutil._owner()}.0123abcd.partial"
        leftover.mkdir()
        assert remove_stale_partials(target) == [leftover]
    assert _debris(tmp_path) == []


def test_ownerless_partials_of_older_versions_are_removed_once_idle(tmp_path):
    target = tmp_path / "bundle"
    fresh, idle = tmp_path / ".bundle.k2j_9x0a.partial", tmp_path / ".bundle.abcdefgh.partial"
    for p in (fresh, idle):
        p.mkdir()
        (p / "w.bin").write_bytes(b"x")
    hours_ago = os.stat(idle).st_mtime - 2 * 3600
    for p in (idle / "w.bin", idle):
        os.utime(p, (hours_ago, hours_ago))
    assert remove_stale_partials(target) == [idle]
    assert fresh.is_dir()


def test_sizes_are_logged_in_decimal_units():
    assert [fsutil._human(n) for n in (3, 2500, 10_200_000_000)] == ["3 B", "2.5 kB", "10.2 GB"]


# --- markers: never replace a folder slimdiff did not write ----------------------------


def test_marked_folder_is_written_and_replaced_by_the_same_kind(tmp_path):
    target = tmp_path / "bundle"
    for version in ("1", "2"):
        with atomic_dir(target, marker="bundle") as tmp:
            (tmp / "version.txt").write_text(version)
    assert json.loads((target / MARKER_NAME).read_text())["kind"] == "bundle"
    assert (target / "version.txt").read_text() == "2"


def test_a_folder_without_marker_is_refused_before_the_block_runs(tmp_path):
    target = _old_folder(tmp_path)
    refused = pytest.raises(UserError, match="bundle exists and was not written by slimdiff")
    with refused, atomic_dir(target, marker="bundle"):
        pytest.fail("the block ran")
    assert (target / "version.txt").read_text() == "old"
    assert _debris(tmp_path) == []
    with atomic_dir(target) as tmp:  # marker=None: any folder is replaced, as before
        (tmp / "version.txt").write_text("new")
    assert (target / "version.txt").read_text() == "new"


def test_a_marker_of_another_kind_is_refused(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target, marker="artifact"):
        pass
    with pytest.raises(UserError, match="holds a slimdiff artifact, not a bundle"):
        check_replaceable(target, "bundle")


def test_empty_folders_and_legacy_outputs_are_replaceable(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    check_replaceable(empty, "bundle")
    legacy = _old_folder(tmp_path)
    # a web app's manifest.json is no evidence: export would have deleted the app
    (legacy / "manifest.json").write_text('{"name": "my app", "files": []}')
    with pytest.raises(UserError, match=r"no \.slimdiff marker"):
        check_replaceable(legacy, "bundle", legacy=("manifest.json",))
    (legacy / "manifest.json").write_text('{"slimdiff_version": "0.1.0", "files": {}}')
    with pytest.raises(UserError, match=r"no \.slimdiff marker"):
        check_replaceable(legacy, "bundle")
    check_replaceable(legacy, "bundle", legacy=("manifest.json",))
    with atomic_dir(legacy, marker="bundle", legacy=("manifest.json",)) as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert (legacy / MARKER_NAME).is_file()


def test_check_replaceable_refuses_files(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is not a folder"):
        check_replaceable(tmp_path / "f", "bundle")
    check_replaceable(tmp_path / "missing", "bundle")


# --- single files -----------------------------------------------------------------------


def test_written_files_get_plain_open_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "results.json", "{}")
        assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == 0o644
        (tmp_path / "private.json").write_text("x")
        os.chmod(tmp_path / "private.json", 0o600)
        atomic_write_text(tmp_path / "private.json", "{}")  # an existing file keeps its mode
        assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)
    assert _debris(tmp_path) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_device_is_refused_not_replaced():
    before = set(os.listdir("/dev"))
    with pytest.raises(UserError, match=r"/dev/full is a device.*choose a file path"):
        atomic_write_bytes("/dev/full", b"png")
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    assert set(os.listdir("/dev")) == before


def test_fifos_folders_and_links_to_them_are_refused(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "folder").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "pipe")
    for name, kind in (("pipe", "a FIFO"), ("folder", "a folder"), ("link", "a FIFO")):
        with pytest.raises(UserError, match=f"{name}.* is {kind}"):
            atomic_write_text(tmp_path / name, "x")
    assert stat.S_ISFIFO(os.lstat(tmp_path / "pipe").st_mode)
    assert (tmp_path / "link").is_symlink()
    assert _debris(tmp_path) == []


def test_a_symlink_to_a_file_is_written_through(tmp_path):
    (tmp_path / "real.png").write_bytes(b"old")
    (tmp_path / "latest.png").symlink_to("real.png")
    atomic_write_bytes(tmp_path / "latest.png", b"new")
    assert (tmp_path / "latest.png").is_symlink()
    assert (tmp_path / "real.png").read_bytes() == b"new"


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "state.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("no")))
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert _debris(tmp_path) == []


@linux_only
def test_the_file_and_its_folder_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd)
    )
    atomic_write_text(tmp_path / "r.json", "{}")
    assert synced[-1] == str(tmp_path)
    assert synced[0].startswith(str(tmp_path / ".r.json."))  # the temp, before its rename
