"""tools/gpu_parts.sh: a wheel split into per-call folders, stashed call by call, joined,
checked and installed only when every part arrived intact (what a GPU lease relies on)."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "gpu_parts.sh"

pytestmark = pytest.mark.skipif(shutil.which("split") is None, reason="needs coreutils split")


def _wheel(folder: Path) -> Path:
    """A small, valid wheel of a module `partsdemo` (incompressible filler for size)."""
    name = "partsdemo-1.0"
    files = {
        "partsdemo/__init__.py": b"VALUE = 42\n",
        "partsdemo/filler.bin": os.urandom(5000),
        f"{name}.dist-info/METADATA": b"Metadata-Version: 2.1\nName: partsdemo\nVersion: 1.0\n",
        f"{name}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{name}.dist-info/RECORD,,")
    wheel = folder / "partsdemo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as z:
        for path, data in files.items():
            z.writestr(path, data)
        z.writestr(f"{name}.dist-info/RECORD", "\n".join(record) + "\n")
    return wheel


def _run(repo: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PART_SIZE": "2K",
        "STASH": str(tmp / "stash"),
        "SITE": str(tmp / "site"),
        "PYTHON": sys.executable,
    }
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=repo, env=env, capture_output=True, text=True
    )


@pytest.fixture
def repo(tmp_path) -> Path:
    repo = tmp_path / "repo"
    (repo / ".git" / "info").mkdir(parents=True)
    return repo


def test_split_stash_and_install_in_as_many_calls_as_parts(repo, tmp_path):
    wheel = _wheel(tmp_path)
    done = _run(repo, tmp_path, "split", str(wheel))
    assert done.returncode == 0, done.stderr
    folders = sorted(p.name for p in (repo / ".gpu-parts").iterdir())
    size = wheel.stat().st_size
    assert folders == [f"{i:02d}" for i in range(1, -(-size // 2048) + 1)]  # 2 KiB parts
    assert "/.gpu-parts/" in (repo / ".git" / "info" / "exclude").read_text().split()
    assert f'carry: [".gpu-parts/{folders[-1]}"]' in done.stdout

    # One call per folder: only that folder is there, as a device call carries it.
    parked = tmp_path / "parked"
    shutil.move(repo / ".gpu-parts", parked)
    for i, folder in enumerate(folders):
        (repo / ".gpu-parts").mkdir()
        shutil.copytree(parked / folder, repo / ".gpu-parts" / folder)
        if i == len(folders) - 1:
            early = _run(repo, tmp_path, "install")  # the last part not stashed yet
            assert early.returncode == 1
            assert f"{len(folders) - 1} of {len(folders)} parts stashed; not installed" in (
                early.stdout
            )
            assert not (tmp_path / "site").exists()
        assert _run(repo, tmp_path, "stash").returncode == 0
        shutil.rmtree(repo / ".gpu-parts")

    done = _run(repo, tmp_path, "install")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "partsdemo-1.0-py3-none-any.whl: installed" in done.stdout
    joined = tmp_path / "stash" / wheel.name
    assert joined.read_bytes() == wheel.read_bytes()
    code = "import partsdemo; print(partsdemo.VALUE)"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert got.stdout.strip() == "42"


def test_a_corrupt_part_is_not_installed(repo, tmp_path):
    wheel = _wheel(tmp_path)
    assert _run(repo, tmp_path, "split", str(wheel)).returncode == 0
    first = next((repo / ".gpu-parts" / "01").glob("*.part-*"))
    data = bytearray(first.read_bytes())
    data[100] ^= 0xFF
    first.write_bytes(bytes(data))
    assert _run(repo, tmp_path, "stash").returncode == 0  # all folders present at once
    done = _run(repo, tmp_path, "install")
    assert done.returncode == 1
    assert f"{wheel.name}: joined parts do not match its sha256; not installed" in done.stdout
    assert not (tmp_path / "site").exists() and not (tmp_path / "stash" / wheel.name).exists()


def test_stash_without_parts_and_bad_usage_exit_2(repo, tmp_path):
    done = _run(repo, tmp_path, "stash")
    assert done.returncode == 2 and "no parts under .gpu-parts" in done.stderr
    assert _run(repo, tmp_path, "split").returncode == 2
    assert _run(repo, tmp_path, "frobnicate").returncode == 2
