"""locks.exclusive: one slimdiff run per output folder; the lock dies with its process."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap

import pytest

from slimdiff.errors import UserError
from slimdiff.locks import LOCK_NAME, exclusive

HOLD = textwrap.dedent(
    """
    import sys, time
    from slimdiff.locks import exclusive
    with exclusive(sys.argv[1]):
        print("held", flush=True)
        time.sleep(60)
    """
)


@contextlib.contextmanager
def _held(code: str, path):
    """Another process holding `path` with `code` (HOLD) while the block runs; killed after."""
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_a_second_run_on_the_same_folder_stops_with_one_line(tmp_path):
    with _held(HOLD, tmp_path) as holder:
        with (
            pytest.raises(UserError, match=rf"in use by another slimdiff run \(pid {holder.pid}\)"),
            exclusive(tmp_path),
        ):
            pass
        with exclusive(tmp_path / "other"):  # another folder is free
            pass
    with exclusive(tmp_path):  # the killed holder released it
        assert (tmp_path / LOCK_NAME).read_text() == f"pid {os.getpid()}"


def test_the_same_process_can_reenter_after_leaving_and_a_file_is_refused(tmp_path):
    for _ in range(2):
        with exclusive(tmp_path / "out"):
            pass
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file"), exclusive(tmp_path / "f"):
        pass


def test_a_run_that_wrote_nothing_leaves_no_folder(tmp_path):
    with pytest.raises(UserError), exclusive(tmp_path / "new"):
        raise UserError("refused before any work")
    assert not (tmp_path / "new").exists()
    with exclusive(tmp_path / "kept"):
        (tmp_path / "kept" / "result.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == [LOCK_NAME, "result.json"]


def test_a_bundle_being_written_is_not_written_by_a_second_export(tmp_path):
    from slimdiff.locks import exclusive_beside

    out = tmp_path / "bundle"
    with _held(HOLD.replace("exclusive", "exclusive_beside"), out):
        with (
            pytest.raises(UserError, match=r"being written by another slimdiff run \(pid "),
            exclusive_beside(out),
        ):
            pass
        with exclusive_beside(tmp_path / "other"):  # another bundle is free
            pass
    with exclusive_beside(out):  # its process gone, the lock is free
        pass


def test_export_replaces_a_bundle_but_no_folder_with_a_foreign_manifest(tmp_path):
    from slimdiff.export.bundle import check_out_dir

    app = tmp_path / "webapp"
    (app / "src").mkdir(parents=True)
    (app / "manifest.json").write_text('{"name": "app", "icons": []}')
    with pytest.raises(UserError, match="was not written by slimdiff"):
        check_out_dir(app)
    old = tmp_path / "old-bundle"  # a bundle of a slimdiff that wrote no marker
    old.mkdir()
    (old / "manifest.json").write_text('{"slimdiff_version": "0.1.0", "files": {}}')
    check_out_dir(old)
