"""The record of bundle files already hashed (runtime/hash_cache.py): what it keeps, and what
it refuses to trust."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from slimdiff.runtime import bundle_files, hash_cache
from slimdiff.runtime.bundle_files import open_bundle
from slimdiff.runtime.manifest import BundleError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMDIFF_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "bundle"
    root.mkdir()
    (root / "a.bin").write_bytes(b"a" * 10)
    return root


def _stat(path):
    return os.lstat(path)


def test_a_settled_file_is_recorded_with_its_identity(cache):
    st = _stat(cache / "a.bin")
    hash_cache.record(cache, {"a.bin": (st, "d" * 64)}, started=time.time() + 10)
    assert hash_cache.recorded(cache) == {"a.bin": (hash_cache.file_key(st), "d" * 64)}
    assert hash_cache.file_key(st) == (st.st_dev, st.st_ino, 10, st.st_mtime_ns, st.st_ctime_ns)


def test_a_file_changed_just_before_the_hash_is_not_recorded(cache):
    # racily clean: a write in the same clock tick could keep the times the record holds
    st = _stat(cache / "a.bin")
    hash_cache.record(cache, {"a.bin": (st, "d" * 64)}, started=time.time())
    assert hash_cache.recorded(cache) == {}
    assert not hash_cache._path(cache).exists()  # nothing to record: nothing written


def test_a_record_for_another_root_or_a_damaged_one_is_ignored(cache, tmp_path):
    st = _stat(cache / "a.bin")
    hash_cache.record(cache, {"a.bin": (st, "d" * 64)}, started=time.time() + 10)
    path = hash_cache._path(cache)
    other = tmp_path / "other"
    os.replace(path, hash_cache._path(other))  # a record that names `cache` as its root
    assert hash_cache.recorded(other) == {}
    path.write_text('{"root": "x", "files": ')
    assert hash_cache.recorded(cache) == {}
    path.write_text(f'{{"root": "{cache}", "files": {{"a.bin": [1, 2, "x", 4, 5, "d"]}}}}')
    assert hash_cache.recorded(cache) == {}


def test_a_record_others_can_write_is_not_trusted(cache):
    st = _stat(cache / "a.bin")
    hash_cache.record(cache, {"a.bin": (st, "d" * 64)}, started=time.time() + 10)
    path = hash_cache._path(cache)
    os.chmod(path, 0o666)
    assert hash_cache.recorded(cache) == {}
    os.chmod(path, 0o644)
    assert len(hash_cache.recorded(cache)) == 1


@pytest.mark.parametrize(("value", "on"), [(None, True), ("1", True), ("0", False), ("off", False)])
def test_the_environment_turns_it_off(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv("SLIMDIFF_HASH_CACHE", raising=False)
    else:
        monkeypatch.setenv("SLIMDIFF_HASH_CACHE", value)
    assert hash_cache.enabled() is on


def test_an_unwritable_cache_costs_nothing_but_time(cache, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SLIMDIFF_CACHE", str(blocker))  # a file where the folder would be
    hash_cache.record(cache, {"a.bin": (_stat(cache / "a.bin"), "d" * 64)}, time.time() + 10)
    assert hash_cache.recorded(cache) == {}


# ---------------------------------------------------------------- open_bundle with it


@pytest.fixture
def bundle(shared_bundle, tmp_path, monkeypatch):
    """A copy of the tiny:sd15 bundle, recorded as soon as it is hashed (a fresh copy's
    files are otherwise too recent to record), with the files each open hashes counted."""
    monkeypatch.setenv("SLIMDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SLIMDIFF_HASH_CACHE", raising=False)
    monkeypatch.setattr(hash_cache, "SETTLED_S", -60.0)
    copy = tmp_path / "bundle"
    shutil.copytree(shared_bundle("sd15", optimize=False).out, copy)
    hashed: list[str] = []
    real = bundle_files._hash

    def counting(root, rel, checked, keep):
        hashed.append(rel)
        return real(root, rel, checked, keep)

    monkeypatch.setattr(bundle_files, "_hash", counting)
    return copy, hashed


def test_a_second_open_reads_only_the_files_it_parses(bundle):
    copy, hashed = bundle
    first = open_bundle(copy)
    assert sorted(hashed) == sorted(first.manifest.files)
    hashed.clear()
    second = open_bundle(copy)
    assert sorted(hashed) == ["scheduler/scheduler_config.json", "tokenizer/tokenizer.json"]
    assert (second.sha256, second.size) == (first.sha256, first.size)
    hashed.clear()
    open_bundle(copy, reread=True)  # slimdiff verify
    assert sorted(hashed) == sorted(first.manifest.files)


def test_a_file_rewritten_with_its_old_size_and_times_is_hashed_again(bundle):
    copy, _ = bundle
    open_bundle(copy)
    data = copy / "unet" / "model.onnx"
    before = os.stat(data)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))  # ctime moves all the same
    assert os.stat(data).st_size == before.st_size
    with pytest.raises(BundleError, match=r"unet/model\.onnx does not match its SHA-256"):
        open_bundle(copy)


def test_a_file_swapped_for_a_copy_of_the_same_bytes_is_hashed_again(bundle):
    copy, hashed = bundle
    open_bundle(copy)
    data = copy / "unet" / "model.onnx"
    shutil.copy2(data, copy / "swap")
    os.replace(copy / "swap", data)  # another inode, the same bytes: passes, after a hash
    hashed.clear()
    open_bundle(copy)
    assert "unet/model.onnx" in hashed


def test_turned_off_every_open_reads_everything(bundle, monkeypatch):
    copy, hashed = bundle
    monkeypatch.setenv("SLIMDIFF_HASH_CACHE", "0")
    first = open_bundle(copy)
    hashed.clear()
    open_bundle(copy)
    assert sorted(hashed) == sorted(first.manifest.files)
    assert not (Path(os.environ["SLIMDIFF_CACHE"]) / "hashes").exists()


def test_verify_reads_everything(bundle):
    from click.testing import CliRunner

    from slimdiff.cli import main

    copy, hashed = bundle
    files = open_bundle(copy).manifest.files
    hashed.clear()
    result = CliRunner().invoke(main, ["verify", str(copy)])
    assert result.exit_code == 0, result.output
    assert sorted(hashed) == sorted(files)
