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
from slimdiff.runtime.call_checks import check_step_count
from slimdiff.runtime.manifest import PipelineSpec
from slimdiff.runtime.schedulers import Scheduler

from slimdiff.errors import UserError
from slimdiff.models.kinds import AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE

__all__ = [
    "REFINER_START",
    "check_aesthetic",
    "check_fraction",
    "check_hand_off",
    "check_pair",
    "end_index",
    "run_ensemble",
    "start_index",
    "train_timesteps",
]

REFINER_START = 0.8  # diffusers' example: the base denoises the first 80% ("high_noise_frac")
# What the refiner's call shares with the base's (the rest steers the base's start: the
# image, its strength, the initial noise, ControlNets, the size, which the latents carry).
# Size conditioning goes to both but the target sizes, which the refiner's time ids have not.
_SHARED = (
    "negative_prompt",
    "guidance",
    "seed",
    "guidance_rescale",
    "eta",
    "images",
    "original_size",
    "crops_coords_top_left",
    "negative_original_size",
    "negative_crops_coords_top_left",
)
_MAX_SCORE = 10.0  # the LAION aesthetic predictor's scale, which the refiner was trained on


def check_aesthetic(
    config: PipelineSpec, score: float | None, negative: float | None
) -> tuple[float, float] | None:
    """(negative, positive) aesthetic scores for a refiner bundle (diffusers' defaults 2.5
    and 6.0 where not given); None for any other bundle, which is refused a score."""
    named = {"aesthetic score": score, "negative aesthetic score": negative}
    given = {name: v for name, v in named.items() if v is not None}
    if not config.kind.aesthetic_score:
        if given:
            raise UserError(
                "aesthetic scores condition the SDXL refiner only; this bundle's denoiser "
                "takes none: leave out --aesthetic-score / --negative-aesthetic-score (API: "
                "aesthetic_score=, negative_aesthetic_score=)"
            )
        return None
    fix = f"use a value from 0 to {_MAX_SCORE:g} (diffusers' defaults: 6 and 2.5)"
    for name, value in given.items():
        number = _number(value, name, fix)
        if not 0 <= number <= _MAX_SCORE:
            raise UserError(
                f"{name} {value}: {fix}; the refiner was trained on the LAION aesthetic scale"
            )
    return (
        NEGATIVE_AESTHETIC_SCORE if negative is None else float(negative),
        AESTHETIC_SCORE if score is None else float(score),
    )


def check_fraction(value: float | None, name: str) -> float | None:
    """`value` as a float strictly between 0 and 1 (None passes)."""
    if value is None:
        return None
    number = _number(value, name, "use a fraction of the schedule strictly between 0 and 1")
    if not 0 < number < 1:
        raise UserError(
            f"{name} {value}: use a fraction of the schedule strictly between 0 and 1 "
            "(0.8: the base denoises the first 80%, the refiner the rest)"
        )
    return number


def check_hand_off(
    config: PipelineSpec, start: Any, end: Any, image: Any, latents: Any, strength: Any
) -> tuple[float | None, float | None]:
    """A call's denoising_start and denoising_end checked, and what the run starts from:
    the refiner needs an image or, with denoising_start, the base's latents."""
    start, end = check_fraction(start, "denoising_start"), check_fraction(end, "denoising_end")
    if start is not None and end is not None and start >= end:
        raise UserError(f"denoising_start {start:g} must be below denoising_end {end:g}")
    if start is not None and strength is not None:
        raise UserError(
            "strength has no effect with denoising_start (the hand-off fraction sets "
            "where the run starts): leave it out"
        )
    if start is not None and (image is not None or latents is None):
        raise UserError(
            "denoising_start continues a base model's partly denoised latents: pass them "
            "as latents (the base's output='latent' run with denoising_end), not an image"
        )
    if config.kind.aesthetic_score and image is None and start is None:
        raise UserError(
            "this is the SDXL refiner, which refines an image: pass an image (run --image "
            "FILE), or run it after a base model (run BASE --refiner THIS_BUNDLE)"
        )
    return start, end


def _number(value: object, name: str, fix: str) -> float:
    """`value` as a float; UserError naming `name` and `fix` for anything but a finite
    number (strings and booleans included)."""
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, (int, float, np.number)):
        raise UserError(f"{name} {value!r} is not a number; {fix}")
    number = float(value)
    if not np.isfinite(number):
        raise UserError(f"{name} {value!r} is not a finite number; {fix}")
    return number


def train_timesteps(scheduler_config: dict[str, Any]) -> int:
    """T, the training timesteps a scheduler config's fractions of the schedule refer to."""
    return int(scheduler_config.get("num_train_timesteps", 1000))


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
    """UserError unless `refiner` is an SDXL refiner's pipeline that continues `base`'s
    latents: `base` an SDXL model's (not a refiner), with the refiner's latent layout and
    VAE scaling (the two share SDXL's VAE)."""
    for name, pipe in (("base", base), ("refiner", refiner)):
        if not hasattr(pipe, "config") or not hasattr(pipe, "manifest"):
            raise UserError(
                f"{name} {pipe!r} is not a loaded bundle: pass Text2ImagePipeline objects "
                "(Text2ImagePipeline.from_bundle(path))"
            )
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
    if base.manifest.family != refiner.manifest.family:
        raise UserError(
            f"the base bundle is {base.manifest.family}'s: the SDXL refiner continues an SDXL "
            "base model's latents (SDXL 1.0, SSD-1B, Vega and other SDXL fine-tunes)"
        )
    layout = (
        "latent_channels",
        "vae_scale_factor",
        "vae_scaling_factor",
        "vae_shift_factor",
        "vae_latents_mean",
        "vae_latents_std",
    )
    # (the packing is the family's: checked with it)
    differ = [k for k in layout if getattr(base.config, k) != getattr(refiner.config, k)]
    if differ:
        raise UserError(
            f"the base's latents are not the refiner's (their VAEs differ: {', '.join(differ)}); "
            "the refiner continues the latents of an SDXL base with SDXL's VAE"
        )


# Keywords run_ensemble sets on the calls itself.
_OWN = ("denoising_start", "denoising_end", "output", "on_step", "prompt")


def _check_call(base: Any, call: dict[str, Any]) -> None:
    import inspect

    taken = set(inspect.signature(base.__call__).parameters) - set(_OWN)
    own = sorted(k for k in call if k in _OWN)
    if own:
        raise UserError(
            f"run_ensemble sets {', '.join(own)} itself (the hand-off is refiner_start): "
            "leave them out"
        )
    unknown = sorted(set(call) - taken)
    if unknown:
        raise UserError(
            f"run_ensemble got unknown keywords {', '.join(unknown)}; it takes the base "
            f"call's: {', '.join(sorted(taken))}"
        )


def _check_split(base: Any, refiner: Any, steps: int, start: float, call: dict) -> None:
    """That the hand-off at `start` leaves steps to both, before the base runs: each
    side's schedule at the bundle's default size (the SDXL schedules do not depend on the
    size), the base's from its first step (the step its strength begins at, with an
    image)."""
    from slimdiff.runtime.img2img import begin_at, default_strength

    if steps < 2:
        raise UserError(f"{steps} step: a base and a refiner need at least 2 steps to share")
    height, width = refiner.config.default_size
    for pipe, name in ((base, "base"), (refiner, "refiner")):
        scheduler = pipe.make_scheduler(steps, height, width, call.get("eta"))
        train = train_timesteps(pipe.scheduler_config)
        begin, strength = 0, call.get("strength")
        if name == "base" and call.get("image") is not None:
            strength = default_strength(pipe.config, False) if strength is None else strength
            begin = begin_at(pipe.config.kind, scheduler, steps, strength)
        try:
            if name == "base":
                end_index(scheduler, begin, start, train)
            else:
                start_index(scheduler, start, train)
        except UserError:
            where = "raise it" if name == "base" else "lower it"
            after = f" after the image's strength {strength:g}" if begin else ""
            raise UserError(
                f"refiner start {start:g} leaves the {name} no step of the {steps}-step "
                f"schedule ({type(scheduler).__name__}){after}: {where}, or raise the steps"
            ) from None


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
    seed, guidance rescale, eta, image count, and size conditioning but the target sizes
    (its time ids carry the aesthetic score instead). `on_step(stage, done, total)`, stage
    "base" or "refiner". Returns both calls' GenerationResults; the refiner's has the
    images. Everything is checked before the base runs (UserError)."""
    check_pair(base, refiner)
    _check_call(base, call)
    if refiner_start is None:
        raise UserError("refiner_start: use a fraction of the schedule strictly between 0 and 1")
    start = check_fraction(refiner_start, "refiner start")
    steps = check_step_count(steps, base.config.default_steps)
    if call.get("mask_image") is not None:
        raise UserError(
            "inpainting with a refiner is not supported: run the refiner on the inpainted "
            "image instead (run REFINER --image)"
        )
    check_aesthetic(refiner.config, aesthetic_score, negative_aesthetic_score)
    _check_split(base, refiner, steps, start, call)

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
