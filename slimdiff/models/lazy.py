"""Lazy models: parameters on the meta device, weights fetched from a source on demand.

`load_model(..., weights="lazy")` builds every torch component this way: parameters are
meta tensors (shape and dtype, no storage), buffers are real (some models compute them at
init and no file holds them: CLIP's position ids), and a `WeightSource`
(slimdiff/models/weights.py) is registered for the module. The exporter then either
materializes a component whole (`materialize`, when it fits in memory) or streams its
weights to disk one tensor at a time (export/streamed.py), so the pipeline as a whole is
never in memory: what lets fp16 FLUX (12B + 4.7B parameters) export on a 24 GiB machine.

A lazy model serves export only: compression passes need the weights in memory.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimdiff.models.weights import (
    ModuleWeights,
    SafetensorsWeights,
    WeightSource,
    checkpoint_renamer,
)

__all__ = [
    "aliases",
    "component_class",
    "empty_module",
    "is_lazy",
    "lazy_pipeline",
    "make_lazy",
    "materialize",
    "param_bytes",
    "replace_parameters",
    "weight_source",
]

_SOURCES: weakref.WeakKeyDictionary[nn.Module, WeightSource] = weakref.WeakKeyDictionary()


def make_lazy(module: nn.Module, source: WeightSource | None = None) -> nn.Module:
    """Move `module`'s parameters to the meta device and register where they come back from.

    `source`: default, the module's current parameters (held by the source, not the module).
    Parameters shared under several names (T5's tied embeddings) stay shared.
    """
    if source is None:
        source = ModuleWeights.of(module)
    replace_parameters(module, lambda owner, attr, p: torch.empty_like(p, device="meta"))
    _SOURCES[module] = source
    return module


def weight_source(module: nn.Module) -> WeightSource | None:
    """The source registered for `module` by make_lazy (None for an ordinary module)."""
    return _SOURCES.get(module)


def is_lazy(module: nn.Module) -> bool:
    """Whether `module` has a weight source and its parameters are not in memory."""
    param = next(module.parameters(), None)
    return module in _SOURCES and param is not None and param.device.type == "meta"


def materialize(module: nn.Module, keep_source: bool = True) -> nn.Module:
    """Fetch every parameter of a lazy `module` from its source (cast to the parameter's
    dtype). With `keep_source` the source stays registered, so
    `make_lazy(module, weight_source(module))` frees them again."""
    source = _SOURCES[module] if keep_source else _SOURCES.pop(module)
    names = aliases(module)

    def fetch(owner: nn.Module, attr: str, param: nn.Parameter) -> torch.Tensor:
        return fetch_tensor(source, names[id(param)]).to(param.dtype)

    replace_parameters(module, fetch)
    return module


def fetch_tensor(source: WeightSource, keys: list[str]) -> torch.Tensor:
    """The tensor behind a parameter known by `keys` (all its names; a file may hold a tied
    tensor under any one of them)."""
    for key in keys:
        if key in source:
            return source.tensor(key)
    raise KeyError(
        f"no weights for {keys[0]!r}"
        + (f" (nor its aliases {', '.join(keys[1:])})" if len(keys) > 1 else "")
    )


def param_bytes(module: nn.Module, itemsize: int = 4) -> int:
    """Bytes of `module`'s distinct parameters at `itemsize` bytes per element."""
    return sum(p.numel() for p in module.parameters()) * itemsize


def aliases(module: nn.Module) -> dict[int, list[str]]:
    """Every name of each distinct parameter, by id: a tied tensor has several."""
    names: dict[int, list[str]] = {}
    for key, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(key)
    return names


Slot = tuple[nn.Module, str, nn.Parameter, nn.Parameter]  # owner, name, old, new


def replace_parameters(
    module: nn.Module, make: Callable[[nn.Module, str, nn.Parameter], torch.Tensor]
) -> list[Slot]:
    """Give every parameter of `module` a new tensor, `make(owner, name, old)`, once per
    distinct parameter (tied ones stay tied); the slots replaced, to put the old back."""
    done: dict[int, nn.Parameter] = {}
    slots = []
    for owner in module.modules():
        for name, param in list(owner._parameters.items()):
            if param is None:
                continue
            if id(param) not in done:
                done[id(param)] = nn.Parameter(make(owner, name, param), requires_grad=False)
            owner._parameters[name] = done[id(param)]
            slots.append((owner, name, param, done[id(param)]))
    return slots


# ------------------------------------------------------------------ building lazy models


def empty_module(module_cls: type, folder: Path) -> nn.Module:
    """A diffusers or transformers model built from the config in `folder`, parameters on
    the meta device, buffers real."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        if hasattr(module_cls, "load_config"):  # diffusers ModelMixin
            module = module_cls.from_config(module_cls.load_config(folder))
        else:
            module = module_cls(module_cls.config_class.from_json_file(folder / "config.json"))
    # float32, as every load is: transformers 5 builds in the config's torch_dtype (SDXL's
    # hub text encoders say float16) but for a few layers, and weights take the
    # parameter's dtype when they are read
    module = module.float()
    if hasattr(module, "tie_weights"):  # after the cast, which may swap parameters
        # T5's encoder.embed_tokens is shared.weight, which alone its files hold: tied as
        # from_pretrained ties them, so either name finds it
        module.tie_weights()
    return module


def lazy_pipeline(path: Path, index: dict[str, Any], restore_edits=None):
    """The pipeline of folder `path` (diffusers layout) with every torch component lazy,
    reading its folder's safetensors; tokenizers and schedulers load as usual.

    `restore_edits(name, module)`: replays a compress artifact's edits on a component
    before its weights are attached (slimdiff/artifact.py).
    """
    import inspect

    import diffusers

    from slimdiff.models.families import text_to_image_class
    from slimdiff.models.index import UNUSED_COMPONENTS

    pipeline_cls = getattr(diffusers, text_to_image_class(index["_class_name"], index))
    accepted = inspect.signature(pipeline_cls.__init__).parameters
    parts: dict[str, Any] = {}
    for name, entry in index.items():
        if name.startswith("_") or name not in accepted:
            continue
        if not (isinstance(entry, list) and len(entry) == 2):
            parts[name] = entry  # a pipeline setting (SDXL's force_zeros_for_empty_prompt)
            continue
        library, class_name = entry
        if library is None or name in UNUSED_COMPONENTS:  # absent, or never loaded
            parts[name] = None
            continue
        cls = component_class(path, name, library, class_name)
        try:
            parts[name] = _lazy_component(cls, name, path / name, restore_edits)
        except (OSError, ValueError, KeyError) as err:  # a missing, damaged or odd folder
            raise _damaged(path / name, f"its {class_name}", err) from None
    try:
        return pipeline_cls(**parts)
    except (TypeError, ValueError) as err:  # model_index.json lacks a component
        raise _damaged(path, f"the {pipeline_cls.__name__} in it", err) from None


def _lazy_component(cls: type, name: str, folder: Path, restore_edits) -> Any:
    if isinstance(cls, type) and issubclass(cls, nn.Module):
        module = empty_module(cls, folder)
        if restore_edits is not None:
            module = restore_edits(name, module)
        source = SafetensorsWeights(folder, checkpoint_renamer(module), _weights_name(module))
        _check_keys(module, source, folder)
        _load_buffers(module, source)
        return make_lazy(module.eval(), source)
    return cls.from_pretrained(folder)  # tokenizers, schedulers: no weights


def _weights_name(module: nn.Module) -> str:
    """The weights file name from_pretrained reads for `module`'s class: diffusers' models
    diffusion_pytorch_model.*, transformers' model.* (weights.weight_files)."""
    from diffusers import ModelMixin

    return "diffusion_pytorch_model" if isinstance(module, ModelMixin) else "model"


def _damaged(where: Path, what: str, err: Exception) -> Exception:
    from slimdiff.errors import UserError, first_line

    reason = first_line(err, limit=None)
    return UserError(
        f"{where}: could not build {what} ({reason}); check that the folder is complete and "
        "its config is the model's, or save the pipeline again with save_pretrained"
    )


def component_class(path: Path, name: str, library: str, class_name: str) -> type:
    """The class a model_index.json entry names, resolved as diffusers' loader resolves it:
    a diffusers pipeline module (the hub SD1.5 folder's safety checker is
    ["stable_diffusion", "StableDiffusionSafetyChecker"]) or an importable library."""
    import importlib

    from diffusers import pipelines

    try:
        if hasattr(pipelines, library):
            return getattr(getattr(pipelines, library), class_name)
        return getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError) as err:
        from slimdiff.errors import UserError

        raise UserError(
            f"{path}/model_index.json: {name} is [{library!r}, {class_name!r}], which this "
            f"environment cannot import ({err}); install what provides it, or save the "
            "pipeline again with save_pretrained"
        ) from None


def _check_keys(module: nn.Module, source: WeightSource, folder: Path) -> None:
    # Files in an older layout (renamed keys that from_pretrained converts on load) cannot
    # be read by key: said now, before any export work, not as a KeyError halfway.
    missing = [
        names[0] for names in aliases(module).values() if not any(n in source for n in names)
    ]
    if missing:
        from slimdiff.errors import UserError

        raise UserError(
            f"{folder}: {len(missing)} weights are not in its safetensors under the names "
            f"{type(module).__name__} uses (first: {missing[0]}); the files may be in an "
            "older layout that loading converts: export with --weights memory, or save the "
            "model again with save_pretrained"
        )


def _load_buffers(module: nn.Module, source: WeightSource) -> None:
    # Persistent buffers the file holds replace the ones computed at init.
    for key, buf in module.named_buffers():
        if key in source:
            buf.copy_(source.tensor(key).to(buf.dtype))
