"""Image-to-image and inpainting on toy:shapes: what `--strength` trades, judged automatically.

    slimdiff export toy:shapes --out /tmp/toy-i2i --vae-encoder
    python tools/img2img_strength.py /tmp/toy-i2i --pairs 24 --steps 20
    python tools/img2img_strength.py /tmp/toy-i2i --pairs 24 --steps 20 --inpaint

With --inpaint each source is one object on one side, and the prompt adds a second object
on the opposite side (a two-object prompt of the grammar): every strength runs twice, with
a mask over the opposite half (inpainting) and without (image-to-image), and the pixel
difference is measured on the kept half only.

Each source is a rendered one-object scene ("a red circle on the left", the training
data's renderer, its own seed); the edit asks for the same shape and place in another
colour. Per strength: how often the judge (slimdiff.metrics.shapes) finds the edited
prompt drawn, how far the result is from the source (mean absolute pixel difference, and
PSNR), the denoiser calls run, and the median milliseconds per image. Prints one JSON row
per strength, then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimdiff.runtime import Text2ImagePipeline

from slimdiff.metrics.shapes import judge
from slimdiff.toy.render import render
from slimdiff.toy.scenes import COLOURS, PAIRS, POSITIONS, SHAPES, Obj, caption


def _pairs(n: int, seed: int) -> list[tuple[np.ndarray, str, str]]:
    """n (source image, its caption, edit prompt) triples: one object, recoloured."""
    rng = np.random.default_rng(seed)
    colours, positions = list(COLOURS), list(POSITIONS)
    pairs = []
    for _ in range(n):
        shape = SHAPES[rng.integers(len(SHAPES))]
        where = positions[rng.integers(len(positions))]
        old, new = rng.choice(len(colours), 2, replace=False)
        source = render((Obj(shape, colours[old], where),), rng)
        before, after = (caption((Obj(shape, colours[c], where),)) for c in (old, new))
        pairs.append((source, before, after))
    return pairs


def _additions(n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """n (source image, mask over the other half, two-object prompt) triples."""
    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    out = []
    for _ in range(n):
        kept, added = PAIRS[rng.integers(len(PAIRS))][:: 1 if rng.random() < 0.5 else -1]
        a, b = rng.choice(len(colours), 2, replace=False)
        first = Obj(SHAPES[rng.integers(len(SHAPES))], colours[a], kept)
        second = Obj(SHAPES[rng.integers(len(SHAPES))], colours[b], added)
        source = render((first,), rng)
        side = source.shape[0]
        mask = np.zeros((side, side), np.uint8)  # white: the half the new object goes to
        half = {"left": np.s_[:, : side // 2], "right": np.s_[:, side // 2 :]}
        half |= {"top": np.s_[: side // 2, :], "bottom": np.s_[side // 2 :, :]}
        mask[half[added]] = 255
        out.append((source, mask, caption((first, second))))
    return out


def _inpaint(pipe, args) -> None:
    rows = []
    cases = _additions(args.pairs, args.seed)
    for strength in args.strengths:
        for masked in (True, False):
            right, kept_diff, ms = [], [], []
            for i, (source, mask, prompt) in enumerate(cases):
                extra = {"mask_image": mask} if masked else {}
                t0 = time.perf_counter()
                image = pipe(
                    prompt, image=source, strength=strength, steps=args.steps, seed=i, **extra
                ).image
                ms.append((time.perf_counter() - t0) * 1e3)
                right.append(judge(image, prompt).correct)
                keep = mask == 0
                diff = np.abs(image[keep].astype(np.float64) - source[keep])
                kept_diff.append(float(diff.mean()))
            row = {
                "strength": strength,
                "mode": "inpaint" if masked else "img2img",
                "accuracy": sum(right) / len(right),
                "kept_half_abs_diff": statistics.mean(kept_diff),
                "ms_per_image": statistics.median(ms),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    head = ("strength", "mode", "two-object accuracy", "mean abs diff on the kept half")
    _table(
        (*head, "ms per image (median)"),
        [
            (
                f"{r['strength']:g}",
                r["mode"],
                f"{r['accuracy']:.1%}",
                f"{r['kept_half_abs_diff']:.1f}",
                f"{r['ms_per_image']:.0f}",
            )
            for r in rows
        ],
    )


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Print a Markdown table."""
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle")
    p.add_argument("--pairs", type=int, default=24)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--strengths", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8, 1.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="ort-cpu")
    p.add_argument("--inpaint", action="store_true", help="add an object in a masked half")
    args = p.parse_args()
    pipe = Text2ImagePipeline.from_bundle(args.bundle, backend=args.backend)
    if args.inpaint:
        _inpaint(pipe, args)
        return
    pairs = _pairs(args.pairs, args.seed)
    # the judge on the sources themselves: right for their captions, wrong for the edits
    own = sum(judge(image, before).correct for image, before, _ in pairs) / len(pairs)
    edit = sum(judge(image, after).correct for image, _, after in pairs) / len(pairs)
    print(json.dumps({"sources_judged_as_captioned": own, "sources_judged_as_edited": edit}))
    pipe(pairs[0][2], image=pairs[0][0], steps=args.steps)  # warm-up (and the encoder's load)
    rows = []
    for strength in args.strengths:
        right, diffs, psnrs, ms, calls = [], [], [], [], 0
        for i, (source, _, prompt) in enumerate(pairs):
            t0 = time.perf_counter()
            result = pipe(prompt, image=source, strength=strength, steps=args.steps, seed=i)
            ms.append((time.perf_counter() - t0) * 1e3)
            calls = len(result.timings_ms["denoiser_steps"])
            right.append(judge(result.image, prompt).correct)
            diffs.append(float(np.abs(result.image.astype(np.float64) - source).mean()))
            psnrs.append(_psnr(result.image, source))
        row = {
            "strength": strength,
            "steps_run": calls,
            "edit_accuracy": sum(right) / len(right),
            "mean_abs_diff": statistics.mean(diffs),
            "psnr_db": statistics.median(psnrs),
            "ms_per_image": statistics.median(ms),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    head = ("strength", "steps run", "edit accuracy", "mean abs diff to source")
    _table(
        (*head, "PSNR to source (median)", "ms per image (median)"),
        [
            (
                f"{r['strength']:g}",
                str(r["steps_run"]),
                f"{r['edit_accuracy']:.1%}",
                f"{r['mean_abs_diff']:.1f}",
                f"{r['psnr_db']:.1f} dB",
                f"{r['ms_per_image']:.0f}",
            )
            for r in rows
        ],
    )


if __name__ == "__main__":
    main()
