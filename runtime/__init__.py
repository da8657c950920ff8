"""slimdiff's torch-free runtime: run an exported bundle from prompt to image.

Imports only numpy, the standard library, `tokenizers`, PIL, pydantic (the manifest is a
strict schema), slimdiff's torch-free core modules (slimdiff.models.kinds: the per-family
record bundles carry) and, inside the backend when one is chosen, onnxruntime;
tests/unit/test_runtime_imports.py keeps it that way.

Example:
    >>> from slimdiff.runtime import Text2ImagePipeline
    >>> pipe = Text2ImagePipeline.from_bundle("out/bundle", backend="ort-cpu")  # doctest: +SKIP
    >>> result = pipe("a red circle on a blue background", steps=20, seed=0)    # doctest: +SKIP
    >>> result.image.shape, result.timings_ms["end_to_end"]                     # doctest: +SKIP
    ((512, 512, 3), 1530.2)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slimdiff.lazy import lazy_exports

if TYPE_CHECKING:
    from slimdiff.runtime.backends import get_backend
    from slimdiff.runtime.image import save_image, save_png
    from slimdiff.runtime.manifest import BundleError, read_manifest
    from slimdiff.runtime.pipeline import GenerationResult, Text2ImagePipeline
    from slimdiff.runtime.refiner import run_ensemble

__all__ = [
    "BundleError",
    "GenerationResult",
    "Text2ImagePipeline",
    "get_backend",
    "read_manifest",
    "run_ensemble",
    "save_image",
    "save_png",
]

# Resolved on first access: the exporter imports slimdiff.runtime.manifest (standard
# library only) and should not pay for numpy, tokenizers and PIL it does not use.
_EXPORTS = {
    "BundleError": "slimdiff.runtime.manifest",
    "read_manifest": "slimdiff.runtime.manifest",
    "get_backend": "slimdiff.runtime.backends",
    "save_image": "slimdiff.runtime.image",
    "save_png": "slimdiff.runtime.image",
    "GenerationResult": "slimdiff.runtime.pipeline",
    "Text2ImagePipeline": "slimdiff.runtime.pipeline",
    "run_ensemble": "slimdiff.runtime.refiner",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
