"""Time opening a bundle (verifying it) with every file read, and with the record of files
hashed before (runtime/hash_cache.py): what `slimdiff run` spends before its first step.

    python tools/open_speed.py BUNDLE [--repeat 5]

Both are timed in this one process, alternately, on a warm page cache (the bundle is read
once first), so the ratio is the hashing the record saves, not disk speed. The record lives
in a temporary SLIMDIFF_CACHE, removed at the end. Prints a JSON line and a table row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="open-speed-") as cache:
        os.environ["SLIMDIFF_CACHE"] = cache
        from slimdiff.runtime import hash_cache
        from slimdiff.runtime.bundle_files import open_bundle

        hash_cache.SETTLED_S = -1.0  # record a bundle however recently it was written
        first = open_bundle(args.bundle, reread=True)  # warms the page cache; records
        times: dict[str, list[float]] = {"every file read": [], "recorded": []}
        for _ in range(args.repeat):
            for name, reread in (("every file read", True), ("recorded", False)):
                t0 = time.perf_counter()
                open_bundle(args.bundle, reread=reread)
                times[name].append(time.perf_counter() - t0)
    medians = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "bundle": str(args.bundle),
        "files": len(first.manifest.files),
        "bytes": first.size,
        "median_s": medians,
        "ratio": medians["every file read"] / medians["recorded"],
        "repeat": args.repeat,
    }
    print(json.dumps(result))
    print(
        f"| {args.bundle.name} | {first.size / 1e9:.2f} GB, {result['files']} files | "
        f"{medians['every file read']:.3f} s | {medians['recorded']:.3f} s | "
        f"{result['ratio']:.0f}x |"
    )


if __name__ == "__main__":
    main()
