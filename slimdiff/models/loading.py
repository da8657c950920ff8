"""Resolve a model argument to a diffusers pipeline.

A model argument is one of:
- a built-in: `tiny:<family>` or `random:<family>` (no download, see builtin.py), or
  `toy:shapes`, the trained toy model shipped in the package (see toy.py);
- a local diffusers pipeline folder (has `model_index.json`), including slimdiff's own
  compress artifacts (which add `slimdiff.json`);
- a local component folder (a denoiser's `config.json`), for `inspect`;
- a hub id such as `stabilityai/stable-diffusion-xl-base-1.0`, loaded through diffusers
  when the hub is reachable or the files are in the local cache.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from slimdiff.errors import UserError
from slimdiff.models.arch import ArchSpec
from slimdiff.models.builtin import build_builtin, parse_builtin
from slimdiff.models.families import FAMILIES, family_of_pipeline, get_arch
from slimdiff.models.toy import load_toy, parse_toy

__all__ = ["LoadedModel", "default_size", "load_model", "load_pipeline"]

log = logging.getLogger(__name__)

# Denoiser classes a component folder may hold, and the family each implies.
_DENOISER_CLASSES = {
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
}


class LoadedModel:
    """A pipeline (or a lone denoiser) plus what slimdiff knows about it."""

    def __init__(self, arch: ArchSpec, source: str, pipe: Any = None, denoiser: Any = None):
        self.arch = arch
        self.source = source  # the model argument as given
        self.pipe = pipe  # diffusers pipeline; None for a lone component folder
        self._component = denoiser  # the lone denoiser when pipe is None

    def __repr__(self) -> str:
        return f"LoadedModel({self.arch.family}, {self.source!r})"

    @property
    def denoiser(self) -> Any:
        # Read through the pipeline: a structural pass (blocks.remove) replaces pipe.unet.
        if self.pipe is not None:
            return getattr(self.pipe, self.arch.denoiser)
        return self._component

    @denoiser.setter
    def denoiser(self, module: Any) -> None:
        if self.pipe is not None:
            setattr(self.pipe, self.arch.denoiser, module)
        else:
            self._component = module

    @property
    def default_size(self) -> tuple[int, int]:
        return default_size(self.arch, self.pipe)

    def require_pipeline(self, what: str):
        if self.pipe is None:
            raise UserError(
                f"{self.source} is a single component folder; {what} needs the whole "
                "pipeline: pass the folder that holds model_index.json"
            )
        return self.pipe


def default_size(arch: ArchSpec, pipe=None) -> tuple[int, int]:
    """(height, width) a pipeline draws by default, as diffusers computes it: the denoiser's
    sample_size times the VAE's scale (64 px for toy:shapes, 128 for the tiny models, 1024
    for SDXL/SD3); the family's default when that is unknown (FLUX's config has no
    sample_size; a lone denoiser has no VAE)."""
    sample = getattr(pipe, arch.denoiser).config.get("sample_size") if pipe is not None else None
    if isinstance(sample, int):
        return sample * pipe.vae_scale_factor, sample * pipe.vae_scale_factor
    return tuple(arch.default_size)


def load_pipeline(model: str, device: str = "cpu"):
    """The diffusers pipeline behind a model argument (see module docstring)."""
    return load_model(model, device=device).require_pipeline("this command")


def load_model(model: str, device: str = "cpu") -> LoadedModel:
    """Load `model` (built-in, local folder or hub id) on `device` ("meta" = no weights)."""
    _quiet_progress_bars()
    builtin = parse_builtin(model)
    if builtin is not None:
        kind, family = builtin
        pipe = build_builtin(kind, family, device=device)
        return _wrap(pipe, model)
    toy = parse_toy(model)
    if toy is not None:
        return _wrap(load_toy(toy, device=device), model)
    path = Path(model).expanduser()
    if path.exists():
        return _load_local(path, model, device)
    if _looks_like_hub_id(model):
        return _wrap(_load_hub(model, device), model)
    raise UserError(
        f"model {model!r} not found: pass a diffusers pipeline folder (with model_index.json), "
        "a hub id (org/name), or a built-in (tiny:<family>, random:<family>; families: "
        f"{', '.join(FAMILIES)}; or toy:shapes)"
    )


def _quiet_progress_bars() -> None:
    # slimdiff shows its own progress; the per-file loading bars of diffusers and
    # transformers would interleave with it (and flood CI logs).
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def _wrap(pipe, source: str) -> LoadedModel:
    arch = get_arch(family_of_pipeline(type(pipe).__name__))
    return LoadedModel(arch=arch, source=source, pipe=pipe, denoiser=getattr(pipe, arch.denoiser))


def _load_local(path: Path, source: str, device: str) -> LoadedModel:
    if not path.is_dir():
        raise UserError(
            f"{path} is a file; pass a diffusers pipeline folder (with model_index.json)"
        )
    index = path / "model_index.json"
    if index.is_file():
        class_name = _read_json(index).get("_class_name", "")
        family_of_pipeline(class_name)  # raises a clear error for unsupported classes
        if (path / "slimdiff.json").is_file():
            from slimdiff.artifact import load_artifact

            return _wrap(load_artifact(path, device=device), source)
        return _wrap(_from_pretrained_pipeline(path, class_name, device), source)
    config = path / "config.json"
    if config.is_file():
        return _load_component(path, _read_json(config), source, device)
    raise UserError(
        f"{path} is not a diffusers model folder: it has neither model_index.json (a pipeline) "
        "nor config.json (a component); save one with pipe.save_pretrained(folder)"
    )


def _load_component(path: Path, config: dict, source: str, device: str) -> LoadedModel:
    import diffusers

    class_name = config.get("_class_name", "")
    if class_name == "UNet2DConditionModel":
        # SDXL's UNet is the one with added text/time conditions.
        family = "sdxl" if config.get("addition_embed_type") == "text_time" else "sd15"
    elif class_name in _DENOISER_CLASSES:
        family = _DENOISER_CLASSES[class_name]
    else:
        raise UserError(
            f"{path}: component class {class_name!r} is not a denoiser slimdiff knows; "
            "pass a pipeline folder or a UNet2DConditionModel / SD3Transformer2DModel / "
            "FluxTransformer2DModel folder"
        )
    cls = getattr(diffusers, class_name)
    try:
        model = cls.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: could not load {class_name}: {err}") from None
    if device not in ("cpu", "meta"):
        model = model.to(device)
    return LoadedModel(arch=get_arch(family), source=source, denoiser=model.eval())


def _from_pretrained_pipeline(path: Path, class_name: str, device: str):
    import diffusers

    cls = getattr(diffusers, class_name)
    try:
        pipe = cls.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(
            f"{path}: could not load the {class_name} in it ({err}); check that every "
            "component folder listed in model_index.json is complete"
        ) from None
    return pipe.to(device) if device not in ("cpu", "meta") else pipe


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "/", "~"))


def _load_hub(model_id: str, device: str):
    import diffusers

    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(model_id)
    except Exception as err:  # network, auth and missing-file errors come in many classes
        reason = "HF_HUB_OFFLINE is set" if offline else type(err).__name__
        raise UserError(
            f"could not load hub model {model_id!r} ({reason}): the hub is unreachable or the "
            "id is wrong; on a machine with network run `hf download "
            f"{model_id} --local-dir DIR` and pass DIR instead"
        ) from None
    family_of_pipeline(type(pipe).__name__)
    return pipe.to(device) if device not in ("cpu", "meta") else pipe


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: unreadable JSON ({err}); re-save the model") from None
