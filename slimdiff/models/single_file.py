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

from slimdiff.errors import UserError, first_line
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
    if local:
        _refuse_other_family(path, checkpoint, folder, index, pipeline)
    # What the file lacks comes from a local config folder's weights (diffusers' pipeline
    # loader looks there only for diffusers' own weight names, and refuses the rest)
    given = _from_config(path, checkpoint, pipeline, folder, index) if local else {}
    layout = _meta_layout(checkpoint)  # names and shapes, to account for every weight after
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
            f"{path}: {first_line(err)} (diffusers); the file lacks a component: pass a "
            "local --config folder that holds its weights (the base model's whole folder)"
        ) from None
    except RuntimeError as err:  # a converter splitting tensors of other sizes
        if not _is_shape_error(err):
            raise
        from slimdiff.models.families import arch_of_class

        raise UserError(
            f"{path}: diffusers' conversion cannot split its weights for the {pipeline} of "
            f"{where} ({first_line(err)}): its {arch_of_class(pipeline).denoiser} is of "
            "another width than the converter or --config take (diffusers' FLUX converter "
            "takes FLUX.1's 3072 only); --config must be a folder of the checkpoint's own "
            "architecture"
        ) from None
    except (OSError, ValueError) as err:  # hub and config errors (hub errors are OSErrors)
        raise _build_error(path, err, pipeline, where, local) from None
    from slimdiff.models.families import arch_of_pipeline
    from slimdiff.models.index import refuse_missing

    # diffusers leaves a weight neither the file nor the config holds on the meta device
    refuse_missing(pipe.components, path)
    # ... and drops, without a word, weights the file holds that the conversion left out
    _refuse_unused(path, layout, pipe, arch_of_pipeline(pipe), given, where)
    return pipe


def _is_shape_error(err: RuntimeError) -> bool:
    # torch's shape errors (split_with_sizes, view, cat); not its out-of-memory errors
    text = str(err)
    return ("size" in text or "shape" in text) and "alloc" not in text


def _build_error(path: Path, err: Exception, pipeline: str, where: str, local: bool) -> UserError:
    """The UserError for from_single_file's OSError or ValueError."""
    text = str(err)
    if "size mismatch" in text or "ignore_mismatched_sizes" in text:
        # diffusers' own advice (ignore_mismatched_sizes) would load random weights
        return UserError(
            f"{path}: its weights do not fit the {pipeline} of {where} (other shapes): "
            "--config must be a folder of the checkpoint's own architecture (SD1.5 vs "
            "SDXL, SDXL base vs its refiner, the base model it was fine-tuned from)"
        )
    if "valid CLIP model" in text:  # create_diffusers_clip_model_from_ldm's
        return UserError(
            f"{path}: diffusers cannot read its text encoder weights ({first_line(err)}): "
            "they are in another key layout (CLIP under ...transformer.text_model., as "
            "the base model's own single file has them) or of another width than the "
            "config's; save them in that layout, or remove them from the file to take "
            "--config's text encoders"
        )
    if local:  # `slimdiff convert` itself: converting again would not help
        return UserError(
            f"{path}: could not build the {pipeline} from {where} ({first_line(err)}); "
            "--config must be a complete diffusers folder of the checkpoint's own "
            "architecture (the base model it was fine-tuned from)"
        )
    return UserError(
        f"{path}: could not build the {pipeline} from {where} ({first_line(err)}); convert "
        "it once with `slimdiff convert FILE --config DIR --out FOLDER`, DIR a diffusers "
        "folder of the same architecture (the base model it was fine-tuned from)"
    )


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


# ------------------------------------------------------------ what the file holds, and uses

_DENOISER_PREFIX = "model.diffusion_model."
# The key prefixes of the original layouts' models (diffusers' LDM_*_KEYS and the SD3/FLUX
# files'); other keys (EMA copies, noise schedules, training state) are no model's weights
_MODEL_PREFIXES = (_DENOISER_PREFIX, "cond_stage_model.", "conditioner.", "text_encoders.")
_MODEL_PREFIXES += _VAE_PREFIXES
# The denoiser class each original layout's block names belong to
_DENOISER_LAYOUTS = {
    "input_blocks.": "UNet2DConditionModel",
    "joint_blocks.": "SD3Transformer2DModel",
    "double_blocks.": "FluxTransformer2DModel",
}


def _file_denoiser(checkpoint: dict) -> tuple[str, str] | None:
    """(the denoiser class a file's block names belong to, its block prefix), if known."""
    for key in checkpoint:
        inner = key.removeprefix(_DENOISER_PREFIX)
        for blocks, class_name in _DENOISER_LAYOUTS.items():
            if inner.startswith(blocks):
                return class_name, blocks
    return None


def _refuse_other_family(
    path: Path, checkpoint: dict, folder: Path, index: dict[str, Any], pipeline: str
) -> None:
    """UserError when the file's denoiser (by its block names) is not the class of the
    config folder's: a FLUX file with an SDXL folder fails deep in diffusers otherwise."""
    from slimdiff.models.families import arch_of_class

    found = _file_denoiser(checkpoint)
    denoiser = arch_of_class(pipeline).denoiser
    entry = index.get(denoiser)
    wanted = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    if found is None or wanted is None or found[0] == wanted:
        return
    raise UserError(
        f"{path}: holds a {found[0]} (its keys name {found[1]}*), and --config {folder} is a "
        f"{pipeline}, whose {denoiser} is a {wanted}: --config must be a folder of the "
        "checkpoint's own family and architecture (the base model it was fine-tuned from)"
    )


def _meta_layout(checkpoint: dict) -> dict[str, Any]:
    """The file's tensors as meta tensors: names, shapes and dtypes, no memory."""
    import torch

    return {
        key: torch.empty_like(value, device="meta")
        for key, value in checkpoint.items()
        if isinstance(value, torch.Tensor)
    }


def _part_prefixes(pipe: Any, arch: Any) -> dict[str, tuple[str, ...]]:
    """Where an original-layout file keeps each model of `pipe`: the denoiser, the VAE and
    the text encoders it has (SD1.x's one CLIP under cond_stage_model., SDXL's in order under
    conditioner.embedders.N., as the refiner's one; SD3's and FLUX's under text_encoders.)."""
    parts = {arch.denoiser: (_DENOISER_PREFIX,), "vae": _VAE_PREFIXES}
    present = [spec for spec in arch.text_encoders if getattr(pipe, spec.name, None) is not None]
    clips = [spec.name for spec in present if spec.kind == "clip"]
    for spec in present:
        if spec.kind != "clip":
            parts[spec.name] = ("text_encoders.t5xxl.",)
            continue
        order = clips.index(spec.name)
        single = ("cond_stage_model.",) if len(clips) == 1 else ()
        mmdit = (_CLIP_PREFIXES[spec.name],) if spec.name in _CLIP_PREFIXES else ()
        parts[spec.name] = (f"conditioner.embedders.{order}.", *single, *mmdit)
    return parts


def _owned_keys(layout: dict[str, Any], parts: dict[str, tuple[str, ...]], denoiser: str):
    """The file's model keys by the part of the pipeline whose prefix they have; "" for
    keys under a model prefix that no part has. A file without model.diffusion_model. keys
    keeps its denoiser at the top level (BFL's FLUX files): its other keys are the denoiser's."""
    top_level = not any(key.startswith(_DENOISER_PREFIX) for key in layout)
    owned: dict[str, list[str]] = {}
    for key in layout:
        owner = next((name for name, prefixes in parts.items() if key.startswith(prefixes)), None)
        if owner is None and key.startswith(_MODEL_PREFIXES):
            owner = ""
        elif owner is None and top_level:
            owner = denoiser
        if owner is not None:
            owned.setdefault(owner, []).append(key)
    return owned


def _refuse_unused(
    path: Path, layout: dict[str, Any], pipe: Any, arch: Any, given: dict[str, Any], where: str
) -> None:
    """UserError when the file holds model weights the converted pipeline does not use:
    keys no model of the pipeline has, a model of the file replaced by --config's (its keys
    in a layout diffusers' converter does not recognise), or denoiser or VAE weights the
    conversion drops (diffusers keeps what fits the config's blocks, and says nothing)."""
    owned = _owned_keys(layout, _part_prefixes(pipe, arch), arch.denoiser)
    fix = (
        "--config must be a folder of the checkpoint's own architecture (the base model it "
        "was fine-tuned from)"
    )
    if "" in owned:
        keys = owned[""]
        raise UserError(
            f"{path}: {len(keys)} of its weights belong to no model of the "
            f"{type(pipe).__name__} of {where} (first: {_few(keys)}); {fix}"
        )
    for name, keys in owned.items():
        if given.get(name) is not None:  # loaded from --config: the file's went unread
            raise UserError(
                f"{path}: its {len(keys)} {name} weights (first: {_few(keys)}) are not read "
                "by diffusers' converter (another key layout, or one text encoder of a pair "
                f"without the other), and --config's {name} would take their place; save "
                f"the file's {name} as the base model's own single file has it, or remove "
                "those keys to take --config's"
            )
    for name in (arch.denoiser, "vae"):
        if name in owned and name not in given:
            _refuse_dropped(path, layout, owned[name], name, getattr(pipe, name), where, fix)


def _refuse_dropped(
    path: Path, layout: dict, keys: list[str], name: str, module: Any, where: str, fix: str
) -> None:
    """UserError when diffusers' conversion of model `name` gives weights `module` has no
    place for, or leaves some of the file's values (`keys`) out; the conversion is rerun
    on the meta tensors of `layout`, as from_single_file ran it."""
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    mapping = SINGLE_FILE_LOADABLE_CLASSES.get(type(module).__name__)
    if mapping is None:
        return
    converted = mapping["checkpoint_mapping_fn"](
        config=dict(module.config), checkpoint=dict(layout)
    )
    expected = module.state_dict()
    extra = [key for key in converted if key not in expected]
    if extra:
        raise UserError(
            f"{path}: {len(extra)} of its {name} weights have no place in the "
            f"{type(module).__name__} of {where}, which has no {_few(extra)}: the file's "
            f"{name} is larger (more blocks or layers) or holds tensors of another kind; {fix}"
        )
    held = sum(layout[key].numel() for key in keys)
    used = sum(tensor.numel() for tensor in converted.values())
    if held > used:
        # the file's tensors the conversion passes on as they are, or as views of them
        reached = {id(t) for t in converted.values()}
        reached |= {id(t._base) for t in converted.values() if t._base is not None}
        unread = [key for key in keys if id(layout[key]) not in reached]
        if sum(layout[key].numel() for key in unread) != held - used:
            unread = []  # also some it combines: which ones are left out is not known
        raise UserError(
            f"{path}: diffusers' conversion of its {name} leaves {held - used} of its {held} "
            f"values out ({_few(unread) if unread else 'keys it does not read'}); the file "
            "holds more than the original layout (scaled fp8 or another tool's extra "
            "tensors): save it in the original layout"
        )


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
