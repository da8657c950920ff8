"""Prompt accuracy and time of a toy:shapes bundle per scheduler and step count (runtime).

    slimdiff export toy:shapes --out /tmp/toy
    python tools/scheduler_accuracy.py /tmp/toy --runs euler:20 euler-a:20 dpm++2m:10

Each run samples the held-out prompts (`--images` seeds each) through the torch-free
runtime with `--scheduler NAME` and that many steps; the images are judged by
slimdiff.metrics (the toy model's shape/colour/position judge). Prints one JSON row per run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimdiff.runtime import Text2ImagePipeline

from slimdiff.metrics import prompt_accuracy
from slimdiff.toy import heldout_prompts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle")
    p.add_argument("--runs", nargs="+", required=True, help="NAME:STEPS, NAME a --scheduler")
    p.add_argument("--images", type=int, default=1, help="seeds per prompt")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args()
    prompts = [q for q in heldout_prompts() for _ in range(args.images)]
    for run in args.runs:
        name, _, steps = run.rpartition(":")
        pipe = Text2ImagePipeline.from_bundle(args.bundle, scheduler=name)
        images, ms = [], []
        for i, prompt in enumerate(prompts):
            start = time.perf_counter()
            result = pipe(
                prompt, steps=int(steps), guidance=args.guidance, seed=i, size=(args.size,) * 2
            )
            ms.append((time.perf_counter() - start) * 1e3)
            images.append(result.image)
        calls = len(result.timings_ms["denoiser_steps"])  # PNDM: more calls than steps
        accuracy = prompt_accuracy(images, prompts)
        row = {"scheduler": name, "steps": int(steps), "denoiser_calls": calls}
        row |= {"accuracy": accuracy["all"], "n": accuracy["n"]}
        row["median_ms"] = round(statistics.median(ms), 1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
