"""Draw a captioned grid of prompts with a bundle through the torch-free runtime.

    python tools/toy_grid.py BUNDLE --out docs/images/toy-shapes-grid.png

Default prompts: 16 toy:shapes prompts, 12 of them from the held-out set (never seen in
training). One seed per prompt (seed = --seed + index), the bundle's default steps unless
--steps is given. Prints the judge's verdict on each tile, to set beside the eye check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimdiff.runtime.pipeline import Text2ImagePipeline

from slimdiff.metrics import judge
from slimdiff.toy import heldout_prompts

PROMPTS = [
    "a green triangle at the top",
    "a red square on the right",
    "a blue circle at the bottom",
    "a large yellow cross in the centre",
    *heldout_prompts("single")[0:24:4],
    *heldout_prompts("two")[0:24:4],
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle")
    p.add_argument("--out", default="docs/images/toy-shapes-grid.png")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cols", type=int, default=4)
    p.add_argument("--scale", type=int, default=3, help="pixel upscaling of each image")
    args = p.parse_args()
    pipe = Text2ImagePipeline.from_bundle(args.bundle, backend="ort-cpu")
    tiles = []
    for i, prompt in enumerate(PROMPTS):
        image = pipe(prompt, steps=args.steps, guidance=args.guidance, seed=args.seed + i).image
        tiles.append(_tile(image, prompt, args.scale))
        verdict = judge(image, prompt)
        seen = ", ".join(f"{d.colour} {d.shape} {d.position}" for d in verdict.detections)
        print(f"{i + 1:2d} {'ok  ' if verdict.correct else 'MISS'} {prompt!r}: judge sees {seen}")
    rows = [
        np.concatenate(tiles[r : r + args.cols], axis=1) for r in range(0, len(tiles), args.cols)
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(out)
    print(f"wrote {out} ({len(PROMPTS)} prompts)")


def _tile(image: np.ndarray, prompt: str, scale: int) -> np.ndarray:
    """The image upscaled (nearest), with its prompt wrapped underneath."""
    h, w = image.shape[:2]
    big = Image.fromarray(image).resize((w * scale, h * scale), Image.NEAREST)
    canvas = Image.new("RGB", (w * scale + 8, h * scale + 40), "white")
    canvas.paste(big, (4, 4))
    words, lines, line = prompt.split(), [], ""
    for word in words:  # wrap to the tile width (the default bitmap font is ~6 px/char)
        if len(line) + len(word) + 1 > (w * scale) // 6:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    ImageDraw.Draw(canvas).multiline_text((4, h * scale + 6), "\n".join(lines), fill="black")
    return np.asarray(canvas)


if __name__ == "__main__":
    main()
