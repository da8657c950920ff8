"""Image-to-image on toy:shapes: what `--strength` trades, judged automatically.

    slimdiff export toy:shapes --out /tmp/toy-i2i --vae-encoder
    python tools/img2img_strength.py /tmp/toy-i2i --pairs 24 --steps 20

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
from slimdiff.toy.scenes import COLOURS, POSITIONS, SHAPES, Obj, caption


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
    args = p.parse_args()
    pipe = Text2ImagePipeline.from_bundle(args.bundle, backend=args.backend)
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
    print(
        "\n| strength | steps run | edit accuracy | mean abs diff to source | PSNR to source "
        "(median) | ms per image (median) |\n|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['strength']:g} | {r['steps_run']} | {r['edit_accuracy']:.1%} | "
            f"{r['mean_abs_diff']:.1f} | {r['psnr_db']:.1f} dB | {r['ms_per_image']:.0f} |"
        )


if __name__ == "__main__":
    main()
