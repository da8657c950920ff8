"""The denoising loop of runtime/pipeline.py: one denoiser call and one scheduler step per
timestep, guided as diffusers' pipelines guide (classifier-free guidance with its rescale,
FLUX's true CFG), inpainting's kept region put back after each step.

The pipeline checks the call and prepares the fixed inputs; this file only runs the steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from slimdiff.runtime.backends import Session
from slimdiff.runtime.call_checks import check_finite, check_output
from slimdiff.runtime.manifest import DENOISER_OUTPUT
from slimdiff.runtime.schedulers import Scheduler, takes_noise

__all__ = ["STEP_NOISE_STREAM", "Guidance", "Kept", "denoise", "step_noise_streams"]

STEP_NOISE_STREAM = 1  # seeds the stochastic schedulers' noise apart from the latents'
_NAN_FIX = (
    "try the bundle's own scheduler (no --scheduler/--sigmas/--timestep-spacing), and "
    "latents of unit scale; an fp16 bundle may overflow: export it in fp32"
)

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class Guidance:
    """How a step's predictions combine. `cfg`: the batch holds (uncond, cond) halves,
    mixed with `scale` and rescaled by `rescale` (0: off); `true_cfg` (FLUX): a second
    call on the `negative` text inputs, mixed with that scale (None: off)."""

    cfg: bool
    scale: float
    rescale: float = 0.0
    true_cfg: float | None = None
    negative: Feeds = field(default_factory=dict)

    def predict(self, denoiser: Session, feeds: Feeds, x: np.ndarray) -> np.ndarray:
        """The guided prediction for latents `x`, of their shape."""
        rows = x.shape[0] * (2 if self.cfg else 1)
        pred = _checked(denoiser.run(feeds), (rows, *x.shape[1:]))
        if self.true_cfg is not None:  # FluxPipeline: a second call, not a doubled batch
            neg = _checked(denoiser.run({**feeds, **self.negative}), x.shape)
            pred = neg + np.float32(self.true_cfg) * (pred - neg)
        if self.cfg:
            uncond, text = np.split(pred, 2)  # (uncond, cond), as the pipeline batches them
            pred = uncond + np.float32(self.scale) * (text - uncond)
            if self.rescale > 0:
                pred = rescale_guided(pred, text, np.float32(self.rescale))
        return pred


@dataclass(frozen=True)
class Kept:
    """Inpainting with a model not trained for it: where `mask` is 0 the latents go back to
    the image's (`clean`), noised with `noise` to the next step, as diffusers' inpaint
    pipelines do after each step."""

    mask: np.ndarray
    clean: np.ndarray
    noise: np.ndarray

    def blend(self, scheduler: Scheduler, x: np.ndarray, i: int, last: bool) -> np.ndarray:
        kept = self.clean if last else scheduler.add_noise(self.clean, self.noise, i + 1)
        return (np.float32(1) - self.mask) * kept + self.mask * x


def denoise(
    denoiser: Session,
    scheduler: Scheduler,
    x: np.ndarray,
    steps: range,
    feeds: Callable[[int, np.ndarray], Feeds],
    guidance: Guidance,
    seed: int,
    extra: np.ndarray | None = None,
    kept: Kept | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, list[float]]:
    """Run the scheduler's steps `steps` (indices into its timesteps) from latents `x`;
    returns the final latents and each step's milliseconds.

    `feeds(i, model_input)` gives the denoiser's inputs at step i; `extra` (an inpainting
    model's mask and masked-image latents) is joined to the sample's channels every step.
    Stochastic schedulers' per-step noise comes from streams of their own from `seed`, so the
    initial latents stay those of `seed` whatever the scheduler: one stream per image, so the
    first image of a batch is the image a run of one draws (as diffusers with a list of
    generators; one batch-shaped draw per step would give image 0 other noise from step 2 on).
    Image 0's stream is the one a single image always had."""
    step_rngs = [np.random.default_rng(_stream(seed, row)) for row in range(len(x))]
    step_ms: list[float] = []
    for done, i in enumerate(steps, start=1):
        t0 = time.perf_counter()
        model_input = np.concatenate([x, x]) if guidance.cfg else x
        model_input = scheduler.scale_model_input(model_input, i)
        if extra is not None:  # (B, C, h, w) -> (B, 2C + 1, h, w), as diffusers joins them
            model_input = np.concatenate([model_input, extra], axis=1)
        pred = guidance.predict(denoiser, feeds(i, model_input), x)
        if takes_noise(scheduler, i):
            row = x.shape[1:]
            fresh = np.stack([rng.standard_normal(row, dtype=np.float32) for rng in step_rngs])
            x = scheduler.step(pred, i, x, noise=fresh)
        else:
            x = scheduler.step(pred, i, x)
        check_finite(x, f"in the latents after step {done} of {len(steps)}", _NAN_FIX)
        if kept is not None:
            x = kept.blend(scheduler, x, i, last=i == steps[-1])
        step_ms.append((time.perf_counter() - t0) * 1e3)
        if on_step is not None:
            on_step(done, len(steps))
    return x, step_ms


def _checked(outputs: Feeds, shape: tuple[int, ...]) -> np.ndarray:
    return check_output(outputs[DENOISER_OUTPUT], shape, "denoiser", "latents")


def rescale_guided(guided: np.ndarray, text: np.ndarray, rescale: np.float32) -> np.ndarray:
    """diffusers' rescale_noise_cfg: the guided prediction scaled to the text prediction's
    std (per image, unbiased as torch.std), mixed back with weight `rescale`."""
    axes = tuple(range(1, guided.ndim))
    std_text = text.std(axis=axes, ddof=1, keepdims=True)
    std_cfg = guided.std(axis=axes, ddof=1, keepdims=True)
    rescaled = guided * (std_text / std_cfg)
    return rescale * rescaled + (np.float32(1) - rescale) * guided


def _stream(seed: int, row: int) -> list[int]:
    """The seed of image `row`'s step noise: image 0's is [STEP_NOISE_STREAM, seed], the
    stream single images have drawn from since the runtime's first version."""
    return [STEP_NOISE_STREAM, seed] + ([row] if row else [])


def step_noise_streams(seeds: list[int]) -> list[list[int]]:
    """The step-noise seeds of single-image runs with `seeds` (bench draws its torch
    reference's noise from them, slimdiff/app/reference_noise.py)."""
    return [_stream(seed, 0) for seed in seeds]
