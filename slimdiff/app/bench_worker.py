"""Runtime side of `slimdiff bench`, run in its own process.

It imports only the torch-free runtime, so its peak resident memory is what a deployment
would use, not the benchmark's (which has torch and the reference model loaded). Input is
a job JSON; output is timings.json, one PNG and one final-latents .npy per prompt.

    python -m slimdiff.app.bench_worker JOB.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from slimdiff.errors import UserError
from slimdiff.runtime import Text2ImagePipeline
from slimdiff.runtime.image import save_png


def _peak_rss_mb() -> float:
    # VmHWM: the process's peak resident set size (Linux); 0 where /proc is missing.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def run_job(job: dict) -> dict:
    out = Path(job["out"])
    t0 = time.perf_counter()
    pipe = Text2ImagePipeline.from_bundle(job["bundle"], backend=job["backend"])
    load_ms = (time.perf_counter() - t0) * 1e3
    kwargs = {"steps": job["steps"], "guidance": job["guidance"], "size": tuple(job["size"])}
    latents = [np.load(p) for p in job["latents"]]
    for _ in range(job["warmup"]):
        pipe(job["prompts"][0], latents=latents[0], **kwargs)
    runs = []
    for rep in range(job["repeat"]):
        for i, prompt in enumerate(job["prompts"]):
            result = pipe(prompt, latents=latents[i], seed=job["seed"] + i, **kwargs)
            runs.append(result.timings_ms)
            if rep == 0:
                save_png(result.image, out / f"image_{i}.png")
                np.save(out / f"latents_{i}.npy", result.latents)
    report = {"load_ms": load_ms, "runs": runs, "peak_rss_mb": _peak_rss_mb()}
    (out / "timings.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    try:
        run_job(job)
    except UserError as err:  # bad bundle or settings: one line, exit 2, as the CLI does
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
