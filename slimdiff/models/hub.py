"""The hub as slimdiff's loaders see it: whether a name is a hub id, and whether the hub
client runs offline (HF_HUB_OFFLINE), so a loader passes local_files_only and names that
in its error."""

from __future__ import annotations

import os

__all__ = ["hub_offline", "looks_like_hub_id"]


def looks_like_hub_id(name: str) -> bool:
    """ "owner/name": two non-empty parts, not a relative or absolute path."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
