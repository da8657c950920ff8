"""The toy:shapes judge: does a generated image show what its prompt asks for?

In the spirit of GenEval (object, colour, count, position), for the toy world of
`slimdiff.toy`. An image is read in four steps:

1. colour segmentation: after a light blur and a white balance, a pixel belongs to palette
   colour k when its chroma (max(RGB) - min(RGB)) is high enough and its hue is nearest
   colour k's hue; the pale, grey-ish backgrounds have almost no chroma, so they drop out;
2. objects: connected blobs of palette pixels (`scipy.ndimage.label`), each named by its
   majority colour, so a rim or drift of a neighbouring hue stays part of its object (a
   blob is split by colour only when two colour groups sit far apart: touching objects);
   specks below a minimum area (scaled with the image area) are noise, not objects;
3. shape: the object's mask, cropped to its bounding box, padded to a square and
   area-resampled to a GRID x GRID grid, goes through a tiny MLP (one hidden layer; weights
   in `shape_classifier.safetensors`, trained by `tools/train_judge.py`);
4. position: the anchor of `slimdiff.toy.POSITIONS` nearest the bounding-box centre.

A prompt is judged correct when the image holds exactly as many objects as the prompt
names and each named object matches its own detection in colour, shape and position.
numpy and scipy only: no torch at inference, and the same answer on every machine.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from slimdiff.toy.scenes import COLOURS, POSITIONS, SHAPES, parse_prompt

__all__ = [
    "COLOUR_NAMES",
    "GRID",
    "MIN_AREA_FRACTION",
    "MIN_CHROMA",
    "WEIGHTS",
    "Detection",
    "Verdict",
    "classify_shapes",
    "colour_labels",
    "components",
    "detect",
    "judge",
    "prompt_accuracy",
    "shape_features",
]

WEIGHTS = Path(__file__).with_name("shape_classifier.safetensors")
GRID = 16  # side of the resampled mask the classifier sees
N_FEATURES = GRID * GRID + 2  # the grid, fill ratio, bounding-box aspect
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
# Chroma (0-255 scale) above which a pixel can be an object: backgrounds stay below ~20,
# palette colours sit at 100-230, and anti-aliased edges fall in between.
MIN_CHROMA = 60.0
# Degrees of hue a pixel may stray from the nearest palette hue (orange and yellow, the
# closest pair, are 23 degrees apart; nearest wins well before this limit).
MAX_HUE_DISTANCE = 40.0
# Gaussian blur (pixels at 64x64, scaled with the image) before reading colours: objects
# are solid areas, so it costs them only a soft edge, while pixel noise averages to grey.
SMOOTH = 1.0
# Largest global colour cast (per channel, 0-255) that `_white_balance` removes.
MAX_CAST = 40.0
# Two colour groups of one blob are two objects when their centres are this far apart
# (fraction of the image side): objects sit at opposite anchors, half a side apart.
SPLIT_DISTANCE = 0.3
# Smallest object, as a fraction of the image area: 50 px at 64x64. A small object covers
# 100-250 px even when blurred; specks from pixel noise or artifacts stay below ~45 px.
MIN_AREA_FRACTION = 50 / 4096
_ANCHOR_NAMES = tuple(POSITIONS)
_ANCHORS = np.array([POSITIONS[p] for p in _ANCHOR_NAMES], np.float64)


@dataclass(frozen=True)
class Detection:
    """One object found in an image.

    `centroid` is the centre of the object's bounding box (x, y) as fractions of the
    width and height: the renderer places shapes by that centre, while a mass centroid
    would sit low for a triangle (a third of its half-height).
    """

    colour: str
    shape: str
    position: str
    area: int  # pixels
    centroid: tuple[float, float]


@dataclass(frozen=True)
class Verdict:
    """The judge's answer for one (image, prompt).

    `matched[i]` is True when the prompt's i-th object was found with the right colour,
    shape and position (each detection serves at most one object); `count_ok` when the
    image holds exactly as many objects as the prompt names; `correct` when both hold.
    """

    prompt: str
    correct: bool
    count_ok: bool
    matched: tuple[bool, ...]
    detections: tuple[Detection, ...]


def _hue_chroma(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360) and chroma (max - min) of float RGB (..., 3) on 0-255."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    top = rgb.max(axis=-1)
    chroma = top - rgb.min(axis=-1)
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(
        top == r,
        np.mod((g - b) / safe, 6.0),
        np.where(top == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    return hue * 60.0, chroma


_PALETTE_HUES, _ = _hue_chroma(np.array([COLOURS[c] for c in COLOUR_NAMES], np.float64))


def _white_balance(rgb: np.ndarray) -> np.ndarray:
    """Remove a global colour cast, measured on the background (the per-channel median).

    A generated image may tint everything slightly; without this a warm cast lifts the
    background's chroma and pushes orange towards yellow or red.
    """
    median = np.median(rgb.reshape(-1, 3), axis=0)
    cast = np.clip(median - median.mean(), -MAX_CAST, MAX_CAST)
    return rgb - cast


def colour_labels(image: np.ndarray, min_chroma: float = MIN_CHROMA) -> np.ndarray:
    """Per pixel, the index into COLOUR_NAMES of its palette colour, or -1 (background).

    Read after a light blur (SMOOTH) and white balance (`_white_balance`).
    """
    rgb = np.asarray(image, np.float32)
    sigma = SMOOTH * max(rgb.shape[:2]) / 64
    rgb = ndimage.gaussian_filter(rgb, (sigma, sigma, 0))
    hue, chroma = _hue_chroma(_white_balance(rgb))
    gap = np.abs(hue[..., None] - _PALETTE_HUES.astype(np.float32))
    gap = np.minimum(gap, 360.0 - gap)
    nearest = gap.argmin(axis=-1)
    ok = (chroma >= min_chroma) & (gap.min(axis=-1) <= MAX_HUE_DISTANCE)
    return np.where(ok, nearest, -1).astype(np.int8)


def _object_colours(labels: np.ndarray, min_area: int, split: float) -> list[int]:
    """The colours in one connected blob that are separate objects, majority first.

    Pixels of a minority colour are a rim or a hue drift of the same object unless they
    form a large group whose centre lies at least `split` pixels from every object colour
    already taken (two objects that touch).
    """
    counts = np.bincount(labels[labels >= 0], minlength=len(COLOUR_NAMES))
    ranked = [int(k) for k in np.argsort(-counts, kind="stable")]
    order = [ranked[0]] + [k for k in ranked[1:] if counts[k] >= min_area]
    centres = {k: np.argwhere(labels == k).mean(axis=0) for k in order}
    chosen = [order[0]]
    for k in order[1:]:
        if all(np.linalg.norm(centres[k] - centres[j]) >= split for j in chosen):
            chosen.append(k)
    return chosen


def components(
    labels: np.ndarray, min_area: int
) -> list[tuple[int, np.ndarray, tuple[slice, slice]]]:
    """The objects in a colour-label map: connected blobs of palette pixels, at least
    `min_area` pixels, each named by its majority colour (split by colour when two
    differently coloured objects touch).

    Returns (colour index, boolean mask cropped to the bounding box, bounding-box slices),
    largest blob first.
    """
    blobs, n = ndimage.label(labels >= 0)
    if n == 0:
        return []
    areas = np.bincount(blobs.ravel(), minlength=n + 1)[1:]
    boxes = ndimage.find_objects(blobs)
    split = SPLIT_DISTANCE * max(labels.shape)
    found = []
    for i in np.argsort(-areas, kind="stable"):
        if areas[i] < min_area:
            break
        rows, cols = boxes[i]
        mask = blobs[rows, cols] == i + 1
        local = np.where(mask, labels[rows, cols], -1)
        colours = _object_colours(local, min_area, split)
        if len(colours) == 1:
            found.append((colours[0], mask, (rows, cols)))
            continue
        # Touching objects: every pixel goes to the object colour nearest its own hue.
        gap = np.abs(_PALETTE_HUES[local.clip(0)][..., None] - _PALETTE_HUES[colours])
        owner = np.asarray(colours)[np.minimum(gap, 360.0 - gap).argmin(axis=-1)]
        for k in colours:
            pieces, _ = ndimage.label(mask & (owner == k))
            for j, (r, c) in enumerate(ndimage.find_objects(pieces)):
                piece = pieces[r, c] == j + 1
                if piece.sum() >= min_area:
                    box = (
                        slice(rows.start + r.start, rows.start + r.stop),
                        slice(cols.start + c.start, cols.start + c.stop),
                    )
                    found.append((k, piece, box))
    return found


@cache
def _resample_matrix(n: int, m: int) -> np.ndarray:
    """(m, n) weights that area-average a length-n axis onto m cells (rows sum to 1)."""
    cell = np.arange(m + 1) * (n / m)
    lo = np.maximum(cell[:-1, None], np.arange(n)[None, :])
    hi = np.minimum(cell[1:, None], np.arange(1, n + 1)[None, :])
    return np.clip(hi - lo, 0.0, None) * (m / n)


def shape_features(mask: np.ndarray) -> np.ndarray:
    """Classifier input for one object's mask (cropped to its bounding box).

    Holes are filled, the box is padded to a centred square and area-resampled to
    GRID x GRID (scale-free); the fill ratio of the box and its aspect (h / (h + w)) follow.
    """
    mask = ndimage.binary_fill_holes(mask)
    h, w = mask.shape
    s = max(h, w)
    square = np.zeros((s, s), np.float32)
    top, left = (s - h) // 2, (s - w) // 2
    square[top : top + h, left : left + w] = mask
    r = _resample_matrix(s, GRID)
    grid = r @ square @ r.T
    extra = np.array([mask.mean(), h / (h + w)], np.float32)
    return np.concatenate([grid.ravel().astype(np.float32), extra])


@cache
def _weights(path: Path = WEIGHTS) -> tuple[tuple[np.ndarray, ...], tuple[str, ...]]:
    """The MLP's (w1, b1, w2, b2) and class order, read once."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        meta = f.metadata() or {}
        tensors = tuple(f.get_tensor(k).astype(np.float32) for k in ("w1", "b1", "w2", "b2"))
    classes = tuple(meta.get("classes", "").split(","))
    if int(meta.get("grid", -1)) != GRID or tensors[0].shape[1] != N_FEATURES:
        raise ValueError(f"{path}: made for another feature layout (metadata {meta})")
    if sorted(classes) != sorted(SHAPES) or tensors[2].shape[0] != len(classes):
        raise ValueError(f"{path}: classes {classes} are not the toy shapes {SHAPES}")
    return tensors, classes


def classify_shapes(features: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Shape names and class probabilities (N, 4) for features (N, N_FEATURES)."""
    (w1, b1, w2, b2), classes = _weights()
    hidden = np.maximum(features.astype(np.float32) @ w1.T + b1, 0.0)
    logits = hidden @ w2.T + b2
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return [classes[i] for i in probs.argmax(axis=1)], probs


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    return image


def detect(image: np.ndarray) -> list[Detection]:
    """The objects in a uint8 (H, W, 3) image: colour, shape, position, area, centre."""
    image = _check_image(image)
    height, width = image.shape[:2]
    min_area = max(4, round(MIN_AREA_FRACTION * height * width))
    found = components(colour_labels(image), min_area)
    if not found:
        return []
    shapes, _ = classify_shapes(np.stack([shape_features(mask) for _, mask, _ in found]))
    detections = []
    for (k, mask, (rows, cols)), shape in zip(found, shapes, strict=True):
        centre = np.array(
            [(cols.start + cols.stop) / 2 / width, (rows.start + rows.stop) / 2 / height]
        )
        anchor = int(np.argmin(((_ANCHORS - centre) ** 2).sum(axis=1)))
        detections.append(
            Detection(
                colour=COLOUR_NAMES[k],
                shape=shape,
                position=_ANCHOR_NAMES[anchor],
                area=int(mask.sum()),
                centroid=(float(centre[0]), float(centre[1])),
            )
        )
    return detections


def judge(image: np.ndarray, prompt: str) -> Verdict:
    """Whether `image` shows what `prompt` asks for (ValueError if outside the grammar)."""
    wanted = parse_prompt(prompt)
    found = detect(image)

    def hit(i: int, j: int | None) -> bool:
        if j is None:
            return False
        d, o = found[j], wanted[i]
        return (d.colour, d.shape, d.position) == (o.colour, o.shape, o.position)

    # Best one-to-one assignment of detections to named objects (at most two: brute force).
    best: tuple[bool, ...] = (False,) * len(wanted)
    choices = [*range(len(found)), None]
    for pick in itertools.product(choices, repeat=len(wanted)):
        used = [j for j in pick if j is not None]
        if len(used) != len(set(used)):
            continue
        flags = tuple(hit(i, j) for i, j in enumerate(pick))
        if sum(flags) > sum(best):
            best = flags
    count_ok = len(found) == len(wanted)
    return Verdict(prompt, count_ok and all(best), count_ok, best, tuple(found))


def prompt_accuracy(images: Sequence[np.ndarray], prompts: Sequence[str]) -> dict:
    """Fraction of (image, prompt) pairs judged correct: overall, and for one- and
    two-object prompts ("single", "two"; None when a split has no prompts), with counts."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    right: dict[int, list[bool]] = {1: [], 2: []}
    for image, prompt in zip(images, prompts, strict=True):
        verdict = judge(image, prompt)
        right[len(verdict.matched)].append(verdict.correct)

    def frac(values: list[bool]) -> float | None:
        return sum(values) / len(values) if values else None

    return {
        "all": frac(right[1] + right[2]),
        "single": frac(right[1]),
        "two": frac(right[2]),
        "n": len(right[1]) + len(right[2]),
        "n_single": len(right[1]),
        "n_two": len(right[2]),
    }
