"""Render toy scenes to RGB images with numpy (anti-aliased by 4x supersampling)."""

from __future__ import annotations

import numpy as np

from slimdiff.toy.scenes import COLOURS, POSITIONS, SIZES, Obj, Scene

__all__ = ["render", "shape_mask"]

_SUPERSAMPLE = 4


def shape_mask(shape: str, cx: float, cy: float, extent: float, side: int) -> np.ndarray:
    """Coverage in [0, 1] of `shape` centred at (cx, cy) with `extent` pixels, side x side."""
    n = side * _SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / _SUPERSAMPLE
    x = coords[None, :] - cx
    y = coords[:, None] - cy
    h = extent / 2
    if shape == "circle":
        inside = x * x + y * y <= h * h
    elif shape == "square":
        inside = (np.abs(x) <= h * 0.88) & (np.abs(y) <= h * 0.88)  # same area feel as circle
    elif shape == "triangle":
        # Apex up, base at the bottom: |x| <= h * (y + h) / (2h) for y in [-h, h].
        inside = (y >= -h) & (y <= h) & (np.abs(x) <= (y + h) / 2)
    elif shape == "cross":
        arm = h / 3
        inside = ((np.abs(x) <= arm) & (np.abs(y) <= h)) | ((np.abs(y) <= arm) & (np.abs(x) <= h))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return inside.reshape(side, _SUPERSAMPLE, side, _SUPERSAMPLE).mean(axis=(1, 3))


def _background(rng: np.random.Generator, side: int) -> np.ndarray:
    """A pale, low-saturation background: plain, a gradient, or light noise."""
    base = rng.uniform(200, 245) + rng.uniform(-8, 8, size=3)
    img = np.broadcast_to(base, (side, side, 3)).astype(np.float32)
    kind = rng.integers(3)
    if kind == 1:  # a soft gradient in a random direction
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (
            np.cos(angle) * np.linspace(-1, 1, side)[None, :]
            + np.sin(angle) * np.linspace(-1, 1, side)[:, None]
        )
        img = img + rng.uniform(5, 15) * ramp[..., None]
    elif kind == 2:  # light grain
        img = img + rng.normal(0, rng.uniform(2, 6), size=(side, side, 1))
    return img


def render(scene: Scene, rng: np.random.Generator, side: int = 64) -> np.ndarray:
    """uint8 (side, side, 3) image of `scene`; `rng` draws jitter, hues and background."""
    img = _background(rng, side)
    for obj in scene:
        img = _draw(img, obj, rng, side)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _draw(img: np.ndarray, obj: Obj, rng: np.random.Generator, side: int) -> np.ndarray:
    fx, fy = POSITIONS[obj.position]
    jitter = side * 0.05
    cx = fx * side + rng.uniform(-jitter, jitter)
    cy = fy * side + rng.uniform(-jitter, jitter)
    extent = SIZES[obj.size] * side * rng.uniform(0.9, 1.1)
    colour = np.asarray(COLOURS[obj.colour], np.float32) + rng.uniform(-12, 12, size=3)
    alpha = shape_mask(obj.shape, cx, cy, extent, side)[..., None]
    return img * (1 - alpha) + np.clip(colour, 0, 255) * alpha
