"""`slimdiff bench`: per recipe, compress (cached), export, run; latency, size and quality.

For each recipe, on the same prompts, seeds and initial noise:
- the uncompressed model in torch is the reference (images and final latents, cached);
- the compressed model in torch eager gives the baseline ms/step for the speedup column;
- the bundle runs in the torch-free runtime, in its own process (bench_worker) so its peak
  memory is the runtime's alone: per-stage latency after warm-up (median and p90);
- fidelity: PSNR of images and relative error of final latents against the reference;
- prompt accuracy (recipes with `bench.accuracy`): the held-out prompts, several seeds
  each, drawn by the bundle and by the uncompressed torch model, scored by the judge in
  `slimdiff.metrics` (fraction of images judged fully correct, split by object count).

Writes OUT/results.json, OUT/results.md (one row per recipe), OUT/latency_vs_fidelity.png
and OUT/grid_<recipe>.png (reference row on top, the recipe's images below).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from slimdiff.errors import UserError
from slimdiff.fsutil import atomic_write_text
from slimdiff.metrics import latent_rel_err, psnr
from slimdiff.models.kinds import latent_shape
from slimdiff.recipe import Recipe

__all__ = ["run_bench"]

log = logging.getLogger(__name__)


def run_bench(recipes: list[Recipe], out: str | Path) -> dict[str, Any]:
    """Benchmark `recipes` side by side; returns what it writes to OUT/results.json."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from slimdiff.app.bench_report import write_grid, write_markdown, write_plot

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        raise UserError(f"recipe names repeat ({', '.join(names)}); give each a unique `name`")
    rows = []
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("bench", total=len(recipes) * len(_STAGES))
        for recipe in recipes:
            rows.append(_bench_one(recipe, out, lambda s, r=recipe: _advance(progress, task, r, s)))
    results = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "command": " ".join(["slimdiff", *sys.argv[1:]]) if sys.argv else "",
        "recipes": rows,
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    write_markdown(results, out / "results.md")
    write_plot(results, out / "latency_vs_fidelity.png")
    for row in rows:
        write_grid(row, out / f"grid_{row['name']}.png")
    return results


_STAGES = ("reference", "compress+export", "torch eager", "runtime", "metrics")


def _advance(progress, task, recipe: Recipe, stage: str) -> None:
    progress.update(task, description=f"{recipe.name}: {stage}", advance=1)


def _bench_one(recipe: Recipe, out: Path, step) -> dict[str, Any]:
    from slimdiff.app.flow import compress_and_export
    from slimdiff.inspect import inspect_model
    from slimdiff.models import load_model
    from slimdiff.prompts import BENCH_PROMPTS

    b = recipe.bench
    base = load_model(recipe.model)
    arch, pipe = base.arch, base.require_pipeline("bench")
    size = tuple(b.size or base.default_size)
    guidance = arch.default_guidance if b.guidance is None else b.guidance
    prompts = list(b.prompts or BENCH_PROMPTS)
    vae_scale = pipe.vae_scale_factor
    channels = pipe.vae.config.latent_channels
    kind = arch.kind_for(base.denoiser.config)
    shape = latent_shape(kind, 1, channels, size[0] // vae_scale, size[1] // vae_scale)
    noise = [
        np.random.default_rng(b.seed + i).standard_normal(shape).astype(np.float32)
        for i in range(len(prompts))
    ]
    settings = {
        "model": recipe.model,
        "prompts": prompts,
        "steps": b.steps,
        "size": list(size),
        "guidance": guidance,
        "seed": b.seed,
    }

    ref_dir = out / "_reference" / _key(settings)
    reference = _reference(pipe, settings, noise, ref_dir)
    accuracy = _accuracy_settings(b, settings, shape)
    if accuracy is not None:
        acc_settings, acc_noise = accuracy
        acc_ref_dir = out / "_reference" / _key(acc_settings)
        acc_reference = _reference(pipe, acc_settings, acc_noise, acc_ref_dir)
    step("reference")
    del base, pipe

    work = out / "recipes" / recipe.name
    flow = compress_and_export(recipe, work)
    bundle = flow.bundles["onnx"]
    step("compress+export")

    compressed = load_model(str(flow.artifact))
    info = inspect_model(compressed, size=size)
    eager = _torch_ms_per_step(compressed.pipe, settings, noise[0])
    del compressed
    step("torch eager")

    run_dir = work / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    timings = _run_worker(bundle, settings, noise, b, run_dir)
    if accuracy is not None:
        acc_dir = work / "accuracy"
        acc_dir.mkdir(parents=True, exist_ok=True)
        once = b.model_copy(update={"warmup": 0, "repeat": 1})
        _run_worker(bundle, acc_settings, acc_noise, once, acc_dir)
    step("runtime")

    images = [_read_png(run_dir / f"image_{i}.png") for i in range(len(prompts))]
    latents = [np.load(run_dir / f"latents_{i}.npy") for i in range(len(prompts))]
    psnrs = [psnr(im, ref) for im, ref in zip(images, reference["images"], strict=True)]
    errs = [
        latent_rel_err(lat, ref) for lat, ref in zip(latents, reference["latents"], strict=True)
    ]
    step("metrics")

    runs = timings["runs"]
    steps_ms = [s for r in runs for s in r["denoiser_steps"]]
    row = {
        "name": recipe.name,
        "model": recipe.model,
        "passes": [p.name for p in recipe.passes],
        "precision": recipe.export.precision,
        "backend": b.backend,
        "size": list(size),
        "steps": b.steps,
        "params": info["denoiser"]["params"],
        "total_params": info["total_params"],
        "flops_per_step": info["denoiser"]["flops_per_step"],
        "bytes_on_disk": _bytes(bundle),
        "latency_ms": {
            "text_encoders": _median(r["text_encoders"] for r in runs),
            "denoiser_step": float(np.median(steps_ms)),
            "denoiser_step_p90": float(np.percentile(steps_ms, 90)),
            "vae_decode": _median(r["vae_decode"] for r in runs),
            "end_to_end": _median(r["end_to_end"] for r in runs),
            "end_to_end_p90": float(np.percentile([r["end_to_end"] for r in runs], 90)),
            "load": timings["load_ms"],
        },
        "torch_eager_ms_per_step": eager,
        "speedup_vs_eager": eager / float(np.median(steps_ms)),
        "peak_rss_mb": timings["peak_rss_mb"],
        "fidelity": {
            "psnr_db": float(np.mean(psnrs)),
            "latent_rel_err": float(np.mean(errs)),
            "psnr_db_per_prompt": psnrs,
        },
        "images": [str(run_dir / f"image_{i}.png") for i in range(len(prompts))],
        "reference_images": [str(ref_dir / f"image_{i}.png") for i in range(len(prompts))],
        "cache": flow.reused,
    }
    if accuracy is not None:
        from slimdiff.metrics import prompt_accuracy

        prompts_ = acc_settings["prompts"]
        acc_images = [_read_png(acc_dir / f"image_{i}.png") for i in range(len(prompts_))]
        row["prompt_accuracy"] = prompt_accuracy(acc_images, prompts_)
        row["reference_prompt_accuracy"] = prompt_accuracy(acc_reference["images"], prompts_)
        # Fidelity over the whole held-out set too: 4 bench prompts are a small sample.
        acc_errs = [
            latent_rel_err(np.load(acc_dir / f"latents_{i}.npy"), ref)
            for i, ref in enumerate(acc_reference["latents"])
        ]
        row["fidelity"]["heldout_latent_rel_err"] = float(np.mean(acc_errs))
        row["prompt_accuracy"]["images_per_prompt"] = b.accuracy_images
    return row


def _accuracy_settings(b, settings: dict, shape) -> tuple[dict, list[np.ndarray]] | None:
    """The held-out prompts (each `b.accuracy_images` times) and their initial noise."""
    if b.accuracy is None:
        return None
    from slimdiff.toy import heldout_prompts

    prompts = [p for p in heldout_prompts() for _ in range(b.accuracy_images)]
    # Seeds apart from the fidelity prompts' (b.seed + i), so the two sets never share noise.
    noise = [
        np.random.default_rng([b.seed, 1, i]).standard_normal(shape).astype(np.float32)
        for i in range(len(prompts))
    ]
    return {**settings, "prompts": prompts, "accuracy": b.accuracy}, noise


def _key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _median(values) -> float:
    return float(np.median(list(values)))


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _pipe_kwargs(settings: dict, latents: np.ndarray) -> dict:
    import torch

    h, w = settings["size"]
    return {
        "num_inference_steps": settings["steps"],
        "guidance_scale": settings["guidance"],
        "height": h,
        "width": w,
        "latents": torch.from_numpy(latents),
    }


def _reference(pipe, settings: dict, noise: list[np.ndarray], ref_dir: Path) -> dict:
    """Uncompressed torch outputs for every prompt; cached on disk by settings."""
    import torch

    from slimdiff.runtime.image import save_png

    n = len(settings["prompts"])
    done = ref_dir / "done.json"
    if not done.is_file():
        ref_dir.mkdir(parents=True, exist_ok=True)
        pipe.set_progress_bar_config(disable=True)
        for i, prompt in enumerate(settings["prompts"]):
            final: dict[str, Any] = {}

            def keep(_pipe, _i, _t, kw, final=final):
                final["latents"] = kw["latents"].detach().float().numpy().copy()
                return kw

            with torch.no_grad():
                out = pipe(
                    prompt,
                    output_type="np",
                    callback_on_step_end=keep,
                    **_pipe_kwargs(settings, noise[i]),
                )
            image = (out.images[0] * 255).round().astype(np.uint8)
            save_png(image, ref_dir / f"image_{i}.png")
            np.save(ref_dir / f"latents_{i}.npy", final["latents"])
        atomic_write_text(done, json.dumps(settings))
    return {
        "images": [_read_png(ref_dir / f"image_{i}.png") for i in range(n)],
        "latents": [np.load(ref_dir / f"latents_{i}.npy") for i in range(n)],
    }


def _torch_ms_per_step(pipe, settings: dict, latents: np.ndarray) -> float:
    """Median ms per denoising step of the diffusers pipeline in torch eager (after warm-up)."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    stamps: list[float] = []

    def tick(_pipe, _i, _t, kw):
        stamps.append(time.perf_counter())
        return kw

    with torch.no_grad():
        warm = dict(_pipe_kwargs(settings, latents), num_inference_steps=2)
        pipe(settings["prompts"][0], output_type="latent", **warm)
        start = time.perf_counter()
        pipe(
            settings["prompts"][0],
            output_type="latent",
            callback_on_step_end=tick,
            **_pipe_kwargs(settings, latents),
        )
    # The first interval also covers text encoding; steps after it are pure denoising steps.
    deltas = np.diff([start, *stamps])[1:] if len(stamps) > 1 else np.diff([start, *stamps])
    return float(np.median(deltas) * 1e3)


def _run_worker(bundle: Path, settings: dict, noise, b, run_dir: Path) -> dict:
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


def machine_info() -> dict[str, Any]:
    import os

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    for mod in ("torch", "onnxruntime", "diffusers"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info
