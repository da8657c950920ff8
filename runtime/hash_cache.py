"""Digests of bundle files hashed before, kept for files nothing has touched since.

Every run verifies every file of its bundle against manifest.json's SHA-256
(bundle_files.py): for a 7 GB SDXL bundle, 10-17 s of reading before the first step, on
each `slimdiff run`. A file whose device, inode, size, mtime and ctime are the ones recorded
when it last hashed to its manifest digest is not read again: the identity git's index
trusts to skip unchanged files. A user cannot set ctime: any write, chmod, rename or
`touch -d` moves it, so a file changed in any way through the filesystem is hashed again.
A file written in the same clock tick as it was recorded could keep its times ("racily
clean", in git's words), so only files whose times are at least `SETTLED_S` older than the
hash are recorded.

What it cannot see: bytes that change with no write through the filesystem (bit rot, a
raw device write). `slimdiff verify` always reads every file, as does every open with
SLIMDIFF_HASH_CACHE=0. The cache belongs to the user who runs: a cache file owned by another
user, or writable by others, is ignored (anyone who could write it could vouch for a
tampered file).

Layout: <cache root>/hashes/<SHA-256 of the bundle's real root>.json, written atomically:
{"root": "/real/root", "files": {"unet/model.onnx": [dev, ino, size, mtime_ns, ctime_ns,
"sha256"], ...}}. An unreadable file, or one for another root, is ignored and replaced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from pathlib import Path

from slimdiff.runtime.trt_build import cache_root

from slimdiff.fsutil import atomic_write_text

log = logging.getLogger(__name__)

ENV = "SLIMDIFF_HASH_CACHE"
SETTLED_S = 2.0  # coarser than any filesystem's timestamp tick (FAT: 2 s)
Key = tuple[int, int, int, int, int]


def enabled() -> bool:
    """Whether opens may reuse recorded digests: not when SLIMDIFF_HASH_CACHE is 0/off."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def file_key(st: os.stat_result) -> Key:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _path(root: Path) -> Path:
    return cache_root() / "hashes" / f"{hashlib.sha256(str(root).encode()).hexdigest()}.json"


def recorded(root: Path) -> dict[str, tuple[Key, str]]:
    """{file: (its key when hashed, its SHA-256)} recorded for the bundle at `root` (real)."""
    path = _path(root)
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            log.debug("hash cache %s: not a private file of this user; not used", path)
            return {}
        data = json.loads(path.read_bytes())
        if data.get("root") != str(root):
            return {}
        return {
            rel: (tuple(entry[:5]), entry[5])
            for rel, entry in data["files"].items()
            if len(entry) == 6 and all(isinstance(v, int) for v in entry[:5])
        }
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def record(root: Path, digests: dict[str, tuple[os.stat_result, str]], started: float) -> None:
    """Record the verified `digests` ({file: (stat when hashed, SHA-256)}) of the bundle at
    `root`; files changed less than SETTLED_S before `started` (time.time()) are left out.
    Best effort: a cache that cannot be written costs the next run its time, nothing else."""
    settled = (started - SETTLED_S) * 1e9
    files = {
        rel: [*file_key(st), digest]
        for rel, (st, digest) in digests.items()
        if max(st.st_mtime_ns, st.st_ctime_ns) < settled
    }
    path = _path(root)
    if not files and not path.exists():  # nothing to record (a bundle just written)
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_text(path, json.dumps({"root": str(root), "files": files}))
    except OSError as err:
        log.debug("hash cache %s not written: %s", path, err)
