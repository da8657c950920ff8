"""slimdiff: compress text-to-image diffusion models and deploy them small and fast.

Stages (each its own subpackage): `slimdiff.compress` (passes), `slimdiff.export` (ONNX,
TensorRT, AOTInductor) and `slimdiff.runtime` (numpy + a backend, no torch).

Example:
    >>> import slimdiff
    >>> pipe = slimdiff.load("tiny:sdxl")          # doctest: +SKIP
    >>> pipe = slimdiff.load("out/tiny/artifact")  # a compress artifact, edits replayed
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("slimdiff")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

__all__ = ["__version__", "load"]


def load(model: str, device: str = "cpu", allow_pickle: bool = False):
    """The diffusers pipeline of `model`: a compress artifact (its edit log replayed), a
    diffusers folder, a hub id or a built-in (see slimdiff.models.loading), on `device`
    ("cpu", "cuda", "cuda:N", "auto": cuda when torch sees a GPU; "meta": no weights).
    Bad input raises slimdiff.errors.UserError."""
    from slimdiff.device import resolve_device
    from slimdiff.models.loading import load_pipeline

    if hasattr(device, "type") and hasattr(device, "index"):  # a torch.device
        device = str(device)
    if device != "meta":  # one line for "gpu" or a CPU-only torch, not torch's assertion
        device = resolve_device(device)
    return load_pipeline(model, device=device, allow_pickle=allow_pickle)
