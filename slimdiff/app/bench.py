"""`slimdiff bench`: per recipe, compress (cached), export, run; latency, size and quality.

For each recipe, on the same prompts, seeds and initial noise:
- the uncompressed model in torch is the reference (images and final latents, cached by a
  fingerprint of its weights and tokenizers, so a retrained model gets a fresh reference,
  and by the diffusers and torch that draw it);
- the bundle runs in the torch-free runtime, in its own process (bench_worker) so its peak
  memory is the runtime's alone: per-stage latency after warm-up (median and p90);
- the compressed model in torch eager is timed in pairs with the runtime, run for run
  (A B A B, same repeats and warm-up), and the speedup column is the median of the pairs'
  ratios: both sides see the same machine load, which a busy 2-core machine varies by 10x;
- fidelity: PSNR of the images (from their pooled MSE) and relative error of final latents
  against the reference;
- prompt accuracy (recipes with `bench.accuracy`): the held-out prompts, several seeds
  each, drawn by the bundle and by the uncompressed torch model, scored by the judge in
  `slimdiff.metrics` (fraction of images judged fully correct, split by object count).

Writes OUT/results.json, OUT/results.md (one row per recipe), OUT/latency_vs_fidelity.png
and OUT/grid_<recipe>.png (reference row on top, the recipe's images below).
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import logging
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

from slimdiff.app.bench_checks import check_before_loading
from slimdiff.app.bench_timing import pipe_kwargs, run_worker, timed_pairs
from slimdiff.app.reference_noise import prompt_seed, runtime_step_noise
from slimdiff.device import resolve_device
from slimdiff.errors import UserError
from slimdiff.fsutil import atomic_write_text
from slimdiff.metrics import latent_rel_err, psnr
from slimdiff.models.kinds import latent_shape
from slimdiff.recipe import Recipe

__all__ = ["run_bench"]

log = logging.getLogger(__name__)


def run_bench(
    recipes: list[Recipe], out: str | Path, device: str | None = None, allow_pickle: bool = False
) -> dict[str, Any]:
    """Benchmark `recipes` side by side; returns what it writes to OUT/results.json.

    `device` (default: each recipe's `device:`) is where torch work runs: the reference,
    compression, calibration and the torch eager timings.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from slimdiff.app.bench_report import write_grid, write_markdown, write_plot
    from slimdiff.app.flow import check_outputs
    from slimdiff.locks import exclusive
    from slimdiff.runtime.backends import get_backend

    out = Path(out)
    names = [r.name for r in recipes]
    if "" in names:
        raise UserError("a recipe has an empty `name`; bench names each recipe's folder after it")
    if len(set(names)) != len(names):
        raise UserError(f"recipe names repeat ({', '.join(names)}); give each a unique `name`")
    # Everything that can be refused is refused before the first model loads.
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder for the bench results")
    devices = {r.name: resolve_device(device or r.device) for r in recipes}
    for r in recipes:
        get_backend(r.bench.backend)
        bundle_target(r.bench.backend, r.export.targets)
        check_outputs(r, out / "recipes" / r.name)
        check_before_loading(r)
        if r.export.controlnet is not None:
            # its fidelity would need a control image per prompt and a torch ControlNet
            # pipeline as the reference; text-to-image rows would measure scale 0 only
            raise UserError(
                f"recipe {r.name}: bench does not take export.controlnet yet (its prompts "
                "have no control images); bench the recipe without it"
            )
    with exclusive(out):  # one bench per folder: a second one stops at once
        rows = []
        columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
        with Progress(*columns, transient=False, console=Console(stderr=True)) as progress:
            task = progress.add_task("bench", total=len(recipes) * len(_STAGES))
            for recipe in recipes:
                advance = functools.partial(_advance, progress, task, recipe)
                try:
                    row = _bench_one(recipe, out, advance, devices[recipe.name], allow_pickle)
                except UserError as err:  # the others still run; the table says which failed
                    log.error("recipe %s failed: %s", recipe.name, err)
                    row = {"name": recipe.name, "error": str(err)}
                rows.append(row)
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
            if "error" not in row:
                write_grid(row, out / f"grid_{row['name']}.png")
            else:  # what an earlier run measured must not sit beside the failure
                _remove_outputs(out, row["name"])
        failed = [row["name"] for row in rows if "error" in row]
        if failed:
            raise UserError(
                f"{len(failed)} of {len(rows)} recipes failed ({', '.join(failed)}; why: "
                f"{out / 'results.md'}); the others' results are written, and a rerun reuses "
                "their cached work"
            )
        return results


_STAGES = ("reference", "compress+export", "torch eager vs runtime", "accuracy", "metrics")


def _advance(progress, task, recipe: Recipe, stage: str) -> None:
    progress.update(task, description=f"{recipe.name}: {stage}", advance=1)


def _bench_one(recipe: Recipe, out: Path, step, device: str, allow_pickle: bool) -> dict[str, Any]:
    from slimdiff.app.flow import (
        compress_and_export,
        ship_scheduler,
        shipped_scheduler,
        use_threads,
    )
    from slimdiff.denoise import check_guidance_rescale
    from slimdiff.inspect import check_size, inspect_model
    from slimdiff.models import load_model
    from slimdiff.models.fingerprint import fingerprint
    from slimdiff.models.kinds import refuse_inpainting
    from slimdiff.prompts import BENCH_PROMPTS

    b = recipe.bench
    base = load_model(recipe.model, device=device, allow_pickle=allow_pickle)
    refuse_inpainting(base.denoiser.config, "bench", base.arch.kind_for(base.denoiser.config))
    threads = use_threads(base)  # the worker subprocess inherits it (SLIMDIFF_THREADS)
    arch, pipe = base.arch, base.require_pipeline("bench")
    size = tuple(b.size or base.default_size)
    check_size(base, size, "bench.size")  # a hub id's, before the reference is drawn
    # Passes that define the model rather than compress it (lora.fuse) shape the reference
    # too; compress then loads the model afresh, so they are not applied twice.
    defining = _reference_passes(recipe, pipe)
    check_guidance_rescale(type(pipe), b.guidance_rescale, "bench.guidance_rescale")
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
    shipped = shipped_scheduler(recipe)
    settings = {
        "model": recipe.model,
        "prompts": prompts,
        "steps": b.steps,
        "size": list(size),
        "guidance": guidance,
        "seed": b.seed,
        # only when set, so the references of recipes without them keep their cache keys
        **({"guidance_rescale": b.guidance_rescale} if b.guidance_rescale > 0 else {}),
        **({"scheduler": shipped} if shipped else {}),
    }
    # The reference cache is keyed by what the model is (its weights and configs), so a
    # retrained folder at the same path gets a fresh reference.
    # The libraries that draw it too: another diffusers or torch may sample otherwise.
    # "step_noise": a stochastic scheduler's reference adds the runtime's step noise (older
    # references added unseeded torch noise: not reused).
    model_key = {
        "fingerprint": fingerprint(pipe),
        "device": device,
        "step_noise": "runtime",
        **_reference_versions(),
    }

    ref_dir = out / "_reference" / _key({**settings, "model": model_key})
    own = pipe.scheduler
    ship_scheduler(base, shipped)  # the reference samples as the bundle will
    reference = _reference(pipe, settings, noise, ref_dir, b.reference_batch)
    accuracy = _accuracy_settings(b, settings, shape)
    if accuracy is not None:
        acc_settings, acc_noise = accuracy
        acc_ref_dir = out / "_reference" / _key({**acc_settings, "model": model_key})
        acc_reference = _reference(pipe, acc_settings, acc_noise, acc_ref_dir, b.reference_batch)
    pipe.scheduler = own  # compress keeps the model's (export ships the other)
    step("reference")
    del pipe

    work = out / "recipes" / recipe.name
    if defining:
        base = None  # changed by the defining passes: freed before compress reloads it
    flow = compress_and_export(recipe, work, device=device, model=base)
    del base
    bundle = flow.bundles[bundle_target(b.backend, recipe.export.targets)]
    step("compress+export")

    compressed = load_model(str(flow.artifact), device=device)
    # FLOPs of the call that runs: the CFG batch of 2 only where the pipeline batches it
    info = inspect_model(compressed, size=size, batch=cfg_batch(arch, compressed, guidance))
    run_dir = work / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    ship_scheduler(compressed, shipped)
    timings, eager = timed_pairs(compressed.pipe, bundle, settings, noise, b, run_dir)
    del compressed
    step("torch eager vs runtime")

    if accuracy is not None:
        acc_dir = work / "accuracy"
        acc_dir.mkdir(parents=True, exist_ok=True)
        once = b.model_copy(update={"warmup": 0, "repeat": 1})
        run_worker(bundle, acc_settings, acc_noise, once, acc_dir)
    step("accuracy")

    images = [_read_png(run_dir / f"image_{i}.png") for i in range(len(prompts))]
    latents = [np.load(run_dir / f"latents_{i}.npy") for i in range(len(prompts))]
    psnrs = [psnr(im, ref) for im, ref in zip(images, reference["images"], strict=True)]
    errs = [
        latent_rel_err(lat, ref) for lat, ref in zip(latents, reference["latents"], strict=True)
    ]
    step("metrics")

    runs = timings["runs"]
    steps_ms = [s for r in runs for s in r["denoiser_steps"]]
    rate = _matmul_rate(_runtime_device(b.backend, device), threads)
    row = {
        "name": recipe.name,
        "model": recipe.model,
        "passes": [p.name for p in recipe.passes],
        "precision": recipe.export.precision,
        "backend": b.backend,
        "device": device,
        "threads": threads,
        "size": list(size),
        "steps": b.steps,
        "guidance": guidance,
        "guidance_rescale": b.guidance_rescale,
        "params": info["denoiser"]["params"],
        "total_params": info["total_params"],
        "flops_per_step": info["denoiser"]["flops_per_step"],
        "denoiser_batch": info["batch"],
        "bytes_on_disk": _bytes(bundle),
        "denoiser_bytes": _bytes(bundle / arch.denoiser),
        "latency_ms": {
            "text_encoders": _median(r["text_encoders"] for r in runs),
            "denoiser_step": float(np.median(steps_ms)),
            "denoiser_step_p90": float(np.percentile(steps_ms, 90)),
            "vae_decode": _median(r["vae_decode"] for r in runs),
            "end_to_end": _median(r["end_to_end"] for r in runs),
            "end_to_end_p90": float(np.percentile([r["end_to_end"] for r in runs], 90)),
            "load": timings["load_ms"],
        },
        "torch_eager_ms_per_step": eager["ms_per_step"],
        # Median over (eager, runtime) pairs timed back to back, so both saw the same load.
        "speedup_vs_eager": eager["speedup"],
        "speedup_pairs": eager["ratios"],
        "peak_rss_mib": timings["peak_rss_mib"],
        "matmul_tflops": rate["tflops"],
        # How far the step is from the device's matrix rate on its FLOPs (None when the
        # precision is simulated: no time to divide by).
        "flop_floor_fraction": None
        if _simulated(recipe)
        else info["denoiser"]["flops_per_step"]
        / (float(np.median(steps_ms)) / 1e3)
        / (rate["tflops"] * 1e12),
        "fidelity": {
            "psnr_db": pooled_psnr(images, reference["images"]),
            "latent_rel_err": float(np.mean(errs)),
            "psnr_db_per_prompt": psnrs,
        },
        "images": [str(run_dir / f"image_{i}.png") for i in range(len(prompts))],
        "reference_images": [str(ref_dir / f"image_{i}.png") for i in range(len(prompts))],
        "cache": flow.reused,
    }
    simulated = _simulated(recipe)
    if simulated:
        row["simulated"] = simulated
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
        # The image PSNR over the same held-out images: the 4 bench prompts' mean moves by
        # about 2 dB between two runs of one 4-bit recipe; 192 images do not.
        row["fidelity"]["heldout_psnr_db"] = pooled_psnr(acc_images, acc_reference["images"])
        row["prompt_accuracy"]["images_per_prompt"] = b.accuracy_images
    return row


def cfg_batch(arch, model, guidance: float) -> int:
    """The batch the denoiser is called with: 2 under classifier-free guidance, which the
    pipelines (diffusers' and the runtime's) use only where the family does, the denoiser
    does not take the guidance scale as an input (FLUX.1-dev, LCM UNets), and guidance > 1."""
    return 2 if arch.uses_cfg_for(model.denoiser.config) and guidance > 1.0 else 1


def pooled_psnr(images: list[np.ndarray], references: list[np.ndarray]) -> float:
    """PSNR of a set of images from their pooled MSE (one dB value over every pixel of every
    image): a mean of per-image dB values lets one identical image (capped at 100 dB) lift
    the figure by tens of dB; the pooled MSE weighs each pixel's error once."""
    return psnr(np.stack(images), np.stack(references))


def _remove_outputs(out: Path, name: str) -> None:
    """A failed recipe's outputs of an earlier run: its grid, and its run's images and
    timings (recipes/NAME/run, /accuracy), which the failure row does not point to.
    The caches (artifact, bundles, work) stay for the next run."""
    import shutil

    (out / f"grid_{name}.png").unlink(missing_ok=True)
    for sub in ("run", "accuracy"):
        folder = out / "recipes" / name / sub
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder)


# The export target whose bundle each backend runs, best first.
_BACKEND_TARGETS = {"trt": ("tensorrt", "onnx"), "trt-rtx": ("onnx", "tensorrt"), "aoti": ("aoti",)}


def bundle_target(backend: str, targets: list[str]) -> str:
    """The recipe's export target that `backend` benches; a UserError when it has none."""
    wanted = _BACKEND_TARGETS.get(backend, ("onnx",))
    for target in wanted:
        if target in targets:
            return target
    raise UserError(
        f"bench backend {backend} runs a {wanted[0]} bundle, and the recipe exports only "
        f"{', '.join(targets)}; add {wanted[0]} to export.targets"
    )


@functools.cache
def _matmul_rate(device: str, threads: int | None) -> dict[str, Any]:
    from slimdiff.metrics.matmul_rate import matmul_tflops

    return matmul_tflops(device, threads)


def _runtime_device(backend: str, torch_device: str) -> str:
    """Where a runtime backend computes: the CPU for ort-cpu, the GPU for the CUDA and
    TensorRT backends, and for aoti where its package was compiled: where the recipe's
    torch work runs (the exporter compiles on the model's device)."""
    if backend == "aoti":
        return "cuda" if torch_device.startswith("cuda") else "cpu"
    return "cpu" if backend == "ort-cpu" else "cuda"


def _simulated(recipe: Recipe) -> str | None:
    """Why this recipe's latency is not the speed of its precision, if it is not: 4-bit
    activations have no integer kernel on ORT-CPU, so the graph emulates them (a clip to
    16 levels before 8-bit Q/DQ) on the int8 kernels."""
    for entry in recipe.passes:
        if entry.name == "quant.quest" and getattr(entry.config, "activations", None) == "int4":
            return "4-bit activations run as int8 kernels (ORT-CPU has no 4-bit activation kernel)"
    return None


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


def _reference_passes(recipe: Recipe, pipe) -> list[str]:
    """Apply the recipe's passes that define the model (Pass.applies_to_reference) to the
    reference pipeline; their names."""
    from slimdiff.compress.base import build_passes

    defining = [p for p in build_passes(recipe) if p.applies_to_reference]
    for p in defining:
        p.preflight(pipe, None)
        p.apply(pipe, None)
    return [p.name for p in defining]


def _reference(
    pipe, settings: dict, noise: list[np.ndarray], ref_dir: Path, batch: int = 1
) -> dict:
    """Uncompressed torch outputs for every prompt, `batch` prompts a pipeline call (each
    with its own noise); cached on disk by settings."""
    import torch

    from slimdiff.runtime.image import save_png

    prompts = settings["prompts"]
    n = len(prompts)
    done = ref_dir / "done.json"
    if not done.is_file():
        ref_dir.mkdir(parents=True, exist_ok=True)
        pipe.set_progress_bar_config(disable=True)
        for first in range(0, n, batch):
            chunk = range(first, min(first + batch, n))
            final: dict[str, Any] = {}

            def keep(_pipe, _i, _t, kw, final=final):
                final["latents"] = kw["latents"].detach().float().cpu().numpy().copy()
                return kw

            latents = np.concatenate([noise[i] for i in chunk])
            # each image's step noise is the one its runtime run draws (bench_worker's seeds)
            seeds = [prompt_seed(settings["seed"], i) for i in chunk]
            with torch.no_grad(), runtime_step_noise(pipe.scheduler, seeds):
                out = pipe(
                    [prompts[i] for i in chunk],
                    output_type="np",
                    callback_on_step_end=keep,
                    **pipe_kwargs(settings, latents),
                )
            for row, i in enumerate(chunk):
                image = (out.images[row] * 255).round().astype(np.uint8)
                save_png(image, ref_dir / f"image_{i}.png")
                np.save(ref_dir / f"latents_{i}.npy", final["latents"][row : row + 1])
        atomic_write_text(done, json.dumps(settings))
    return {
        "images": [_read_png(ref_dir / f"image_{i}.png") for i in range(n)],
        "latents": [np.load(ref_dir / f"latents_{i}.npy") for i in range(n)],
    }


def _reference_versions() -> dict[str, str]:
    import diffusers
    import torch

    return {"diffusers": diffusers.__version__, "torch": torch.__version__}


def machine_info() -> dict[str, Any]:
    import os

    import slimdiff

    info = {
        "slimdiff": slimdiff.__version__,
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
