"""The compress artifact: a diffusers-layout folder plus slimdiff's edit log.

    model_index.json, unet/, vae/, text_encoder/, ...   diffusers' own layout (safetensors)
    slimdiff.json    {"version", "source", "recipe", "edits": [...]}: replayed on load
    report.json      per-pass summaries and timings

Where diffusers' config can express the compressed architecture (block removal can), plain
`DiffusionPipeline.from_pretrained(folder)` loads the artifact. Where it cannot (pruned
heads, quantizers) the edit log says how to rebuild it: `load_artifact` builds the base
from config, replays the edits, then loads the weights. Nothing is pickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from slimdiff.errors import UserError
from slimdiff.fsutil import atomic_dir

__all__ = ["ARTIFACT_VERSION", "EDIT_REPLAYERS", "load_artifact", "save_artifact"]

ARTIFACT_VERSION = 1
# op name -> function(pipe, edit) that re-applies a structural edit to a fresh model.
# Passes that record edits register their replayer here (e.g. EcoDiff's head slicing).
EDIT_REPLAYERS: dict[str, Any] = {}


def save_artifact(
    pipe, out: str | Path, *, source: str, recipe=None, reports=(), extra_meta=None
) -> Path:
    """Save `pipe` (safetensors) with the edit log and report, atomically."""
    out = Path(out)
    edits = [e for r in reports for e in r.edits]
    meta = {
        "version": ARTIFACT_VERSION,
        "source": source,
        "recipe": recipe.model_dump(mode="json", by_alias=True) if recipe is not None else None,
        "recipe_hash": recipe.content_hash() if recipe is not None else None,
        "edits": edits,
        **(extra_meta or {}),
    }
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "slimdiff.json").write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "report.json").write_text(
            json.dumps({"passes": [asdict(r) for r in reports]}, indent=2, default=str) + "\n"
        )
    return out


def read_artifact_meta(path: str | Path) -> dict[str, Any]:
    meta_path = Path(path) / "slimdiff.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{meta_path}: unreadable ({err}); compress the model again") from None
    if meta.get("version") != ARTIFACT_VERSION:
        raise UserError(
            f"{meta_path}: artifact version {meta.get('version')!r}, this slimdiff reads "
            f"{ARTIFACT_VERSION}; compress again with this version"
        )
    return meta


def load_artifact(path: str | Path, device: str = "cpu"):
    """Load a compress artifact as a diffusers pipeline, replaying its edit log."""
    import diffusers

    path = Path(path)
    meta = read_artifact_meta(path)
    index = json.loads((path / "model_index.json").read_text())
    cls = getattr(diffusers, index["_class_name"])
    # An edit marked "in_config" is a record only: the saved component config already
    # builds the result (blocks.remove), so there is nothing to replay.
    edits = [e for e in meta.get("edits", []) if not e.get("in_config")]
    unknown = sorted({e.get("op") for e in edits} - set(EDIT_REPLAYERS))
    if unknown:
        raise UserError(
            f"{path}: the artifact needs edits this slimdiff cannot replay "
            f"({', '.join(map(str, unknown))}); upgrade slimdiff"
        )
    if edits:
        # No built-in pass records edits yet (block removal is expressible in diffusers'
        # config); the first one that does (EcoDiff's head/FFN slicing) adds the replay here:
        # build each component from config, apply EDIT_REPLAYERS, then load the weights.
        raise NotImplementedError("edit replay arrives with the first pass that records edits")
    try:
        pipe = cls.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: incomplete artifact ({err}); compress again") from None
    return pipe.to(device) if device != "cpu" else pipe
