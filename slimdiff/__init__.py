"""slimdiff: compress text-to-image diffusion models and deploy them small and fast.

Stages (each its own subpackage): `slimdiff.compress` (passes), `slimdiff.export` (ONNX,
TensorRT, AOTInductor) and `slimdiff.runtime` (numpy + a backend, no torch).

Example:
    >>> from slimdiff.models import load_pipeline
    >>> pipe = load_pipeline("tiny:sdxl")          # doctest: +SKIP
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("slimdiff")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
