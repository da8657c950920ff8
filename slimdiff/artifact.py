"""The compress artifact: a diffusers-layout folder plus slimdiff's edit log.

    model_index.json, unet/, vae/, text_encoder/, ...   diffusers' own layout (safetensors)
    slimdiff.json    {"version", "source", "recipe", "edits": [...], ...}: replayed on load
    report.json      per-pass summaries and timings
    .slimdiff        marker: slimdiff wrote this folder (and may replace it)

Where diffusers' config can express the compressed architecture (block removal can),
diffusers' own `DiffusionPipeline.from_pretrained(folder, use_safetensors=True)` loads it.
Where it cannot (pruned
heads, quantizers), slimdiff.json holds typed edits (slimdiff/edits.py) and `load_artifact`
rebuilds each edited component: build it from its saved config with no weights allocated
(parameters on the meta device; buffers, which no edit touches and some models compute at
init, on the CPU), replay its edits in order with the restore each pass registered, then
assign the saved safetensors weights (`load_state_dict(strict=True, assign=True)`). The
other components load with diffusers as usual. Nothing is pickled: `.bin` weights are
refused unless the caller opts in.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pydantic

from slimdiff.edits import Edit, parse_edit, restore
from slimdiff.errors import UserError
from slimdiff.fsutil import atomic_dir

__all__ = [
    "ARTIFACT_VERSION",
    "load_artifact",
    "load_artifact_lazy",
    "read_artifact_meta",
    "save_artifact",
]

ARTIFACT_VERSION = 2  # 2: typed edits naming their component (1 had untyped dicts)
MARKER = "artifact"
_LEGACY = ("slimdiff.json",)


class ArtifactMeta(pydantic.BaseModel):
    """slimdiff.json; keys a caller adds (`extra_meta`: the compress hash) are kept."""

    model_config = pydantic.ConfigDict(extra="allow")
    version: int
    source: str
    recipe: dict[str, Any] | None = None
    recipe_hash: str | None = None
    edits: list[dict[str, Any]] = []


def save_artifact(
    pipe, out: str | Path, *, source: str, recipe=None, reports=(), extra_meta=None
) -> Path:
    """Save `pipe` (safetensors) with the edit log and report, atomically.

    `out` is replaced only if slimdiff wrote it (its marker or slimdiff.json), never a
    user's folder (UserError)."""
    from slimdiff.models.saving import save_pipeline

    out = Path(out)
    edits = [e for r in reports for e in r.edits]
    meta = {
        "version": ARTIFACT_VERSION,
        "source": source,
        "recipe": recipe.model_dump(mode="json", by_alias=True) if recipe is not None else None,
        "recipe_hash": recipe.content_hash() if recipe is not None else None,
        "edits": [e.model_dump(mode="json") for e in edits],
        **(extra_meta or {}),
    }
    reports_json = [
        {**asdict(r), "edits": [e.model_dump(mode="json") for e in r.edits]} for r in reports
    ]
    with atomic_dir(out, marker=MARKER, legacy=_LEGACY) as tmp:
        save_pipeline(pipe, tmp)  # keys the source config left out stay out
        (tmp / "slimdiff.json").write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "report.json").write_text(
            json.dumps({"passes": reports_json}, indent=2, default=str) + "\n"
        )
    return out


def read_artifact_meta(path: str | Path) -> ArtifactMeta:
    meta_path = Path(path) / "slimdiff.json"
    try:
        raw = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise UserError(f"{meta_path}: unreadable ({err}); compress the model again") from None
    version = raw.get("version") if isinstance(raw, dict) else None
    if version != ARTIFACT_VERSION:
        raise UserError(
            f"{meta_path}: artifact version {version!r}, this slimdiff reads "
            f"{ARTIFACT_VERSION}; compress again with this version"
        )
    try:
        return ArtifactMeta.model_validate(raw)
    except pydantic.ValidationError as err:
        raise UserError(
            f"{meta_path}: malformed ({err.errors()[0]['msg']}); compress again"
        ) from None


def load_artifact(path: str | Path, device: str = "cpu", allow_pickle: bool = False):
    """Load a compress artifact as a diffusers pipeline, replaying its edit log.

    Example:
        >>> pipe = load_artifact("out/tiny/artifact")                  # doctest: +SKIP
    """
    import diffusers
    import torch

    from slimdiff.models.weights import dtype_keyword

    path = Path(path)
    index = _read_index(path)
    replay = _replays(path, index)
    from slimdiff.models.index import left_out

    cls = getattr(diffusers, index["_class_name"])
    rebuilt = {name: _rebuild(path / name, index[name], todo) for name, todo in replay.items()}
    try:
        pipe = cls.from_pretrained(
            path,
            use_safetensors=None if allow_pickle else True,
            **dtype_keyword(torch.float32),  # whatever the files hold (transformers 5 keeps it)
            **left_out(index),
            **rebuilt,
        )
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{path}: incomplete artifact ({err}); compress again") from None
    from slimdiff.models.index import refuse_missing

    refuse_missing(pipe.components, path)
    return pipe.to(device) if device != "cpu" else pipe


def load_artifact_lazy(path: str | Path):
    """The artifact's pipeline with every torch component lazy (slimdiff/models/lazy.py):
    edits replayed on the empty modules, weights read from the safetensors on demand."""
    from slimdiff.models.lazy import lazy_pipeline

    path = Path(path)
    index = _read_index(path)
    replay = _replays(path, index)

    def restore_edits(name: str, module):
        for edit in replay.get(name, []):
            module = restore(module, edit)
        return module

    return lazy_pipeline(path, index, restore_edits)


def _replays(path: Path, index: dict[str, Any]) -> dict[str, list[Edit]]:
    """The edits diffusers' configs do not express, per component, in order."""
    meta = read_artifact_meta(path)
    edits = [parse_edit(e, f"{path}/slimdiff.json: edits[{i}]") for i, e in enumerate(meta.edits)]
    replay: dict[str, list[Edit]] = {}
    for edit in edits:
        if edit.component not in index:
            raise UserError(
                f"{path}: an edit names component {edit.component!r}, which model_index.json "
                "lacks; compress the model again"
            )
        if not edit.in_config:
            replay.setdefault(edit.component, []).append(edit)
    return replay


def _read_index(path: Path) -> dict[str, Any]:
    try:
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}/model_index.json: unreadable ({err}); compress again") from None
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise UserError(f"{path}/model_index.json: no _class_name; compress the model again")
    return index


def _rebuild(folder: Path, entry: Any, edits: list[Edit]):
    """One component: built from its config with no weights, edits replayed, weights set."""
    import importlib

    from slimdiff.models.lazy import empty_module

    if not (isinstance(entry, list) and len(entry) == 2):
        raise UserError(f"{folder}: model_index.json entry {entry!r} is not [library, class]")
    library, class_name = entry
    module_cls = getattr(importlib.import_module(library), class_name)
    # Parameters on the meta device (nothing allocated); buffers real, because some models
    # compute non-persistent buffers at init (CLIP's position ids) that no file holds.
    module = empty_module(module_cls, folder)
    for edit in edits:
        module = restore(module, edit)
    module.load_state_dict(_read_weights(folder), strict=True, assign=True)
    return module.eval()


def _read_weights(folder: Path) -> dict[str, Any]:
    """Every tensor of a component folder's weights (one file or an indexed shard set),
    by from_pretrained's names only: another .safetensors file beside them is not read."""
    from safetensors.torch import load_file

    from slimdiff.models.weights import open_safetensors, weight_files

    files = weight_files(folder)
    if not files:
        raise UserError(f"{folder}: no .safetensors weights; compress the model again")
    state: dict[str, Any] = {}
    for file in files:
        # clone(): tensors read from one file buffer can sit at unaligned offsets, which
        # sends matrix products down other kernels than the saved model's (2e-7 apart).
        with open_safetensors(file):  # a damaged file refused by name
            pass
        state.update({k: v.clone() for k, v in load_file(str(file)).items()})
    return state
