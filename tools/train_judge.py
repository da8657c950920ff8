"""Train the toy:shapes judge's shape classifier and write its weights.

    python tools/train_judge.py [--out slimdiff/metrics/shape_classifier.safetensors]

Each sample is one shape drawn on a toy background (any colour, size, position), made to
look like a diffusion model's output (soft edges, colour shift, noise, stray blobs), then
pushed through the judge's own colour segmentation (with a jittered chroma threshold),
roughened at the mask edges (erosion, dilation, flipped edge pixels) and turned into
`shape_features`, so the MLP learns on exactly what it sees at inference. CPU, one
thread, fixed seeds: the same weights on every run (bit for bit; only the order of the
metadata in the file header may vary).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from scipy import ndimage

from slimdiff.metrics.shapes import (
    COLOUR_NAMES,
    GRID,
    MIN_AREA_FRACTION,
    WEIGHTS,
    colour_labels,
    components,
    shape_features,
)
from slimdiff.toy import COLOURS, POSITIONS, SHAPES, render, shape_mask

__all__ = ["main", "make_samples", "train"]

SIDES = (48, 64, 64, 64, 96)


def _image(rng: np.random.Generator, shape: str, colour: str) -> np.ndarray:
    """One shape on a toy background, degraded like a generated image."""
    side = int(rng.choice(SIDES))
    if rng.random() < 0.8:  # at an anchor with the renderer's jitter, else anywhere
        fx, fy = POSITIONS[tuple(POSITIONS)[rng.integers(len(POSITIONS))]]
        cx, cy = (np.array([fx, fy]) + rng.uniform(-0.06, 0.06, 2)) * side
    else:
        cx, cy = rng.uniform(0.15, 0.85, 2) * side
    extent = side * rng.uniform(0.2, 0.46)
    alpha = shape_mask(shape, cx, cy, extent, side)
    if rng.random() < 0.7:  # soft edges
        alpha = ndimage.gaussian_filter(alpha, rng.uniform(0.3, 1.3))
    img = render((), rng, side).astype(np.float32)
    rgb = np.asarray(COLOURS[colour], np.float32) + rng.uniform(-25, 25, 3)
    img = img * (1 - alpha[..., None]) + np.clip(rgb, 0, 255) * alpha[..., None]
    for _ in range(rng.poisson(0.7)):  # stray blobs of any colour
        bx, by = rng.uniform(0, side, 2)
        yy, xx = np.mgrid[:side, :side]
        blob = np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * rng.uniform(0.6, 1.6) ** 2))
        tint = np.asarray(COLOURS[COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]], np.float32)
        img = img * (1 - blob[..., None]) + tint * blob[..., None]
    img = img + rng.uniform(-15, 15, 3) + rng.normal(0, rng.uniform(0, 8), img.shape)  # cast, noise
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _roughen(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Edge damage a generated image's mask may show: erosion, dilation, flipped pixels."""
    mask = np.pad(mask, 1)
    u = rng.random()
    if u < 0.15 and mask.sum() > 150:
        mask = ndimage.binary_erosion(mask)
    elif u < 0.3:
        mask = ndimage.binary_dilation(mask)
    if rng.random() < 0.4:
        inner = mask & ~ndimage.binary_erosion(mask)
        outer = ndimage.binary_dilation(mask) & ~mask
        p = rng.uniform(0.05, 0.25)
        mask = (
            mask ^ (inner & (rng.random(mask.shape) < p)) ^ (outer & (rng.random(mask.shape) < p))
        )
    lab, n = ndimage.label(mask)  # keep the main piece, as the judge's components would
    if n > 1:
        mask = lab == 1 + np.bincount(lab.ravel())[1:].argmax()
    rows, cols = np.nonzero(mask)
    return mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def make_samples(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n (features, shape index) pairs, classes balanced in expectation."""
    feats, targets = [], []
    while len(feats) < n:
        s = int(rng.integers(len(SHAPES)))
        k = int(rng.integers(len(COLOUR_NAMES)))
        img = _image(rng, SHAPES[s], COLOUR_NAMES[k])
        min_area = round(MIN_AREA_FRACTION * img.shape[0] * img.shape[1])
        found = components(colour_labels(img, rng.uniform(40, 100)), min_area)
        mine = [mask for c, mask, _ in found if c == k]
        if not mine:  # washed out below the threshold: nothing the judge would see
            continue
        feats.append(shape_features(_roughen(mine[0], rng)))
        targets.append(s)
    return np.stack(feats), np.array(targets, np.int64)


def train(
    x: np.ndarray, y: np.ndarray, epochs: int, seed: int, hidden: int
) -> dict[str, np.ndarray]:
    """Fit a one-hidden-layer MLP (Adam, cross-entropy); returns float32 w1, b1, w2, b2."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, len(SHAPES))
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(128):
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    first, last = model[0], model[2]
    return {
        name: t.detach().numpy().astype(np.float32).copy()
        for name, t in (
            ("w1", first.weight),
            ("b1", first.bias),
            ("w2", last.weight),
            ("b2", last.bias),
        )
    }


def _predict(w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    hidden = np.maximum(x @ w["w1"].T + w["b1"], 0.0)
    return (hidden @ w["w2"].T + w["b2"]).argmax(axis=1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=WEIGHTS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--hidden", type=int, default=32)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    x, y = make_samples(args.samples, np.random.default_rng([args.seed, 0]))
    x_test, y_test = make_samples(
        max(1000, args.samples // 4), np.random.default_rng([args.seed, 1])
    )
    made = time.perf_counter()
    weights = train(x, y, args.epochs, args.seed, args.hidden)
    done = time.perf_counter()
    train_acc = float((_predict(weights, x) == y).mean())
    test_acc = float((_predict(weights, x_test) == y_test).mean())
    print(f"samples {made - start:.1f}s, training {done - made:.1f}s")
    print(f"accuracy: train {train_acc:.4f}, held-out {test_acc:.4f} ({len(y_test)} samples)")
    for s, name in enumerate(SHAPES):
        sel = y_test == s
        print(f"  {name:9s} {(_predict(weights, x_test[sel]) == s).mean():.4f}")
    metadata = {
        "grid": str(GRID),
        "classes": ",".join(SHAPES),
        "features": f"{GRID}x{GRID} area-resampled mask, fill ratio, h/(h+w)",
        "hidden": str(args.hidden),
        "seed": str(args.seed),
        "samples": str(args.samples),
        "epochs": str(args.epochs),
        "heldout_accuracy": f"{test_acc:.4f}",
        "made_by": "tools/train_judge.py",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(args.out), metadata=metadata)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
