"""Model families (ArchSpec), built-in models and loading."""

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
