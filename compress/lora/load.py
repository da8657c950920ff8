"""One LoRA file loaded into a pipeline as a PEFT adapter, through diffusers' loader, with
every layer of the file accounted for.

diffusers loads what matches and drops the rest: keys naming modules the model lacks are
only logged ("unexpected keys"), keys for a component the pipeline's loader does not load
are skipped, and its loader logs whole state-dict errors (hundreds of lines) before it
raises. So the file's layers are read first as diffusers converts them (its own
converters, per family), each must name a module of a component the loader fills, and
after loading each must carry the adapter; diffusers' logging is silenced and what went
wrong becomes one UserError line.
"""

from __future__ import annotations

import contextlib
import logging
import re
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from slimdiff.errors import UserError, first_line

__all__ = ["LIBRARY_ERRORS", "converted", "library_detail", "load_lora", "lora_layers", "quiet"]

# What diffusers' converters and loaders raise on a file they do not understand: besides
# ValueError, bare asserts (the FLUX kohya converter's sizes), KeyError (a missing key),
# IndexError (a key of an unexpected shape), RuntimeError (state-dict size mismatches).
LIBRARY_ERRORS = (
    AssertionError,
    AttributeError,
    IndexError,
    KeyError,
    OSError,
    RuntimeError,
    TypeError,
    ValueError,
)
_SHOWN = 2  # unmatched layer names quoted in a message
_FACTOR = re.compile(
    r"(\.lora_linear_layer|\.lora|_lora)?\.(lora_[AB]|lora_down|lora_up|down|up)\.(weight|bias)$"
    r"|\.(alpha|lora_magnitude_vector)$"
)
_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+?)\.(lora_[AB]|lora_magnitude_vector)\S*: copying a param with "
    r"shape torch\.Size\(\[([^\]]*)\]\) from checkpoint, the shape in current model is "
    r"torch\.Size\(\[([^\]]*)\]\)"
)


@contextmanager
def quiet() -> Iterator[None]:
    """diffusers, transformers and PEFT silenced: their notices ("No LoRA keys associated
    to ...") and their logged errors, which repeat the exception the caller turns into one
    line."""
    # the libraries' root loggers (diffusers' and transformers' set_verbosity set these)
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def converted(pipe: Any, source: dict | Path) -> dict[str, Any]:
    """The LoRA as the pipeline's loader converts it (diffusers/PEFT keys, "unet." or
    "transformer." first), by diffusers' own converters. Raises what they raise."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

    kwargs = {}
    if isinstance(pipe, StableDiffusionXLLoraLoaderMixin):
        # SDXL's load_lora_weights maps kohya's SGM block names by the UNet's layout;
        # SD1.5's does not
        kwargs["unet_config"] = pipe.unet.config
    # a copy: the converters pop keys from the dict they are given
    loaded = type(pipe).lora_state_dict(
        dict(source) if isinstance(source, dict) else str(source), **kwargs
    )
    return loaded[0] if isinstance(loaded, tuple) else loaded


def library_detail(err: BaseException) -> str:
    """What a diffusers/PEFT/torch error says, in one line: the first size mismatch of a
    state dict (layer, the file's and the model's shapes), a message's first line joined
    with its list ("keys not renamed: a, b"), or the exception and where it was raised."""
    text = str(err).strip()
    mismatches = _SIZE_MISMATCH.findall(text)
    if mismatches:
        layer, kind, file_shape, model_shape = mismatches[0]
        shapes = [s.replace(", ", "x") for s in (file_shape, model_shape)]
        more = f"; {len(mismatches) - 1} more size mismatches" if len(mismatches) > 1 else ""
        return f"{layer}: the file's {kind} is {shapes[0]}, the model's {shapes[1]}{more}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        frames = traceback.extract_tb(err.__traceback__)  # a bare assert says nothing else
        where = f" in {frames[-1].name} ({Path(frames[-1].filename).name})" if frames else ""
        return f"{type(err).__name__}{where}"
    if lines[0].endswith(":") and len(lines) > 1:
        return f"{lines[0]} {lines[1]}"[:300]
    return first_line(err)


def load_lora(pipe: Any, file: Path, state: dict[str, Any], name: str, from_file: bool) -> None:
    """Load LoRA `file` (its vetted tensors `state`, which diffusers gets unless
    `from_file`: then the file, whose metadata PEFT-layout files need) into `pipe` as adapter
    `name`; UserError, with nothing loaded, unless every layer of it finds its module."""
    pipeline = type(pipe).__name__
    try:
        with quiet():
            layers = _planned(pipe, converted(pipe, state))
    except LIBRARY_ERRORS as err:
        raise UserError(
            f"lora.fuse: diffusers cannot read {file} for this {pipeline} "
            f"({library_detail(err)}); is it a LoRA for this model family?"
        ) from None
    # kohya layers diffusers' converter drops without a word (SDXL's, for a file that mixes
    # SGM and diffusers block names); each converts to one layer or more
    kohya = {key for key in state if key.endswith(".lora_down.weight")}
    if len(kohya) > len(layers):
        raise UserError(
            f"lora.fuse: diffusers' {pipeline} loader keeps {len(layers)} of the {len(kohya)} "
            f"layers of {file}; is it a LoRA for this model family?"
        )
    missing = [n for n in layers if not _has_module(pipe, *n.split(".", 1))]
    _refuse_unmatched(file, pipeline, len(layers), missing, "not in it")
    try:
        with quiet():
            pipe.load_lora_weights(str(file) if from_file else state, adapter_name=name)
    except LIBRARY_ERRORS as err:
        pipe.unload_lora_weights()
        raise UserError(
            f"lora.fuse: {file} does not load into this {pipeline} ({library_detail(err)}); "
            "is it a LoRA for this model family?"
        ) from None
    # what the loader left out although the module exists (a layer type PEFT skips)
    adapted = {f"{c}.{layer}" for c, names in lora_layers(pipe, name).items() for layer in names}
    missing = [n for n in layers if n not in adapted]
    if missing:
        pipe.unload_lora_weights()
        _refuse_unmatched(file, pipeline, len(layers), missing, "not loaded by diffusers")


def _planned(pipe: Any, state: dict[str, Any]) -> list[str]:
    """The layers the converted LoRA adapts, "component.module" as PEFT will look them up
    (diffusers renames older layouts' keys once more as it loads each component); a key
    under no component of the pipeline gives its layer as the file names it."""
    by_component: dict[str, dict[str, Any]] = {}
    layers = set()
    for key, value in state.items():
        component, _, rest = key.partition(".")
        if "lora" not in key:  # FLUX control LoRAs' norm weights load apart from the adapter
            continue
        if hasattr(getattr(pipe, component, None), "named_modules"):
            by_component.setdefault(component, {})[rest] = value
        else:
            layers.add(_layer_of(key))
    for component, keys in by_component.items():
        # a layout diffusers' loader refuses (ValueError) says why as it loads
        with contextlib.suppress(ValueError):
            keys = _as_peft(getattr(pipe, component), keys)
        layers |= {f"{component}.{_layer_of(key)}" for key in keys}
    return sorted(layers)


def _layer_of(key: str) -> str:
    """The module a LoRA key belongs to: its name without the factor's suffix (PEFT's
    .lora_A.weight, kohya's .lora_down.weight, older diffusers' _lora.down.weight, ...)."""
    return _FACTOR.sub("", key)


def _as_peft(module: Any, keys: dict[str, Any]) -> dict[str, Any]:
    """The keys as diffusers hands them to PEFT for `module`: load_lora_adapter's renaming
    for a diffusers model, _load_lora_into_text_encoder's for a text encoder."""
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if hasattr(module, "load_lora_adapter"):
        return keys if "lora_A" in next(iter(keys)) else convert_unet_state_dict_to_peft(keys)
    keys = convert_state_dict_to_peft(convert_state_dict_to_diffusers(keys))
    if not hasattr(module, "text_model"):
        keys = {k.removeprefix("text_model."): v for k, v in keys.items()}
    return keys


def _has_module(pipe: Any, component: str, layer: str = "") -> bool:
    module = getattr(pipe, component, None)
    loadable = getattr(pipe, "_lora_loadable_modules", ())
    if not layer or component not in loadable or module is None:
        return False
    try:
        module.get_submodule(layer)
    except AttributeError:
        return False
    return True


def _refuse_unmatched(file: Path, pipeline: str, total: int, missing: list[str], why: str) -> None:
    if total == 0:
        raise UserError(
            f"lora.fuse: no layer of {file} matches this {pipeline} (it holds no LoRA layers "
            "diffusers reads); is it a LoRA for this model family?"
        )
    if not missing:
        return
    more = len(missing) - _SHOWN
    shown = ", ".join(missing[:_SHOWN]) + (f" and {more} more" if more > 0 else "")
    if len(missing) == total:
        raise UserError(
            f"lora.fuse: no layer of {file} matches this {pipeline} ({why}: {shown}); "
            "is it a LoRA for this model family?"
        )
    raise UserError(
        f"lora.fuse: only {total - len(missing)} of the {total} layers of {file} match this "
        f"{pipeline} ({why}: {shown}); is it a LoRA for another model, or for this one before "
        "compression (fuse LoRAs first, into the uncompressed model)?"
    )


def lora_layers(pipe: Any, adapter: str | None = None) -> dict[str, list[str]]:
    """Per pipeline component, the names of its layers that carry LoRA adapter `adapter`
    (or any)."""
    from peft.tuners.lora import LoraLayer

    layers = {}
    for component, module in pipe.components.items():
        if not hasattr(module, "named_modules"):
            continue
        names = [
            name
            for name, m in module.named_modules()
            if isinstance(m, LoraLayer) and (adapter is None or adapter in m.lora_A)
        ]
        if names:
            layers[component] = names
    return layers
