"""Images out of the VAE: float (3, H, W) in [-1, 1] -> uint8 (H, W, 3) -> PNG on disk.

Example:
    >>> img = to_uint8(np.zeros((3, 8, 8), np.float32))   # mid-grey
    >>> int(img[0, 0, 0]), img.shape
    (128, (8, 8, 3))
    >>> save_png(img, "out/grey.png")                      # doctest: +SKIP
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from slimdiff.fsutil import atomic_write_bytes

__all__ = ["save_png", "to_uint8"]


def to_uint8(sample: np.ndarray) -> np.ndarray:
    """(3, H, W) float in about [-1, 1] -> (H, W, 3) uint8, as diffusers' postprocess.

    diffusers denormalises with `(x * 0.5 + 0.5).clamp(0, 1)` and rounds with
    `(x * 255).round()` (VaeImageProcessor.numpy_to_pil); the same steps here give the
    same bytes for the same floats.
    """
    x = np.clip(sample.astype(np.float32) * np.float32(0.5) + np.float32(0.5), 0.0, 1.0)
    x = x.transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)
    return (x * np.float32(255)).round().astype(np.uint8)


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, 3) uint8 image as PNG atomically (temp file in the folder, rename)."""
    path = Path(path)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), mode="RGB").save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return path
