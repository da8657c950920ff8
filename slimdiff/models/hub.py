"""The hub as slimdiff's loaders see it: whether a name is a hub id, whether the hub
client runs offline (HF_HUB_OFFLINE), so a loader passes local_files_only and names that
in its error, and the local folder a path names, a huggingface_hub cache folder read as
its snapshot (local_path)."""

from __future__ import annotations

import os
from pathlib import Path

from slimdiff.errors import UserError

__all__ = ["cached_snapshot", "hub_offline", "local_path", "looks_like_hub_id"]

_REVISION = "main"


def looks_like_hub_id(name: str) -> bool:
    """ "owner/name": two non-empty parts, not a relative or absolute path."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def local_path(name: str | os.PathLike[str]) -> Path:
    """`name` as a local path, `~` expanded. A huggingface_hub cache folder
    (`models--org--name`, as from_pretrained and `hf download` leave it under
    ~/.cache/huggingface/hub) holds no model itself: its files are in
    `snapshots/<commit>/`, so the snapshot that `refs/main` names is taken (the only
    one, without refs/main); UserError where that is ambiguous or missing."""
    path = Path(name).expanduser()
    snapshots = path / "snapshots"
    if not (path.name.startswith("models--") and snapshots.is_dir()):
        return path
    ref = path / "refs" / _REVISION
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8", errors="replace").strip()
        if commit and (snapshots / commit).is_dir():
            return snapshots / commit
        raise UserError(
            f"{path} is a hub cache folder whose refs/{_REVISION} names snapshot "
            f"{commit[:40]!r}, which is not in snapshots/; download it again, or pass a "
            f"snapshot folder ({snapshots}/<commit>)"
        )
    found = sorted(p for p in snapshots.iterdir() if p.is_dir())
    if len(found) == 1:
        return found[0]
    names = ", ".join(p.name[:12] for p in found[:4]) or "none"
    raise UserError(
        f"{path} is a hub cache folder with {len(found)} snapshots ({names}) and no "
        f"refs/{_REVISION}; pass one snapshot folder ({snapshots}/<commit>)"
    )


def cached_snapshot(model_id: str) -> Path | None:
    """The huggingface_hub cache's snapshot folder of hub pipeline `model_id` (the one
    `refs/main` names, where its model_index.json is cached); None when it is not cached."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model_id, "model_index.json", revision=_REVISION)
    except ValueError:  # not a valid repo id after all
        return None
    return Path(found).parent if isinstance(found, str) else None
