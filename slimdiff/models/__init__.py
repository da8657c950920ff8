"""Model families (ArchSpec), built-in models and loading.

Names resolve on first access: the torch-free runtime imports `slimdiff.models.kinds`,
which must not pull in torch and diffusers through this package's loaders.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slimdiff.models.arch import ArchSpec, TensorSpec, TextEncoderSpec
    from slimdiff.models.families import FAMILIES, family_of_pipeline, get_arch
    from slimdiff.models.loading import LoadedModel, load_model, load_pipeline

__all__ = [
    "FAMILIES",
    "ArchSpec",
    "LoadedModel",
    "TensorSpec",
    "TextEncoderSpec",
    "family_of_pipeline",
    "get_arch",
    "load_model",
    "load_pipeline",
]

_EXPORTS = {
    "ArchSpec": "slimdiff.models.arch",
    "TensorSpec": "slimdiff.models.arch",
    "TextEncoderSpec": "slimdiff.models.arch",
    "FAMILIES": "slimdiff.models.families",
    "family_of_pipeline": "slimdiff.models.families",
    "get_arch": "slimdiff.models.families",
    "LoadedModel": "slimdiff.models.loading",
    "load_model": "slimdiff.models.loading",
    "load_pipeline": "slimdiff.models.loading",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
