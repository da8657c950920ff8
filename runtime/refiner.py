"""The SDXL refiner's pieces of a run: its aesthetic scores, and the hand-off of a base
model's partly denoised latents to it (SDXL's "ensemble of expert denoisers").

Ports of diffusers' StableDiffusionXL(Img2Img)Pipeline (0.42): `aesthetic_score` and
`negative_aesthetic_score` (the refiner's time ids carry them where SDXL's carry the
target size), `denoising_end` (the base stops at that fraction of the schedule and returns
its latents) and `denoising_start` (the refiner takes those latents as they are, no noise
added, and runs the rest). Both fractions cut the schedule where the pipelines do: at the
training timestep round(T - fraction x T), T the scheduler's num_train_timesteps.

Example:
    >>> base = Text2ImagePipeline.from_bundle("sdxl-base")                     # doctest: +SKIP
    >>> refiner = Text2ImagePipeline.from_bundle("sdxl-refiner")               # doctest: +SKIP
    >>> _, out = run_ensemble(base, refiner, "a lion", steps=40)              # doctest: +SKIP
    >>> out.image.shape                                                        # doctest: +SKIP
    (1024, 1024, 3)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from slimdiff.runtime.manifest import PipelineSpec
from slimdiff.runtime.schedulers import Scheduler

from slimdiff.errors import UserError
from slimdiff.models.kinds import AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE

__all__ = [
    "REFINER_START",
    "check_aesthetic",
    "check_fraction",
    "check_pair",
    "end_index",
    "run_ensemble",
    "start_index",
]

REFINER_START = 0.8  # diffusers' example: the base denoises the first 80% ("high_noise_frac")
# What the refiner's call shares with the base's (the rest steers the base's start: the
# image, its strength, the initial noise, ControlNets, the size, which the latents carry).
_SHARED = ("negative_prompt", "guidance", "seed", "guidance_rescale", "eta", "images")
_MAX_SCORE = 10.0  # the LAION aesthetic predictor's scale, which the refiner was trained on


def check_aesthetic(
    config: PipelineSpec, score: float | None, negative: float | None
) -> tuple[float, float] | None:
    """(negative, positive) aesthetic scores for a refiner bundle (diffusers' defaults 2.5
    and 6.0 where not given); None for any other bundle, which is refused a score."""
    given = [v for v in (score, negative) if v is not None]
    if not config.kind.aesthetic_score:
        if given:
            raise UserError(
                "aesthetic scores condition the SDXL refiner only; this bundle's denoiser "
                "takes none: leave out aesthetic_score / negative_aesthetic_score"
            )
        return None
    for value in given:
        number = _number(value, "aesthetic score")
        if not 0 <= number <= _MAX_SCORE:
            raise UserError(
                f"aesthetic score {value}: use a value from 0 to {_MAX_SCORE:g} (the LAION "
                "aesthetic scale the refiner was trained on; diffusers' defaults: 6 and 2.5)"
            )
    return (
        NEGATIVE_AESTHETIC_SCORE if negative is None else float(negative),
        AESTHETIC_SCORE if score is None else float(score),
    )


def check_fraction(value: float | None, name: str) -> float | None:
    """`value` as a float strictly between 0 and 1 (None passes)."""
    if value is None:
        return None
    number = _number(value, name)
    if not 0 < number < 1:
        raise UserError(
            f"{name} {value}: use a fraction of the schedule strictly between 0 and 1 "
            "(0.8: the base denoises the first 80%, the refiner the rest)"
        )
    return number


def _number(value: object, name: str) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UserError(f"{name} {value!r} is not a number") from None
    if isinstance(value, bool) or not np.isfinite(number):
        raise UserError(f"{name} {value!r} is not a finite number")
    return number


def _cutoff(fraction: float, train_steps: int) -> int:
    return round(train_steps - fraction * train_steps)


def end_index(scheduler: Scheduler, begin: int, fraction: float, train_steps: int) -> int:
    """One past the last scheduler call of a run that stops at `fraction` of the schedule
    (diffusers' denoising_end: the calls from `begin` whose timestep is at or above the
    cutoff). UserError when that leaves no call."""
    timesteps = np.asarray(scheduler.timesteps)[begin:]
    count = int(np.sum(timesteps >= _cutoff(fraction, train_steps)))
    if count == 0:
        raise UserError(
            f"denoising_end {fraction:g} stops before the first step that runs; raise it"
        )
    return begin + count


def start_index(scheduler: Scheduler, fraction: float, train_steps: int) -> int:
    """The first scheduler call of a run that takes over at `fraction` of the schedule
    (diffusers' get_timesteps with denoising_start: the calls below the cutoff, one more
    for a second-order scheduler so that no Heun step is cut in half), set as the
    scheduler's begin index. UserError when no call is left."""
    timesteps = np.asarray(scheduler.timesteps)
    count = int(np.sum(timesteps < _cutoff(fraction, train_steps)))
    if count == 0:
        raise UserError(
            f"denoising_start {fraction:g} leaves no step of this schedule to run; lower it "
            "or raise the steps"
        )
    if scheduler.order == 2 and count % 2 == 0:
        count = min(count + 1, len(timesteps))
    begin = len(timesteps) - count
    try:
        scheduler.set_begin_index(begin)
    except ValueError as err:  # PNDM's Runge-Kutta start cannot begin mid-schedule
        raise UserError(f"denoising_start {fraction:g}: {err}") from None
    return begin


def check_pair(base: Any, refiner: Any) -> None:
    """UserError unless `refiner` is an SDXL refiner's pipeline whose latents are `base`'s
    (same channels, VAE scale and layout) and `base` is not one."""
    if not refiner.config.kind.aesthetic_score:
        raise UserError(
            "the refiner bundle is not an SDXL refiner's (its UNet takes no aesthetic score); "
            "export stabilityai/stable-diffusion-xl-refiner-1.0 (or a fine-tune of it)"
        )
    if base.config.kind.aesthetic_score:
        raise UserError(
            "the base bundle is itself an SDXL refiner: pass the base model's bundle, and "
            "the refiner's as the refiner"
        )
    layout = ("latent_channels", "vae_scale_factor")
    theirs = [getattr(refiner.config, k) for k in layout] + [refiner.config.kind.latent_packing]
    ours = [getattr(base.config, k) for k in layout] + [base.config.kind.latent_packing]
    if ours != theirs:
        raise UserError(
            f"the base's latents (channels, VAE scale, packing {ours}) are not the refiner's "
            f"({theirs}): the refiner continues an SDXL base model's latents"
        )


def run_ensemble(
    base: Any,
    refiner: Any,
    prompt: str | list[str],
    *,
    refiner_start: float = REFINER_START,
    steps: int | None = None,
    aesthetic_score: float | None = None,
    negative_aesthetic_score: float | None = None,
    on_step: Callable[[str, int, int], None] | None = None,
    **call: Any,
) -> tuple[Any, Any]:
    """SDXL's ensemble of expert denoisers (diffusers' base + refiner recipe): `base` (a
    Text2ImagePipeline) denoises the first `refiner_start` of a `steps`-step schedule and
    `refiner` the rest from its latents. `call` holds the base call's other keywords (an
    image, ControlNet images, ...); the refiner shares its negative prompt, guidance,
    seed, guidance rescale, eta and image count. `on_step(stage, done, total)`, stage
    "base" or "refiner". Returns both calls' GenerationResults; the refiner's has the
    images."""
    check_pair(base, refiner)
    start = check_fraction(refiner_start, "refiner_start")
    steps = int(steps if steps is not None else base.config.default_steps)
    if call.get("mask_image") is not None:
        raise UserError(
            "inpainting with a refiner is not supported: run the refiner on the inpainted "
            "image instead (run REFINER --image)"
        )

    def stage(name: str):
        return None if on_step is None else lambda done, total: on_step(name, done, total)

    first = base(
        prompt,
        steps=steps,
        denoising_end=start,
        output="latent",
        on_step=stage("base"),
        **call,
    )
    shared = {k: call[k] for k in _SHARED if k in call}
    second = refiner(
        prompt,
        steps=steps,
        latents=first.latents,
        denoising_start=start,
        aesthetic_score=aesthetic_score,
        negative_aesthetic_score=negative_aesthetic_score,
        on_step=stage("refiner"),
        **shared,
    )
    return first, second
