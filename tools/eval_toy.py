"""Prompt accuracy of a toy:shapes pipeline folder in torch (e.g. a training checkpoint).

    python tools/train_toy.py --work toy-train --save-only --out /tmp/toy-ckpt
    python tools/eval_toy.py /tmp/toy-ckpt --images 2 --grid /tmp/toy-ckpt.png

The held-out prompts, `--images` seeds each, judged by `slimdiff.metrics`. For a bundle
(ONNX, the runtime) use `slimdiff bench` with a toy recipe instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimdiff.threads import prepare_process

prepare_process()  # OpenMP threads sleep, not spin, while they wait: before torch loads

import numpy as np  # noqa: E402
import torch  # noqa: E402

from slimdiff.metrics import prompt_accuracy  # noqa: E402
from slimdiff.toy import heldout_prompts  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="pipeline folder, or toy:shapes")
    p.add_argument("--images", type=int, default=1, help="seeds per prompt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grid", default=None, help="also save the images as one PNG")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from slimdiff.models import load_model

    pipe = load_model(args.model).pipe
    pipe.set_progress_bar_config(disable=True)
    prompts = [q for q in heldout_prompts() for _ in range(args.images)]
    images = []
    for i, prompt in enumerate(prompts):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            out = pipe(
                prompt,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                generator=g,
                output_type="np",
            )
        images.append((out.images[0] * 255).round().astype(np.uint8))
    print(json.dumps(prompt_accuracy(images, prompts), indent=2))
    if args.grid:
        from PIL import Image

        cols = 12
        rows = [np.concatenate(images[r : r + cols], 1) for r in range(0, len(images), cols)]
        if rows and rows[-1].shape != rows[0].shape:
            rows[-1] = np.pad(rows[-1], ((0, 0), (0, rows[0].shape[1] - rows[-1].shape[1]), (0, 0)))
        Image.fromarray(np.concatenate(rows, 0)).save(args.grid)


if __name__ == "__main__":
    main()
