"""Model families (ArchSpec), built-in models and loading.

Names resolve on first access: the torch-free runtime imports `slimdiff.models.kinds`,
which must not pull in torch and diffusers through this package's loaders.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slimdiff.lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
