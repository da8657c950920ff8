"""A denoiser alone, in diffusers' own key layout, in one file: how distilled UNets ship
(SDXL-Lightning's sdxl_lightning_4step_unet.safetensors, DMD2's UNet) and how a FLUX or
SD3 transformer saved with `save_file(transformer.state_dict())` looks. diffusers has no
loader for them (users `load_state_dict` them into a base pipeline by hand); here the
rest of the pipeline comes from `convert FILE --config DIR`'s folder, its denoiser's
weights from the file, every key and shape checked.

Example:
    >>> pipe = denoiser_pipeline(Path("lightning_unet.safetensors"), state, Path("sdxl"),
    ...                          index)                                  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimdiff.errors import UserError

__all__ = ["denoiser_keys", "denoiser_pipeline"]

_DENOISERS = ("unet", "transformer")
# Prefixes a whole-denoiser state dict is sometimes saved under (a pipeline's attribute,
# a training wrapper's `model.`)
_PREFIXES = ("unet.", "transformer.", "model.")


def denoiser_keys(folder: Path, index: dict[str, Any]) -> tuple[str, set[str]] | None:
    """(component name, state-dict keys) of the config folder's denoiser (`index` its
    model_index.json), built on the meta device from its config alone; None when the
    folder has none that slimdiff knows."""
    from slimdiff.models.lazy import component_class, empty_module

    for name in _DENOISERS:
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] == "diffusers"):
            continue
        if not (folder / name / "config.json").is_file():
            return None
        model = empty_module(component_class(folder, name, *entry), folder / name)
        return name, set(model.state_dict())
    return None


def _strip(state: dict[str, Any]) -> dict[str, Any]:
    for prefix in _PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            return {key[len(prefix) :]: value for key, value in state.items()}
    return state


def denoiser_pipeline(
    path: Path, state: dict[str, Any], folder: Path, index: dict[str, Any]
) -> Any | None:
    """The config folder's pipeline (`index` its model_index.json) with its denoiser's
    weights from `state` (the file at `path`, read), or None when `state` is not that
    denoiser's in diffusers' layout (its keys are other). UserError when the keys match
    but a shape does not (another size of the architecture), or the folder does not
    load."""
    found = denoiser_keys(folder, index)
    if found is None:
        return None
    name, keys = found
    state = _strip(state)
    if set(state) != keys:
        return None
    from slimdiff.models.loading import load_model

    pipe = load_model(str(folder)).require_pipeline("a denoiser file's pipeline")
    denoiser = getattr(pipe, name)
    own = denoiser.state_dict()
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise UserError(
            f"{path}: a {type(denoiser).__name__} of another size than --config {folder}'s "
            f"({wrong[0]}: {tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}); "
            "--config must be the base model it was trained from"
        )
    denoiser.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return pipe
