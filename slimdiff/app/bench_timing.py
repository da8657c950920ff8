"""The timed side of `slimdiff bench`: torch eager's ms per step, and the bundle's runtime
in its own process (bench_worker.py), driven run by run so the two are timed in pairs."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from slimdiff.errors import UserError


def pipe_kwargs(settings: dict, latents: np.ndarray) -> dict:
    import torch

    h, w = settings["size"]
    return {
        "num_inference_steps": settings["steps"],
        "guidance_scale": settings["guidance"],
        "height": h,
        "width": w,
        "latents": torch.from_numpy(latents),
        **{k: settings[k] for k in ("guidance_rescale",) if k in settings},
    }


def torch_ms_per_step(pipe, settings: dict, latents: np.ndarray, prompt: str) -> float:
    """Median ms per denoising step of one diffusers pipeline run in torch eager.

    A step is timed from the denoiser's first call in it to the end of the step
    (callback_on_step_end), as the runtime times its steps: text encoding and the set-up
    before the first step are in no step, at any step count (at 1 step they were all of it).
    """
    import torch

    from slimdiff.models.families import arch_of_pipeline

    denoiser = getattr(pipe, arch_of_pipeline(pipe).denoiser)
    on_cuda = denoiser.device.type == "cuda"
    starts: list[float] = []
    deltas: list[float] = []

    def stamp() -> float:
        if on_cuda:
            torch.cuda.synchronize()  # the kernels queued so far are done when time is taken
        return time.perf_counter()

    def start(_module, _args):
        if not starts:  # the step's first call (CFG batches one; true CFG makes two)
            starts.append(stamp())

    def tick(_pipe, _i, _t, kw):
        deltas.append(stamp() - starts.pop())
        return kw

    hook = denoiser.register_forward_pre_hook(start)
    try:
        with torch.no_grad():
            pipe(
                prompt,
                output_type="latent",
                callback_on_step_end=tick,
                **pipe_kwargs(settings, latents),
            )
    finally:
        hook.remove()
    return float(np.median(deltas) * 1e3)


def timed_pairs(pipe, bundle: Path, settings: dict, noise, b, run_dir: Path):
    """Torch eager and the runtime timed alternately (A B A B ...), `b.repeat` times over
    every prompt, with the same warm-up: a load on the machine hits both alike. Returns the
    runtime's timings and {"ms_per_step", "speedup", "ratios"} for eager, the speedup being
    the median of the pairs' ratios (eager ms/step over runtime ms/step)."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():  # eager's warm-up, as the worker warms up before it reports ready
        warm = dict(pipe_kwargs(settings, noise[0]), num_inference_steps=2)
        for _ in range(b.warmup):
            pipe(settings["prompts"][0], output_type="latent", **warm)
    eager, ratios = [], []
    with Worker(bundle, settings, noise, b, run_dir) as worker:
        for rep in range(b.repeat):
            for i, prompt in enumerate(settings["prompts"]):
                ms = torch_ms_per_step(pipe, settings, noise[i], prompt)
                run = worker.run(i, save=rep == 0)
                eager.append(ms)
                ratios.append(ms / float(np.median(run["denoiser_steps"])))
    report = worker.report
    return report, {
        "ms_per_step": float(np.median(eager)),
        "speedup": float(np.median(ratios)),
        "ratios": ratios,
    }


class Worker:
    """The bench worker in --serve mode: one runtime run per `run(i)` (bench_worker.py)."""

    def __init__(self, bundle: Path, settings: dict, noise, b, run_dir: Path) -> None:
        self.job_file = write_job(bundle, settings, noise, b, run_dir)
        self.run_dir = run_dir
        self.log = run_dir / "worker.log"
        self.report: dict = {}

    def __enter__(self) -> Worker:
        self._log = open(self.log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "slimdiff.app.bench_worker", str(self.job_file), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self._read()  # {"ready": true}
        return self

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self._fail()
        return json.loads(line)

    def _fail(self):
        self._log.flush()
        err = self.log.read_text().strip()
        if self.proc.returncode == UserError.exit_code:  # the worker's one-line user error
            raise UserError(f"runtime failed: {err.splitlines()[-1].removeprefix('error: ')}")
        raise RuntimeError(f"bench worker failed (exit {self.proc.returncode}):\n{err}")

    def run(self, i: int, save: bool) -> dict:
        self.proc.stdin.write(json.dumps({"run": i, "save": save}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.flush()
                self._read()  # {"done": ...}: timings.json is written
                self.report = json.loads((self.run_dir / "timings.json").read_text())
        finally:
            with contextlib.suppress(OSError):  # a worker that died has closed the pipe
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60 if exc[0] is None else 5)
            except subprocess.TimeoutExpired:  # mid-image when interrupted: no orphan left
                self.proc.kill()
                self.proc.wait()
            self._log.close()


def write_job(bundle: Path, settings: dict, noise, b, run_dir: Path) -> Path:
    paths = []
    for i, lat in enumerate(noise):
        p = run_dir / f"noise_{i}.npy"
        np.save(p, lat)
        paths.append(str(p))
    job = {
        **settings,
        "bundle": str(bundle),
        "backend": b.backend,
        "warmup": b.warmup,
        "repeat": b.repeat,
        "latents": paths,
        "out": str(run_dir),
    }
    job_file = run_dir / "job.json"
    job_file.write_text(json.dumps(job, indent=2))
    return job_file


def run_worker(bundle: Path, settings: dict, noise, b, run_dir: Path) -> dict:
    """The worker's batch mode: every prompt `b.repeat` times (prompt accuracy images)."""
    job_file = write_job(bundle, settings, noise, b, run_dir)
    proc = subprocess.run(
        [sys.executable, "-m", "slimdiff.app.bench_worker", str(job_file)],
        capture_output=True,
        text=True,
    )
    if proc.returncode == UserError.exit_code:  # the worker's one-line user error
        raise UserError(
            f"runtime failed on {bundle}: {proc.stderr.strip().removeprefix('error: ')}"
        )
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker failed on {bundle}:\n{proc.stderr}")
    return json.loads((run_dir / "timings.json").read_text())
