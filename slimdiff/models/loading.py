"""Resolve a model argument to a diffusers pipeline.

A model argument is one of:
- a built-in: `tiny:<family>` or `random:<family>` (no download, see builtin.py), or
  `toy:shapes`, the trained toy model shipped in the package (see toy.py);
- a local diffusers pipeline folder (has `model_index.json`), including slimdiff's own
  compress artifacts (which add `slimdiff.json`);
- a local component folder (a denoiser's `config.json`), for `inspect`;
- a hub id such as `stabilityai/stable-diffusion-xl-base-1.0`, loaded through diffusers
  when the hub is reachable or the files are in the local cache;
- a single-file checkpoint (`.safetensors` in the original layout, as A1111 and ComfyUI
  use), loaded through diffusers' from_single_file with its default config for the
  detected type (hub or cache); `slimdiff convert` writes it as a folder from a local
  config (single_file.py).

Weights load from safetensors only: `.bin`/`.ckpt` files are pickles, and unpickling can run
code, so a folder or hub repo that has only those is refused with a message saying how to
convert it, unless the caller passes `allow_pickle=True` (`--allow-pickle`) for files it
trusts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NoReturn

from slimdiff.errors import UserError
from slimdiff.models.arch import ArchSpec, TextEncoderSpec
from slimdiff.models.builtin import BUILTIN_MODELS, build_builtin, builtin_class, parse_builtin
from slimdiff.models.families import (
    FAMILIES,
    arch_of_class,
    arch_of_denoiser,
    arch_of_pipeline,
    family_of_pipeline,
    text_to_image_class,
    why_no_family,
)
from slimdiff.models.fit import check_fits
from slimdiff.models.hub import load_hub, local_path, looks_like_hub_id
from slimdiff.models.index import (
    folder_variant,
    foreign_components,
    is_part,
    left_out,
    null_components,
    read_json,
    refuse_missing,
    refuse_missing_folders,
    unused_components,
)
from slimdiff.models.single_file import is_single_file, load_single_file
from slimdiff.models.text_encoders import (
    check_droppable,
    drop_text_encoders,
    present_text_encoders,
)
from slimdiff.models.toy import load_toy, parse_toy, toy_folder
from slimdiff.models.weights import refuse_pickles

__all__ = [
    "LoadedModel",
    "check_pipeline_path",
    "default_size",
    "lazy_loadable",
    "load_for_export",
    "load_model",
    "load_pipeline",
    "null_components",
    "refuse_missing",
    "wrap_pipeline",
]

log = logging.getLogger(__name__)


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
        return default_size(self.arch, self.pipe, self.denoiser)

    @property
    def max_side(self) -> int | None:
        """The largest image side in pixels its denoiser takes, where it has a limit of its
        own: SD3's PatchEmbed holds positions for pos_embed_max_size patches a side (192:
        3072 px); None for the others."""
        config = self.denoiser.config
        positions = config.get("pos_embed_max_size")
        if not isinstance(positions, int) or positions < 1:
            return None
        scale = self.pipe.vae_scale_factor if self.pipe is not None else 8
        return positions * int(config.get("patch_size") or 1) * int(scale)

    def check_size(self, size: tuple[int, int], what: str = "size") -> None:
        """UserError for a (height, width) beyond max_side."""
        limit = self.max_side
        height, width = size
        if limit is not None and max(height, width) > limit:
            raise UserError(
                f"{what} {width}x{height}: this {self.arch.family} {self.arch.denoiser} holds "
                f"positions for sides up to {limit} px (pos_embed_max_size); use at most "
                f"{limit}x{limit}"
            )

    @property
    def text_encoders(self) -> tuple[TextEncoderSpec, ...]:
        """The family's text encoders this model has (SD3 may run without T5)."""
        return present_text_encoders(self.arch, self.pipe)

    @property
    def components(self) -> tuple[str, ...]:
        """Its exported components, in the order the runtime runs them."""
        return (*(s.name for s in self.text_encoders), self.arch.denoiser, "vae_decoder")

    def require_pipeline(self, what: str):
        if self.pipe is None:
            raise UserError(
                f"{self.source} is a single component folder; {what} needs the whole "
                "pipeline: pass the folder that holds model_index.json"
            )
        return self.pipe


def default_size(arch: ArchSpec, pipe=None, denoiser=None) -> tuple[int, int]:
    """(height, width) a pipeline draws by default, as diffusers computes it: the denoiser's
    sample_size times the VAE's scale (64 px for toy:shapes, 128 for the tiny models, 1024
    for SDXL/SD3); for a lone `denoiser` (no pipeline), its sample_size times 8, the scale
    of every family's VAE and diffusers' default without one; the family's default when
    that is unknown (FLUX's config has no sample_size)."""
    module = getattr(pipe, arch.denoiser) if pipe is not None else denoiser
    sample = module.config.get("sample_size") if module is not None else None
    if isinstance(sample, int):
        scale = pipe.vae_scale_factor if pipe is not None else 8
        return sample * scale, sample * scale
    return tuple(arch.default_size)


def load_pipeline(model: str, device: str = "cpu", allow_pickle: bool = False):
    """The diffusers pipeline behind a model argument (see module docstring); `slimdiff.load`.

    A compress artifact is rebuilt from its configs and edit log (slimdiff/artifact.py).

    Example:
        >>> pipe = slimdiff.load("out/pruned/artifact")      # doctest: +SKIP
    """
    loaded = load_model(model, device=device, allow_pickle=allow_pickle)
    return loaded.require_pipeline("this command")


def load_model(
    model: str,
    device: str = "cpu",
    allow_pickle: bool = False,
    weights: str = "memory",
    without: tuple[str, ...] = (),
) -> LoadedModel:
    """Load `model` (built-in, local folder or hub id) on `device` ("meta" = no weights).

    `allow_pickle`: also load pickled `.bin` weights (only for files you trust).
    `weights`: "memory" loads them; "lazy" leaves every torch component's parameters on
    the meta device and reads them from the files when asked (slimdiff/models/lazy.py), for
    an export of a model larger than memory (safetensors folders and built-ins; CPU).
    `without`: text encoders to leave out (SD3's text_encoder_3, T5: models/text_encoders.py),
    never loaded from a folder or the hub, dropped after the load otherwise.
    """
    _quiet_progress_bars()
    _quiet_fetch_fallbacks()
    skip = _skipped(model, without)
    if weights == "lazy":
        loaded = _load_lazy(model, skip)
    elif weights != "memory":
        raise UserError(f"weights {weights!r} is not supported; use memory or lazy")
    else:
        loaded = _load_memory(model, device, allow_pickle, skip)
    if without:
        pipe = loaded.require_pipeline("leaving out text encoders")
        drop_text_encoders(pipe, loaded.arch, without)
    return loaded


def _skipped(model: str, without: tuple[str, ...]) -> dict[str, None]:
    """from_pretrained's keywords that leave `without` (and their tokenizers) unloaded;
    checked against the family where it is known before the load."""
    if not without:
        return {}
    class_name = pipeline_class_of(model)
    if class_name is None:  # a hub id: checked once loaded (drop_text_encoders)
        return {
            n: None for name in without for n in (name, name.replace("text_encoder", "tokenizer"))
        }
    arch = arch_of_class(class_name)
    specs = {s.name: s for s in arch.text_encoders}
    return {
        n: None for name in check_droppable(arch, without) for n in (name, specs[name].tokenizer)
    }


def _load_memory(model: str, device: str, allow_pickle: bool, skip: dict[str, None]) -> LoadedModel:
    builtin = parse_builtin(model)
    if builtin is not None:
        kind, family = builtin
        pipe = build_builtin(kind, family, device=device)
        return _wrap(pipe, model)
    toy = parse_toy(model)
    if toy is not None:
        return _wrap(load_toy(toy, device=device), model)
    path = local_path(model)
    if is_single_file(path):  # one-file checkpoint (A1111/ComfyUI): slimdiff/models/single_file.py
        pipe = load_single_file(path, allow_pickle=allow_pickle)
        family_of_pipeline(type(pipe).__name__)
        return _wrap(pipe.to(device) if device not in ("cpu", "meta") else pipe, model)
    if path.exists():
        return _load_local(path, model, device, allow_pickle, skip)
    if looks_like_hub_id(model):
        return _wrap(load_hub(model, device, allow_pickle, skip), model)
    raise _not_found(model)


def _not_found(model: str) -> UserError:
    return UserError(
        f"model {model!r} not found: pass a diffusers pipeline folder (with model_index.json), "
        "a hub id (org/name), or a built-in (tiny:<model>, random:<model>; models: "
        f"{', '.join(BUILTIN_MODELS)}; or toy:shapes)"
    )


def check_pipeline_path(model: str, what: str) -> str:
    """What `model` is, checked without loading it, for `what` (a command that needs a
    whole pipeline): "pipeline" (a built-in or a folder with model_index.json), "file" (a
    single-file checkpoint) or "hub" (an id not found locally); UserError, the load's own
    line, for anything else (a missing path, a component folder, a bundle)."""
    if lazy_loadable(model):
        return "pipeline"
    path = local_path(model)
    if not path.exists():
        if looks_like_hub_id(model):
            return "hub"
        raise _not_found(model)
    if is_single_file(path):
        return "file"
    if path.is_dir() and (path / "config.json").is_file():
        raise UserError(
            f"{model} is a single component folder; {what} needs the whole pipeline: pass "
            "the folder that holds model_index.json"
        )
    _refuse_non_model(path)


def load_for_export(
    model: str, weights: str = "auto", allow_pickle: bool = False, without: tuple[str, ...] = ()
) -> LoadedModel:
    """`model` loaded as an export with `weights` ("auto" | "memory" | "stream", see
    export_bundle) wants it: lazily where it can (each component's weights read from the
    files when it is exported, so the whole pipeline is never in memory at once), else
    into memory. Under "auto", files that lazy loading cannot read by key (an older
    layout that loading converts) load into memory instead."""
    if weights == "stream":
        return load_model(model, weights="lazy", without=without)
    if weights == "auto" and lazy_loadable(model):
        try:
            return load_model(model, weights="lazy", without=without)
        except UserError as err:
            log.info("loading %s into memory (%s)", model, err)
    return load_model(model, allow_pickle=allow_pickle, without=without)


def pipeline_class_of(model: str) -> str | None:
    """The diffusers pipeline class `model` loads as, read without loading it: built-in and
    toy models, and local folders with a model_index.json; None where that needs the hub
    or the model is not a pipeline (a lone denoiser, a single file)."""
    builtin = parse_builtin(model)
    if builtin is not None:
        return builtin_class(builtin[1])
    toy = parse_toy(model)
    path = toy_folder(toy) if toy is not None else local_path(model)
    try:
        index = read_json(path / "model_index.json")
    except UserError:  # not there, or not readable: the load will say which
        return None
    name = index.get("_class_name") if isinstance(index, dict) else None
    return text_to_image_class(name, index) if isinstance(name, str) else None


def lazy_loadable(model: str) -> bool:
    """Whether load_model(model, weights="lazy") can load `model`: a built-in, the toy
    model, or a local pipeline folder (hub ids must be downloaded first)."""
    if parse_builtin(model) is not None or parse_toy(model) is not None:
        return True
    return (local_path(model) / "model_index.json").is_file()


def _load_lazy(model: str, skip: dict[str, None]) -> LoadedModel:
    from slimdiff.models.lazy import lazy_pipeline

    builtin = parse_builtin(model)
    if builtin is not None:
        return _wrap(build_builtin(*builtin, lazy=True), model)
    toy = parse_toy(model)
    path = toy_folder(toy) if toy is not None else local_path(model)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        where = "a hub model" if not path.exists() and looks_like_hub_id(model) else str(path)
        raise UserError(
            f"streamed weights need a diffusers pipeline folder with safetensors weights; "
            f"{where} is not one: download it first (`hf download ID --local-dir DIR`) and "
            "pass DIR, or load the weights into memory"
        )
    index = read_json(index_file)
    family_of_pipeline(index.get("_class_name", ""))  # a clear error for unsupported classes
    if (path / "slimdiff.json").is_file():
        from slimdiff.artifact import load_artifact_lazy

        return _wrap(load_artifact_lazy(path), model)
    index = {**index, **{name: [None, None] for name in skip if name in index}}
    refuse_missing_folders(path, index, {})
    # the checks of the memory route, in its order: both routes read the same files
    from slimdiff.models.weights import check_weight_files

    unread = {**left_out(index), **foreign_components(index)}
    read = [path / k for k, v in index.items() if is_part(v) and k not in unread]
    check_weight_files(read)
    folder_variant(path, read)
    return _wrap(lazy_pipeline(path, index), model)


class _FetchFallbacks(logging.Filter):
    """Drops the lines diffusers logs while it looks for a component's weights under one
    name and then another (ModelMixin.from_pretrained: "An error occurred while trying to
    fetch ..." and, with pickles allowed, "Defaulting to unsafe serialization"): a load
    that fails says why in its own one line, and one allowed to unpickle did ask for it."""

    _LINES = ("An error occurred while trying to fetch", "Defaulting to unsafe serialization")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self._LINES)


def _quiet_fetch_fallbacks() -> None:
    import diffusers.models.modeling_utils as modeling

    logger = logging.getLogger(modeling.__name__)
    if not any(isinstance(f, _FetchFallbacks) for f in logger.filters):
        logger.addFilter(_FetchFallbacks())


def _quiet_progress_bars() -> None:
    # slimdiff shows its own progress; the per-file loading bars of diffusers and
    # transformers would interleave with it (and flood CI logs).
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def wrap_pipeline(pipe, source: str) -> LoadedModel:
    """A loaded diffusers pipeline as a LoadedModel, checked as every load checks it (its
    family, the components it needs); UserError naming what is wrong."""
    return _wrap(pipe, source)


def _wrap(pipe, source: str) -> LoadedModel:
    arch = arch_of_pipeline(pipe)
    needed = [arch.denoiser, "vae", "scheduler"]
    # An optional encoder may be absent (SD3 without T5); one that is there needs its tokenizer.
    present = present_text_encoders(arch, pipe)
    needed += [t.name for t in arch.text_encoders if not t.optional]
    needed += [t.tokenizer for t in arch.text_encoders if t in present or not t.optional]
    missing = [name for name in needed if getattr(pipe, name, None) is None]
    if missing:  # e.g. an SDXL folder without its first text encoder
        optional = [t.name for t in arch.text_encoders if t.optional]
        hint = {
            "sdxl": " (the SDXL refiner, which has no first text encoder, says so with "
            "requires_aesthetics_score: true)",
        }.get(arch.family, f" (only {', '.join(optional)} may be left out)" if optional else "")
        raise UserError(
            f"{source}: its {type(pipe).__name__} has no {', '.join(missing)} (null in "
            f"model_index.json); a {arch.family} model needs every one{hint}"
        )
    check_fits(arch, pipe, source)
    # Loaded for inference, whatever the source (built-in models are built this way; a
    # folder's modules come back from diffusers trainable): passes that train turn on what
    # they train. One state for all also keeps reloads bit-identical: CPU kernels pick
    # another path for a weight that requires grad (an ulp apart).
    for component in pipe.components.values():
        if hasattr(component, "requires_grad_"):  # torch modules (torch imported lazily)
            component.requires_grad_(False)
            _align(component)
    return LoadedModel(arch=arch, source=source, pipe=pipe, denoiser=getattr(pipe, arch.denoiser))


_ALIGN = 64  # bytes: what CPU GEMM kernels vectorise for


def _align(module) -> None:
    """Copy tensors that do not start on a 64-byte boundary (safetensors packs them back to
    back, and loaders keep views into the file's buffer): CPU kernels take another path for
    an unaligned weight, and the same weights then compute results an ulp apart (measured:
    a tiny CLIP text encoder, 2.4e-7), so a reloaded artifact would not match the model it
    was saved from bit for bit."""
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for name, t in store.items():
                if t is None or t.device.type != "cpu" or t.data_ptr() % _ALIGN == 0:
                    continue
                copy = t.detach().clone()
                if name in sub._parameters:
                    t.data = copy
                else:
                    store[name] = copy


def _load_local(
    path: Path, source: str, device: str, allow_pickle: bool, skip: dict[str, None]
) -> LoadedModel:
    from slimdiff.models.weights import check_weight_files

    if not path.is_dir():
        _refuse_non_model(path)
    index_file = path / "model_index.json"
    if index_file.is_file():
        index = read_json(index_file)
        class_name = index.get("_class_name", "")
        family_of_pipeline(class_name)  # raises a clear error for unsupported classes
        # entries the pipeline class does not take (diffusers ignores them) are not read
        foreign = foreign_components(index)
        unused = {**unused_components(index), **foreign}
        if not allow_pickle:
            parts = [path / k for k, v in index.items() if is_part(v) and k not in unused]
            refuse_pickles(parts)
        if (path / "slimdiff.json").is_file():
            from slimdiff.artifact import load_artifact

            return _wrap(load_artifact(path, device=device, allow_pickle=allow_pickle), source)
        absent = {**left_out(index), **skip}
        refuse_missing_folders(path, index, absent)
        read = [path / k for k, v in index.items() if is_part(v) and k not in {**absent, **foreign}]
        check_weight_files(read)
        variant = folder_variant(path, read)  # the one from_pretrained must be told, if any
        pipe = _from_pretrained_pipeline(path, index, device, allow_pickle, absent, variant)
        return _wrap(pipe, source)
    config = path / "config.json"
    if config.is_file():
        if not allow_pickle:
            refuse_pickles([path])
        check_weight_files([path])
        return _load_component(path, read_json(config), source, device, allow_pickle)
    _refuse_non_model(path)


def _refuse_non_model(path: Path) -> NoReturn:
    """The UserError for a path that holds no model: a file that is no single-file
    checkpoint, an exported bundle, a folder without model_index.json or config.json."""
    if not path.is_dir():
        raise UserError(
            f"{path} is a file; pass a diffusers pipeline folder (with model_index.json), or a "
            "single-file checkpoint (.safetensors)"
        )
    if (path / "manifest.json").is_file():  # the usual mix-up: an exported bundle
        raise UserError(
            f"{path} is a slimdiff bundle, already exported: run it with `slimdiff run "
            f"{path} --prompt ...`; export, compress and inspect take the model it came from"
        )
    raise UserError(
        f"{path} is not a diffusers model folder: it has neither model_index.json (a pipeline) "
        "nor config.json (a component); save one with pipe.save_pretrained(folder)"
    )


def _load_component(
    path: Path, config: dict, source: str, device: str, allow_pickle: bool
) -> LoadedModel:
    import diffusers

    class_name = config.get("_class_name", "")
    arch = arch_of_denoiser(class_name, config)
    if arch is None:
        known = " / ".join(sorted({a.denoiser_class for a in FAMILIES.values()}))
        what = f"component class {class_name!r}" if class_name else "its config.json"
        if not class_name and config.get("architectures"):  # a transformers component
            what = f"a {config['architectures'][0]} (transformers)"
        why = why_no_family(class_name, config)
        if why:  # a known class, configured as no family slimdiff runs
            raise UserError(f"{path}: this {class_name} is {why}, which slimdiff does not run")
        raise UserError(
            f"{path}: {what} is not a denoiser slimdiff knows; pass a pipeline folder or a "
            f"{known} folder"
        )
    cls = getattr(diffusers, class_name)
    try:
        model = cls.from_pretrained(
            path,
            use_safetensors=None if allow_pickle else True,
            variant=folder_variant(path, [path]),  # a folder of one variant's weights only
            **float32_keyword(),
        )
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: could not load {class_name}: {err}") from None
    refuse_missing({class_name: model}, path)
    if device not in ("cpu", "meta"):
        model = model.to(device)
    return LoadedModel(arch=arch, source=source, denoiser=model.eval())


def _from_pretrained_pipeline(
    path: Path,
    index: dict[str, Any],
    device: str,
    allow_pickle: bool,
    absent: dict[str, None],
    variant: str | None,
):
    import diffusers

    class_name = text_to_image_class(index.get("_class_name", ""), index)
    cls = getattr(diffusers, class_name)
    try:
        pipe = cls.from_pretrained(
            path,
            use_safetensors=None if allow_pickle else True,
            variant=variant,
            # float32 whatever the files hold: transformers 5 otherwise keeps their dtype
            **float32_keyword(),
            **absent,  # components left out: null in model_index.json, or `without`
        )
    except (OSError, ValueError, KeyError) as err:
        raise UserError(
            f"{path}: could not load the {class_name} in it ({err}); check that every "
            "component folder listed in model_index.json is complete"
        ) from None
    refuse_missing(pipe.components, path)
    return pipe.to(device) if device not in ("cpu", "meta") else pipe


def float32_keyword() -> dict[str, Any]:  # torch imported when it is needed
    import torch

    from slimdiff.models.weights import dtype_keyword

    return dtype_keyword(torch.float32)
