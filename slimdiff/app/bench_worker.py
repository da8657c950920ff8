"""Runtime side of `slimdiff bench`, run in its own process.

It imports only the torch-free runtime, so its peak resident memory is what a deployment
would use, not the benchmark's (which has torch and the reference model loaded). Input is
a job JSON; outputs are one PNG and one final-latents .npy per prompt, and timings.json.

    python -m slimdiff.app.bench_worker JOB.json           # every prompt, `repeat` times
    python -m slimdiff.app.bench_worker JOB.json --serve   # one run per request (below)

With `--serve` the bench drives the runs itself, so the runtime's and torch eager's can
interleave (A B A B) and be compared pair by pair under the same machine load: the worker
loads the bundle, warms up, prints {"ready": ...} on stdout, then answers each stdin line
{"run": i, "save": bool} with one line of that run's timings, until {"quit": true}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from slimdiff.threads import prepare_process

prepare_process()  # before anything imports an OpenMP library (see slimdiff/threads.py)

import numpy as np  # noqa: E402

from slimdiff.app.reference_noise import prompt_seed  # noqa: E402
from slimdiff.errors import UserError  # noqa: E402
from slimdiff.memory import peak_rss_mib  # noqa: E402
from slimdiff.runtime import Text2ImagePipeline  # noqa: E402
from slimdiff.runtime.image import save_png  # noqa: E402


class _Job:
    def __init__(self, job: dict) -> None:
        self.job = job
        self.out = Path(job["out"])
        t0 = time.perf_counter()
        self.pipe = Text2ImagePipeline.from_bundle(job["bundle"], backend=job["backend"])
        self.load_ms = (time.perf_counter() - t0) * 1e3
        self.kwargs = {
            "steps": job["steps"],
            "guidance": job["guidance"],
            "size": tuple(job["size"]),
            "guidance_rescale": job.get("guidance_rescale", 0.0),
        }
        self.latents = [np.load(p) for p in job["latents"]]
        for _ in range(job["warmup"]):
            self.pipe(job["prompts"][0], latents=self.latents[0], **self.kwargs)

    def run(self, i: int, save: bool) -> dict:
        result = self.pipe(
            self.job["prompts"][i],
            latents=self.latents[i],
            seed=prompt_seed(self.job["seed"], i),
            **self.kwargs,
        )
        if save:
            save_png(result.image, self.out / f"image_{i}.png")
            np.save(self.out / f"latents_{i}.npy", result.latents)
        return result.timings_ms

    def finish(self, runs: list[dict]) -> dict:
        report = {"load_ms": self.load_ms, "runs": runs, "peak_rss_mib": peak_rss_mib()}
        (self.out / "timings.json").write_text(json.dumps(report, indent=2))
        return report


def run_job(job: dict) -> dict:
    """Every prompt, `repeat` times (the first repeat saves images and latents)."""
    worker = _Job(job)
    runs = [
        worker.run(i, save=rep == 0)
        for rep in range(job["repeat"])
        for i in range(len(job["prompts"]))
    ]
    return worker.finish(runs)


def _send(stdout, message: dict) -> None:
    """One protocol line to the bench (the worker's stdout carries nothing else)."""
    stdout.write(json.dumps(message) + "\n")
    stdout.flush()


def serve(job: dict, stdin=sys.stdin, stdout=sys.stdout) -> dict:
    """One run per request line (see module docstring)."""
    worker = _Job(job)
    _send(stdout, {"ready": True, "load_ms": worker.load_ms})
    runs = []
    for line in stdin:
        request = json.loads(line)
        if request.get("quit"):
            break
        runs.append(worker.run(int(request["run"]), bool(request.get("save"))))
        _send(stdout, runs[-1])
    report = worker.finish(runs)
    _send(stdout, {"done": True, "peak_rss_mib": report["peak_rss_mib"]})
    return report


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    try:
        serve(job) if "--serve" in argv[1:] else run_job(job)
    except UserError as err:  # bad bundle or settings: one line, exit 2, as the CLI does
        sys.stderr.write(f"error: {err}\n")
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
