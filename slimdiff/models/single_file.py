"""Single-file checkpoints: the one-file `.safetensors` that A1111, ComfyUI and Civitai use.

Most fine-tunes ship this way: the UNet, VAE and text encoders in the original (CompVis /
Stability) key layout in one file, no configs. diffusers' `from_single_file` converts it,
given a diffusers config to build the components from: a folder of the same architecture
(the base model it was fine-tuned from) or a hub id. Without one it fetches diffusers'
default for the detected type (`stable-diffusion-v1-5/...` for "v1"), which needs the hub
or its cache. `slimdiff convert FILE --config DIR --out FOLDER` writes the diffusers folder
once; every command then takes FOLDER (and its lazy, streamed export).

Pickled checkpoints (`.ckpt`, `.pt`) are refused unless the caller allows pickles.

Example:
    >>> pipe = load_single_file(Path("tuned.safetensors"), config="sdxl-base")  # doctest: +SKIP
    >>> type(pipe).__name__                                                     # doctest: +SKIP
    'StableDiffusionXLPipeline'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimdiff.errors import UserError
from slimdiff.models.hub import hub_offline, local_path

__all__ = ["SINGLE_FILE_SUFFIXES", "is_single_file", "load_single_file"]

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
_PICKLED_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# diffusers' detected checkpoint type (infer_diffusers_model_type) -> the text-to-image
# pipeline slimdiff loads it as; other types (inpainting, ControlNets, video) are not models
# slimdiff exports from one file. The SDXL refiner loads as its img2img pipeline.
_PIPELINES = {
    "v1": "StableDiffusionPipeline",
    "v2": "StableDiffusionPipeline",
    "xl_base": "StableDiffusionXLPipeline",
    "xl_refiner": "StableDiffusionXLImg2ImgPipeline",
    "playground-v2-5": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "sd35_medium": "StableDiffusion3Pipeline",
    "sd35_large": "StableDiffusion3Pipeline",
    "flux-dev": "FluxPipeline",
    "flux-schnell": "FluxPipeline",
}


def is_single_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES


def load_single_file(path: Path, config: str | None = None, allow_pickle: bool = False) -> Any:
    """The diffusers pipeline of single-file checkpoint `path` (float32, CPU).

    `config`: a diffusers folder or hub id of the same architecture; None: diffusers'
    default for the detected type (the hub, or its cache). UserError, naming the fix, for
    a pickled file without `allow_pickle`, a checkpoint that is not one of the supported
    text-to-image types, or a config that cannot be had.
    """
    import diffusers
    from diffusers.loaders.single_file_utils import (
        SingleFileComponentError,
        infer_diffusers_model_type,
        load_single_file_checkpoint,
    )

    suffix = path.suffix.lower()
    if suffix != ".safetensors" and not (allow_pickle and suffix in _PICKLED_SUFFIXES):
        # diffusers torch.loads any file not named .safetensors
        raise UserError(
            f"{path} is a pickled checkpoint (unpickling can run code): pass --allow-pickle "
            "if you trust it, or use its .safetensors version"
            if suffix in _PICKLED_SUFFIXES
            else f"{path}: a single-file checkpoint is a .safetensors file (or, with "
            f"--allow-pickle, {', '.join(_PICKLED_SUFFIXES)}), not {path.suffix or 'no suffix'}"
        )
    if path.suffix != suffix:
        raise UserError(
            f"{path}: diffusers reads a checkpoint by its lowercase suffix; rename it to "
            f"{path.with_suffix(suffix).name}"
        )
    try:
        checkpoint = load_single_file_checkpoint(str(path))
    except Exception as err:  # safetensors' and torch's own errors for a damaged file
        raise UserError(
            f"{path}: not a readable checkpoint ({type(err).__name__}: {err})"
        ) from None
    kind = infer_diffusers_model_type(checkpoint)
    # A local config names its pipeline (diffusers' key-based guess needs full-size
    # encoders: SDXL's is told by OpenCLIP's 10th block); else the guess decides.
    folder = local_path(config) if config is not None else None
    local = folder is not None and folder.is_dir()
    index = _config_index(folder) if local else {}
    pipeline = _config_pipeline(index) if local else _PIPELINES.get(kind)
    if pipeline is not None and local and not _has_denoiser(checkpoint):
        # a denoiser alone in diffusers' layout (SDXL-Lightning's UNet file): slimdiff's own
        from slimdiff.models.denoiser_file import denoiser_pipeline

        pipe = denoiser_pipeline(path, checkpoint, folder, index)
        if pipe is not None:
            return pipe
    if pipeline is None or not _has_denoiser(checkpoint):
        raise UserError(
            f"{path}: diffusers reads it as a {kind!r} checkpoint, not a text-to-image model "
            f"slimdiff supports (single files of: {', '.join(sorted(set(_PIPELINES)))}, or "
            "with --config DIR the UNet or transformer of DIR's model alone); a LoRA or "
            "another component is not a whole model"
        )
    # What the file lacks comes from a local config folder's weights (diffusers' pipeline
    # loader looks there only for diffusers' own weight names, and refuses the rest)
    given = _from_config(path, checkpoint, pipeline, folder, index) if local else {}
    del checkpoint  # from_single_file reads the file itself (it takes a path, not tensors)
    offline = hub_offline()
    where = f"config {config!r}" if config else f"diffusers' default config for {kind!r}"
    try:
        pipe = getattr(diffusers, pipeline).from_single_file(
            str(path),
            config=str(folder) if local else config,
            local_files_only=local or offline,
            **given,
        )
    except (KeyError, IndexError) as err:  # diffusers' converters on another layout's keys
        raise UserError(
            f"{path}: its weights do not fit the {pipeline} of {where} (diffusers' "
            f"conversion: {type(err).__name__} {err}): --config must be a folder of the "
            "checkpoint's own architecture (SD1.5 vs SDXL vs FLUX, the base model it was "
            "fine-tuned from)"
        ) from None
    except NotImplementedError as err:  # a model left on meta, moved by diffusers' loader
        if "meta tensor" not in str(err):
            raise
        raise UserError(
            f"{path}: some weights of its model are not in the file (diffusers left them "
            "unset); the file is incomplete: use the whole checkpoint"
        ) from None
    except SingleFileComponentError as err:  # a component neither the file nor config has
        raise UserError(
            f"{path}: {err.message or err} (diffusers); the file lacks a component: pass a "
            "local --config folder that holds its weights (the base model's whole folder)"
        ) from None
    except (OSError, ValueError) as err:  # hub and config errors (hub errors are OSErrors)
        detail = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        if "size mismatch" in str(err) or "ignore_mismatched_sizes" in str(err):
            # diffusers' own advice (ignore_mismatched_sizes) would load random weights
            raise UserError(
                f"{path}: its weights do not fit the {pipeline} of {where} (other shapes): "
                "--config must be a folder of the checkpoint's own architecture (SD1.5 vs "
                "SDXL, SDXL base vs its refiner, the base model it was fine-tuned from)"
            ) from None
        raise UserError(
            f"{path}: could not build the {pipeline} from {where} ({detail}); convert it "
            "once with `slimdiff convert FILE --config DIR --out FOLDER`, DIR a diffusers "
            "folder of the same architecture (the base model it was fine-tuned from)"
        ) from None
    from slimdiff.models.index import refuse_missing

    # diffusers leaves a weight neither the file nor the config holds on the meta device
    refuse_missing(pipe.components, path)
    return pipe


# Where the SD3/FLUX layout (Stability's sd3_medium_incl_clips*, ComfyUI's whole FLUX
# files) keeps each CLIP; SD1.x/SDXL files keep all of theirs or none
_CLIP_PREFIXES = {
    "text_encoder": "text_encoders.clip_l.",
    "text_encoder_2": "text_encoders.clip_g.",
}
_VAE_PREFIXES = ("first_stage_model.", "vae.")  # diffusers' LDM_VAE_KEYS


def _in_file(name: str, cls: type, checkpoint: dict) -> bool:
    """Whether the file holds pipeline component `name` (a model of class `cls`)."""
    from diffusers.loaders.single_file_utils import (
        is_clip_model_in_single_file,
        is_t5_in_single_file,
    )

    if cls.__name__ == "T5EncoderModel":
        return is_t5_in_single_file(checkpoint)
    if cls.__name__ == "AutoencoderKL":
        return any(key.startswith(_VAE_PREFIXES) for key in checkpoint)
    if cls.__name__.startswith("CLIPTextModel"):
        if any(key.startswith("text_encoders.") for key in checkpoint):
            prefix = _CLIP_PREFIXES.get(name)
            return prefix is not None and any(key.startswith(prefix) for key in checkpoint)
        return is_clip_model_in_single_file(cls, checkpoint)
    return True  # the denoiser (checked before) and models diffusers reads from any file


def _from_config(
    path: Path, checkpoint: dict, pipeline: str, folder: Path, index: dict[str, Any]
) -> dict[str, Any]:
    """The models a single file lacks, for from_single_file's keywords: loaded from the
    config folder (`index` its model_index.json) where it has their weights (float32);
    None for a text encoder the
    family runs without (SD3's T5, as Stability's sd3_medium_incl_clips file ships,
    with a warning); UserError naming the component otherwise (a FLUX transformer file
    with a config folder of configs only)."""
    import logging

    import torch

    from slimdiff.models.families import arch_of_class
    from slimdiff.models.index import UNUSED_COMPONENTS
    from slimdiff.models.lazy import component_class
    from slimdiff.models.weights import weight_files

    arch = arch_of_class(pipeline)
    optional = {t.name: t.tokenizer for t in arch.text_encoders if t.optional}
    given: dict[str, Any] = {}
    for name, entry in index.items():
        if name.startswith("_") or not (isinstance(entry, list) and len(entry) == 2):
            continue
        library, class_name = entry
        if library is None:
            continue  # absent from the pipeline: diffusers passes None itself
        if name in UNUSED_COMPONENTS:
            given[name] = None  # never loaded (a safety checker, an IP-Adapter's encoder)
            continue
        cls = component_class(folder, name, library, class_name)
        if not issubclass(cls, torch.nn.Module):
            continue  # tokenizers and schedulers: diffusers reads them from the folder
        if _in_file(name, cls, checkpoint):
            continue
        if weight_files(folder / name):
            model = cls.from_pretrained(folder / name, use_safetensors=True, local_files_only=True)
            if any(p.dtype != torch.float32 for p in model.parameters()):  # an fp16 folder
                model = model.to(torch.float32)
            given[name] = model.eval()
            logging.getLogger(__name__).info("%s: %s from %s", path.name, name, folder / name)
        elif name in optional:
            logging.getLogger(__name__).warning(
                "%s holds no %s and %s has no weights for it: loading %s without it (give "
                "--config a folder with %s weights to keep it)",
                path, name, folder, arch.family, name,
            )  # fmt: skip
            given[name] = None
            given[optional[name]] = None
        else:
            raise UserError(
                f"{path} holds no {name} ({class_name}) and --config {folder} has no weights "
                f"for it: pass the base model's whole diffusers folder as --config (files such "
                "as flux1-dev.safetensors hold the transformer alone)"
            )
    return given


def _config_index(folder: Path) -> dict[str, Any]:
    """A local config folder's model_index.json; UserError when it has no readable one."""
    import json

    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        index = None
    if not isinstance(index, dict):
        raise UserError(
            f"--config {folder} is not a diffusers pipeline folder (no readable "
            "model_index.json); pass the base model's folder or hub id"
        )
    return index


def _config_pipeline(index: dict[str, Any]) -> str | None:
    """The pipeline class a config folder's model_index.json names, if slimdiff takes it."""
    from slimdiff.models.families import text_to_image_class

    name = index.get("_class_name")
    name = text_to_image_class(name, index) if isinstance(name, str) else name
    return name if name in set(_PIPELINES.values()) else None


def _has_denoiser(checkpoint: dict) -> bool:
    # Original layouts keep the denoiser under model.diffusion_model.; FLUX/SD3 files saved
    # without the prefix hold its blocks at the top level.
    prefixes = ("model.diffusion_model.", "double_blocks.", "joint_blocks.")
    return any(key.startswith(prefixes) for key in checkpoint)
