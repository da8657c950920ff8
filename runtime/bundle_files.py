"""Every file a bundle run opens stays inside the bundle, is listed in manifest.json and is
hashed before use.

`open_bundle` reads manifest.json once, checks its SHA-256 against a pinned identity if one
is given, validates it (manifest.py), then checks and hashes every file `files` lists, and
returns a `Bundle` that hands out only what it verified. The rules, applied by one function
(`_check_path`) to every path:

- A bundle path is relative POSIX: no "..", "." or empty parts, not absolute, no backslash,
  colon, NUL or control character (the schema refuses the others, manifest.py).
- The bundle root is resolved once with os.path.realpath: the root itself may be a symbolic
  link (deployments switch `current -> v3`). Inside it, **no symbolic link is accepted**,
  not even one to another file of the same bundle: not manifest.json, not a folder on the
  way to a file, not the file, nothing in a graph's folder. The exporter writes none; a link
  could change between our check and onnxruntime's open, and a linked graph would read its
  external data from wherever the link points. Copies and hard links (regular files, whose
  bytes are hashed like any other) serve every deployment need a link would. After the
  walk, the path's realpath must still lie under the real root.
- A path must be a regular file (no FIFO or device), its folders real folders. Files are
  opened with O_NOFOLLOW and the opened inode must be the one checked.
- Files the runtime parses itself (tokenizer.json, the scheduler config) are read into
  memory while they are hashed and parsed from those bytes: what was hashed is what is used.
  ONNX graphs are opened by onnxruntime, by path, after hashing; a writer racing the loader
  inside the bundle folder is out of scope (it could as well replace the runtime).

External data: onnxruntime reads a graph's external data (model.onnx.data) itself, from the
locations written inside the graph. The runtime does not parse ONNX protobuf; instead every
regular file in a graph's folder (recursively) must be listed in `files`, so whatever the
graph reads from its folder is hashed first, and the folder may hold no links. Locations
that leave the folder ("../x.bin", "/abs/x.bin", a link) onnxruntime refuses itself
("External data path escapes model directory", also for sparse initializers and
Constant nodes) from version 1.27, which pyproject.toml requires: 1.26 read six of six
crafted graphs' data from outside, 1.27 and 1.31 refused them all (measured with
tests/unit/test_bundle_tamper.py, which proves it for the installed version).

Example:
    >>> bundle = open_bundle("out/bundle", expect_sha256="3f1c...")   # doctest: +SKIP
    >>> bundle.summary()                                              # doctest: +SKIP
    'ok: sdxl bundle, 4 components (...), 12 files, 20.4 MB, every SHA-256 matches'
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimdiff.runtime import hash_cache
from slimdiff.runtime.manifest import (
    FIX,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    VAE_ENCODER,
    BundleError,
    Manifest,
    load_json_bytes,
    parse_manifest,
)

from slimdiff.errors import UserError

__all__ = ["Bundle", "open_bundle", "read_manifest_bytes"]

_CHUNK = 1 << 20
MAX_INLINE_BYTES = 256 << 20  # tokenizer.json of large vocabularies is tens of MB
MAX_FOLDER_ENTRIES = 10_000
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_NONBLOCK", 0)  # a FIFO swapped in must not block the open
    | getattr(os, "O_BINARY", 0)
)
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


@dataclass
class Bundle:
    """A verified bundle: its real root, manifest, identity, and the files it checked."""

    root: Path
    manifest: Manifest
    sha256: str  # of manifest.json's bytes: pins every file through `files`
    size: int  # bytes hashed, manifest.json included
    _contents: dict[str, bytes] = field(default_factory=dict, repr=False)
    # (device, inode, size, mtime) of each file when it was hashed: a graph loaded later
    # (low memory, the VAE encoder at the first image-to-image call) must be that file
    _identity: dict[str, tuple[int, int, int, int]] = field(default_factory=dict, repr=False)

    def path(self, rel: str) -> Path:
        """The checked, hashed file `rel`, to hand to a backend (ONNX graphs)."""
        if rel not in self.manifest.files:
            raise BundleError(f"{self.root}: {rel} is not listed in {MANIFEST_NAME} files; {FIX}")
        return self.root / rel

    def check_unchanged(self, folder: str) -> None:
        """BundleError when a file under `folder` is not the one hashed at open: the
        bundle was re-exported or edited in place since (a pipeline held for hours loads
        graphs on demand; without this it would run another model's graph, unverified).
        A file whose inode, size or mtime moved (a `touch`, a restore from backup) is
        hashed again, and passes if its bytes are still those of the manifest."""
        prefix = folder.rstrip("/") + "/"
        for rel, identity in self._identity.items():
            if rel.startswith(prefix) and _identity(self.root / rel) != identity:
                self._identity[rel] = self._rehash(rel)

    def _rehash(self, rel: str) -> tuple[int, int, int, int]:
        if _identity(self.root / rel) is None:  # deleted or moved, not changed
            raise BundleError(
                f"{self.root}: {rel} is missing (deleted or moved since the bundle was opened "
                "and verified); put the bundle folder back, or open the bundle where it is now "
                "(a new pipeline, or run the command again)"
            )
        try:
            st = _check_path(self.root, rel)
            digest, _ = _hash(self.root, rel, st, keep=False)
        except BundleError:
            digest, st = None, None
        if digest != self.manifest.files[rel]:
            raise BundleError(
                f"{self.root}: {rel} changed since the bundle was opened and verified "
                "(exported again or edited); open the bundle again (a new pipeline, or "
                "run the command again) to verify and load what it holds now"
            )
        return _stat_identity(st)

    def read_bytes(self, rel: str) -> bytes:
        """The bytes of `rel` exactly as they were hashed (tokenizer.json, scheduler config)."""
        return self._contents[rel]

    def read_json(self, rel: str, infinities: bool = False) -> dict[str, Any]:
        """A verified JSON object file; `infinities` for files diffusers writes (the
        scheduler config: Python's json writes -inf as -Infinity)."""
        value = load_json_bytes(self.read_bytes(rel), f"{self.root}/{rel}", infinities)
        if not isinstance(value, dict):
            raise BundleError(f"{self.root}/{rel}: the top level is not a JSON object; {FIX}")
        return value

    def summary(self) -> str:
        m = self.manifest
        dropped = [z.name for z in m.pipeline.zero_text or ()]
        without = f" (without {', '.join(dropped)}: zeros in its place)" if dropped else ""
        steered = ", the denoiser with a ControlNet" if m.pipeline.controlnet else ""
        refiner = " refiner (image-to-image)" if m.pipeline.kind.aesthetic_score else ""
        return (
            f"ok: {m.family}{refiner} bundle, {len(m.components)} components "
            f"({', '.join(m.components)}){without}{steered}, {len(m.files) + 1} files, "
            f"{self.size / 1e6:.1f} MB, every SHA-256 matches"
        )

    def usage(self) -> str:
        """What a run of this bundle takes, in `slimdiff run`'s terms: the defaults, the
        scheduler, the denoiser's format and precision, and the inputs beyond a prompt."""
        m = self.manifest
        p = m.pipeline
        scheduler = self.read_json(p.scheduler, infinities=True).get("_class_name", "?")
        denoiser = m.components[p.denoiser]
        height, width = p.default_size
        takes = []
        from slimdiff.runtime.img2img import default_strength

        strength = f"inpainting at strength {default_strength(p, True):g}"
        if p.kind.inpainting:
            takes.append(f"--image and --mask, always (an inpainting model, {strength})")
        elif VAE_ENCODER in m.components:
            image = default_strength(p, False)
            takes.append(f"--image, --mask (image-to-image at strength {image:g}, {strength})")
        if p.controlnet is not None:
            n = p.controlnet.count
            takes.append(f"--control-image ({n} ControlNet{'s' if n > 1 else ''})")
        if "time_ids" in p.kind.extra_inputs:
            takes.append("--original-size and SDXL's other size conditioning")
        if p.kind.aesthetic_score:
            takes.append("--aesthetic-score")
        return (
            f"runs: default {width}x{height}, {p.default_steps} steps, guidance "
            f"{p.default_guidance:g}, {scheduler}; {p.denoiser} {denoiser.format} "
            f"{denoiser.precision}; sides in multiples of {p.size_multiple}"
            + (f"; takes {', '.join(takes)}" if takes else "")
        )


def open_bundle(
    bundle: str | Path, expect_sha256: str | None = None, *, reread: bool = False
) -> Bundle:
    """Verify everything a run reads, without loading any graph; raise BundleError if not.

    `expect_sha256`: the bundle's identity (what `slimdiff export` printed); a bundle whose
    manifest.json hashes differently is refused before any other file is read.
    A file untouched since it last hashed to its manifest digest, by this user, is not read
    again (runtime/hash_cache.py; SLIMDIFF_HASH_CACHE=0 turns it off); `reread` reads and
    hashes every file whatever that record says (`slimdiff verify`).

    Example:
        >>> open_bundle("out/bundle").sha256       # doctest: +SKIP
        '3f1c...'
    """
    root, data = read_manifest_bytes(bundle, expect_sha256)
    manifest = parse_manifest(data, root / MANIFEST_NAME)
    pipeline = manifest.pipeline
    inline = {r.tokenizer_file for r in pipeline.text_encoders} | {pipeline.scheduler}
    # Cheap checks first (existence, links, types), so a broken copy fails in milliseconds,
    # not after hashing gigabytes.
    checked = {rel: _check_path(root, rel) for rel in manifest.files}
    for entry in manifest.components.values():
        _check_graph_folder(root, entry.path, manifest.files)
    contents: dict[str, bytes] = {}
    size = len(data)
    reuse = not reread and hash_cache.enabled()
    known = hash_cache.recorded(root) if reuse else {}
    # the files the runtime parses are read anyway, so they are always hashed
    unchanged = {
        rel
        for rel, st in checked.items()
        if rel not in inline and known.get(rel) == (hash_cache.file_key(st), manifest.files[rel])
    }
    started = time.time()
    hashed = _hash_all(root, {r: st for r, st in checked.items() if r not in unchanged}, inline)
    hashed |= {rel: (manifest.files[rel], None) for rel in unchanged}
    for rel, expected in manifest.files.items():
        digest, content = hashed[rel]
        if digest != expected:
            raise BundleError(
                f"{root}: {rel} does not match its SHA-256 in {MANIFEST_NAME} (changed or "
                f"corrupted after export); {FIX}"
            )
        size += checked[rel].st_size
        if content is not None:
            contents[rel] = content
    if hash_cache.enabled() and len(unchanged) < len(checked):
        verified = {rel: (st, manifest.files[rel]) for rel, st in checked.items()}
        hash_cache.record(root, verified, started)
    identity = {rel: _stat_identity(st) for rel, st in checked.items()}
    return Bundle(root, manifest, manifest.sha256, size, contents, identity)


def read_manifest_bytes(bundle: str | Path, expect_sha256: str | None = None) -> tuple[Path, bytes]:
    """(real bundle root, manifest.json's bytes), read once; checked against
    `expect_sha256` when given."""
    expected = _expected_digest(expect_sha256)
    given = Path(bundle)
    if given.is_file():
        raise BundleError(
            f"{given} is a file; a bundle is the folder `slimdiff export MODEL --out FOLDER` "
            "writes (with manifest.json): pass that folder"
        )
    if not given.is_dir():
        raise BundleError(
            f"bundle {given} not found; create one with `slimdiff export MODEL --out {given}`"
        )
    root = Path(os.path.realpath(given))
    path = root / MANIFEST_NAME
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise BundleError(_not_a_bundle(given, root)) from None
    if stat.S_ISLNK(st.st_mode):
        raise _link_error(root, MANIFEST_NAME)
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{path} is not a regular file; {FIX}")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise BundleError(
            f"{path} is {st.st_size} bytes, more than a manifest may be "
            f"({MAX_MANIFEST_BYTES}); {FIX}"
        )
    with _open_checked(root, MANIFEST_NAME, st) as f:
        data = f.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path} grew past {MAX_MANIFEST_BYTES} bytes while read; {FIX}")
    digest = hashlib.sha256(data).hexdigest()
    if expected is not None and digest != expected:
        raise BundleError(
            f"{path}: SHA-256 {digest} is not the expected {expected}: this is not the pinned "
            "bundle; fetch the pinned one again, or check the expected value"
        )
    return root, data


def _stat_identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    """What says a file is the same one (not followed if a link); None if it is gone."""
    try:
        return _stat_identity(os.lstat(path))
    except OSError:
        return None


def _expected_digest(value: str | None) -> str | None:
    if value is None:
        return None
    if not _HEX64.fullmatch(value):
        raise UserError(
            f"expect_sha256 (--expect-sha256) {value[:80]!r} is not 64 hex digits; pass the "
            "sha256 that `slimdiff export` or `slimdiff verify` printed"
        )
    return value.lower()


def _check_path(root: Path, rel: str) -> os.stat_result:
    """lstat every part of `rel` under `root`: folders, then a regular file, no links."""
    parts = rel.split("/")
    current = root
    for i, part in enumerate(parts):
        current = current / part
        shown = "/".join(parts[: i + 1])
        try:
            st = os.lstat(current)
        except (FileNotFoundError, NotADirectoryError):
            raise BundleError(
                f"{root}: {rel} is missing; copy the whole bundle folder or export again"
            ) from None
        except OSError as err:
            raise BundleError(f"{root}: cannot read {shown} ({err.strerror})") from None
        if stat.S_ISLNK(st.st_mode):
            raise _link_error(root, shown)
        if i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
            raise BundleError(f"{root}: {shown} is not a folder, {rel} cannot be in it; {FIX}")
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{root}: {rel} is not a regular file; {FIX}")
    if not _inside(root, current):
        raise BundleError(f"{root}: {rel} resolves outside the bundle; {FIX}")
    return st


def _inside(root: Path, path: Path) -> bool:
    return os.path.realpath(path).startswith(str(root).rstrip(os.sep) + os.sep)


def _link_error(root: Path, rel: str) -> BundleError:
    target = os.readlink(root / rel)
    where = "inside" if _inside(root, root / rel) else "outside"
    return BundleError(
        f"{root}: {rel} is a symbolic link (to {target}, {where} the bundle); a bundle holds "
        "regular files and folders only: replace the link with a copy of its target, or "
        "export again"
    )


def _check_graph_folder(root: Path, graph: str, files: dict[str, str]) -> None:
    """Every file onnxruntime may read as `graph`'s external data must be listed (hashed)."""
    stack, seen = [graph.rsplit("/", 1)[0]], 0
    while stack:
        folder = stack.pop()
        with os.scandir(root / folder) as entries:
            for entry in entries:
                seen += 1
                if seen > MAX_FOLDER_ENTRIES:
                    raise BundleError(
                        f"{root}: {graph}'s folder holds over {MAX_FOLDER_ENTRIES} entries; {FIX}"
                    )
                rel = f"{folder}/{entry.name}"
                if entry.is_symlink():
                    raise _link_error(root, rel)
                if entry.is_dir(follow_symlinks=False):
                    stack.append(rel)
                elif not entry.is_file(follow_symlinks=False):
                    raise BundleError(f"{root}: {rel} is not a regular file or folder; {FIX}")
                elif rel not in files:
                    raise BundleError(
                        f"{root}: {rel} is not listed in {MANIFEST_NAME} files, yet it sits in "
                        f"{graph}'s folder, where onnxruntime reads external data from; {FIX} "
                        "(or remove the file if you added it)"
                    )


def _open_checked(root: Path, rel: str, checked: os.stat_result):
    """Open `rel` without following a link; it must be the very file `checked` describes."""
    try:
        fd = os.open(root / rel, _OPEN_FLAGS)
    except PermissionError as err:
        raise BundleError(
            f"{root}: cannot open {rel} ({err.strerror}); give this user read access to the "
            "bundle's files (chmod -R a+rX on the folder)"
        ) from None
    except OSError as err:
        raise BundleError(f"{root}: cannot open {rel} ({err.strerror}); {FIX}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (checked.st_dev, checked.st_ino):
        os.close(fd)
        raise BundleError(f"{root}: {rel} changed while it was being verified; try again")
    return os.fdopen(fd, "rb")


def _hash_all(
    root: Path, checked: dict[str, os.stat_result], inline: set[str]
) -> dict[str, tuple[str, bytes | None]]:
    """{file: (SHA-256, bytes if inline)}, the files hashed on a few threads at once
    (hashlib releases the GIL on large updates): a bundle's time to open is then about its
    largest file's, not the sum (SDXL: the UNet's 5 of 7 GB). The first failure raises."""
    workers = max(1, min(4, os.cpu_count() or 1, len(checked)))
    pool = ThreadPoolExecutor(workers, thread_name_prefix="slimdiff-hash")
    try:
        futures = {
            rel: pool.submit(_hash, root, rel, st, rel in inline) for rel, st in checked.items()
        }
        return {rel: future.result() for rel, future in futures.items()}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # a failure: the rest not started


def _hash(root: Path, rel: str, checked: os.stat_result, keep: bool) -> tuple[str, bytes | None]:
    """SHA-256 of `rel`, streamed; with `keep`, also its bytes (for files parsed in-process)."""
    if keep and checked.st_size > MAX_INLINE_BYTES:
        raise BundleError(f"{root}: {rel} is larger than {MAX_INLINE_BYTES} bytes; {FIX}")
    digest, parts, total = hashlib.sha256(), [], 0
    with _open_checked(root, rel, checked) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            total += len(chunk)
            if keep:
                if total > MAX_INLINE_BYTES:
                    raise BundleError(f"{root}: {rel} grew while it was being verified")
                parts.append(chunk)
    return digest.hexdigest(), (b"".join(parts) if keep else None)


def _not_a_bundle(given: Path, root: Path) -> str:
    """Why `given` is no bundle, with the fix for the usual mix-ups: a model folder (export
    it first) and a bundle's component folder (pass the bundle)."""
    if (root / "model_index.json").is_file() or (root / "config.json").is_file():
        return (
            f"{given} is a diffusers model folder, not a slimdiff bundle: export it first "
            f"(`slimdiff export {given} --out BUNDLE`) and run the bundle"
        )
    if (root.parent / MANIFEST_NAME).is_file():
        return f"{given} is a folder inside a bundle: pass the bundle, {root.parent}"
    inside = _bundles_inside(root)
    if inside:  # compress's output folder holds its bundle in bundle/, bench's deeper
        return f"{given} is not a bundle, it holds one: pass {', or '.join(map(str, inside))}"
    return (
        f"{given} is not a slimdiff bundle (no {MANIFEST_NAME}); an interrupted export leaves "
        "none: export again"
    )


def _bundles_inside(root: Path, limit: int = 3) -> list[Path]:
    """Bundles among `root`'s subfolders (compress writes OUT/bundle), at most `limit`."""
    found = []
    try:
        with os.scandir(root) as entries:
            for entry in sorted(entries, key=lambda e: e.name)[:MAX_FOLDER_ENTRIES]:
                if (
                    entry.is_dir(follow_symlinks=False)
                    and (Path(entry.path) / MANIFEST_NAME).is_file()
                ):
                    found.append(Path(entry.path))
    except OSError:
        return []
    return found[:limit]
