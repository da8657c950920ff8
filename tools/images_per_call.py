"""Throughput of several images per call (`run --images N`) against N one-image calls.

    slimdiff export toy:shapes --out /tmp/toy
    python tools/images_per_call.py /tmp/toy --images 4 --steps 20 --repeats 5

Both ways make the same N images (seeds 0..N-1 one call each, or one call of N images
from seed 0: other noise, same work). Repeats alternate the two, so drift on a shared
machine hits both; prints the medians and their ratio as one JSON row.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--backend", default="ort-cpu")
    p.add_argument("--prompt", default="a red circle at the top")
    args = p.parse_args()
    pipe = Text2ImagePipeline.from_bundle(args.bundle, backend=args.backend)
    pipe(args.prompt, steps=args.steps, images=args.images)  # warm-up: every batch size
    pipe(args.prompt, steps=args.steps)
    single, batched = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for seed in range(args.images):
            pipe(args.prompt, steps=args.steps, seed=seed)
        single.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        pipe(args.prompt, steps=args.steps, images=args.images)
        batched.append((time.perf_counter() - t0) * 1e3)
    a, b = statistics.median(single), statistics.median(batched)
    row = {
        "bundle": args.bundle,
        "backend": args.backend,
        "images": args.images,
        "steps": args.steps,
        "repeats": args.repeats,
        "one_image_calls_ms": round(a, 1),
        "one_batched_call_ms": round(b, 1),
        "speedup": round(a / b, 2),
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
