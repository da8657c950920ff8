"""The hub as slimdiff's loaders see it: whether a name is a hub id, whether the hub
client runs offline (HF_HUB_OFFLINE), so a loader passes local_files_only and names that
in its error, and the local folder a path names, a huggingface_hub cache folder read as
its snapshot (local_path), and a hub id's load (load_hub)."""

from __future__ import annotations

import os
from pathlib import Path

from slimdiff.errors import UserError, first_line

__all__ = ["cached_snapshot", "hub_offline", "load_hub", "local_path", "looks_like_hub_id"]

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


def load_hub(model_id: str, device: str, allow_pickle: bool, skip: dict[str, None]):
    """A hub id's pipeline, through diffusers' from_pretrained (from the cache, or
    downloaded): safetensors only unless `allow_pickle`, the variant a cached snapshot holds
    alone, the components in `skip` left out; a failure to fetch is one UserError."""
    import diffusers

    from slimdiff.models.families import family_of_pipeline, text_to_image_class
    from slimdiff.models.index import UNUSED_COMPONENTS, refuse_missing
    from slimdiff.models.loading import float32_keyword

    offline = hub_offline()
    snapshot = cached_snapshot(model_id)
    # (unused components: None is taken for a pipeline's optional ones, ignored otherwise)
    never = {**dict.fromkeys(UNUSED_COMPONENTS), **skip}
    try:
        safe = None if allow_pickle else True  # None: safetensors, else diffusers' .bin
        pipe = diffusers.DiffusionPipeline.from_pretrained(
            model_id,
            use_safetensors=safe,
            variant=_cached_variant(snapshot, never),
            **float32_keyword(),
            **never,
        )
    except _hub_errors() as err:
        # Network, auth, missing-file and no-safetensors errors; anything else (out of
        # memory, a bug) keeps its traceback.
        detail = first_line(err, limit=None)  # cut in the message
        pickled = snapshot is None or any(snapshot.glob("*/*.bin"))
        if "safetensors" in detail and not allow_pickle and pickled:
            hint = "it has no safetensors weights; pass --allow-pickle if you trust its .bin files"
        elif "safetensors" in detail and not allow_pickle:
            hint = "the cache lacks some of its weights, and it holds no .bin files either"
        elif offline:
            hint = "HF_HUB_OFFLINE is set and the files are not in the local cache"
        else:
            hint = "the hub is unreachable, the id is wrong, or access is gated"
        raise UserError(
            f"could not load hub model {model_id!r} (no local folder of that name either): "
            f"{detail[:300]} ({hint}); on a machine with network run `hf download "
            f"{model_id} --local-dir DIR` and pass DIR instead"
        ) from None
    canonical = text_to_image_class(type(pipe).__name__, pipe.config)
    if canonical != type(pipe).__name__:  # e.g. LatentConsistencyModelPipeline
        pipe = getattr(diffusers, canonical).from_pipe(pipe)
    family_of_pipeline(type(pipe).__name__)
    refuse_missing(pipe.components, model_id)
    return pipe.to(device) if device not in ("cpu", "meta") else pipe


def _cached_variant(snapshot: Path | None, never: dict[str, None]) -> str | None:
    """The variant a hub model's cached snapshot holds alone (a download of `*.fp16.*`
    files), which from_pretrained must be told, as for a local folder; None otherwise."""
    from slimdiff.models.index import folder_variant, is_part, left_out, read_json

    if snapshot is None:
        return None
    index = read_json(snapshot / "model_index.json")
    unread = {**left_out(index), **never}
    return folder_variant(
        snapshot, [snapshot / k for k, v in index.items() if is_part(v) and k not in unread]
    )


def _hub_errors() -> tuple[type[BaseException], ...]:
    """The exception classes a hub load raises for the network, the repo or its files."""
    errors: list[type[BaseException]] = [OSError, ValueError]  # hub errors subclass OSError
    try:
        import httpx

        errors.append(httpx.HTTPError)
    except ImportError:
        pass
    return tuple(errors)
