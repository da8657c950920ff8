"""One call of Text2ImagePipeline (runtime/pipeline.py) once its arguments are checked: the
schedule, then text encoding, the image-to-image start, the denoising loop and VAE decoding,
each phase timed.

__call__ checks the arguments and hands them over as a Call; this file runs it. Everything
that can still be the caller's error (a mask file, a step count the scheduler refuses) fails
before any graph runs. The phases run one after another so that low_memory holds one
component at a time: each is loaded as its phase starts and released as it ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
from slimdiff.runtime.call_checks import check_finite, check_output
from slimdiff.runtime.control import Control, control_feeds, control_scales
from slimdiff.runtime.denoise_loop import Guidance, Kept, denoise
from slimdiff.runtime.image import ImageInput, load_image, prepare_mask, to_uint8
from slimdiff.runtime.img2img import (
    begin_at,
    encode_image,
    inpainting_inputs,
    latent_mask,
    latent_stats,
)
from slimdiff.runtime.manifest import VAE_INPUT, VAE_OUTPUT
from slimdiff.runtime.refiner import end_index, start_index, train_timesteps
from slimdiff.runtime.schedulers import Scheduler
from slimdiff.runtime.sessions import ensure_loaded, release
from slimdiff.runtime.size_conditioning import SizeConditioning, time_id_rows

from slimdiff.models.kinds import CONTROL_SCALE

if TYPE_CHECKING:
    from slimdiff.runtime.pipeline import Text2ImagePipeline

__all__ = ["Call", "GenerationResult", "decode_image", "generate"]

# the pipeline's logger: its warnings keep the name callers filter them by
log = logging.getLogger("slimdiff.runtime.pipeline")

_VAE_NAN_FIX = "an fp16 VAE overflows on some latents: export with --vae-precision fp32"

Feeds = dict[str, np.ndarray]


@dataclass
class GenerationResult:
    """The images of one call and what they took.

    `images` holds one (H, W, 3) uint8 array per image (empty with output="latent");
    `image` is the first. `latents` are the final latents before VAE decoding, float32, in
    the denoiser's layout, one row per image (what diffusers returns with
    output_type="latent"; packed (B, L, 4C) for FLUX).
    `timings_ms` holds "text_encoders", "denoiser_steps" (one entry per step),
    "vae_decode" (absent with output="latent"), "vae_encode" (image-to-image only) and
    "end_to_end"; with low_memory, or when an image-to-image call loads the VAE encoder,
    also "load", the components' loads (in end_to_end, not in the others).
    """

    images: list[np.ndarray]
    latents: np.ndarray
    timings_ms: dict[str, float | list[float]] = field(default_factory=dict)

    @property
    def image(self) -> np.ndarray | None:
        """The first image, (H, W, 3) uint8; None with output="latent"."""
        return self.images[0] if self.images else None


@dataclass(frozen=True)
class Call:
    """A call's arguments as Text2ImagePipeline.__call__ has checked them (its docstring
    says what each does), and what it derived from them."""

    prompts: list[str]
    negatives: list[str | None]
    per_prompt: int  # images per prompt
    images: int  # the images of all prompts: the denoiser's rows (twice that under CFG)
    steps: int
    height: int
    width: int
    seed: int
    latents: np.ndarray | None
    output: str  # "image" or "latent"
    eta: float | None
    on_step: Callable[[int, int], None] | None
    guided: Guidance  # without true CFG's negative text inputs, which encoding adds
    sizing: SizeConditioning
    aesthetic: tuple[float, float] | None
    control: Control
    guess: bool  # the denoiser graph takes guess mode's inputs
    pixels: np.ndarray | None  # the image-to-image input, (1, 3, H, W) in [-1, 1]
    mask_image: ImageInput | None
    strength: float | None
    start_at: float | None  # denoising_start: a base model's latents, handed over
    end_at: float | None  # denoising_end
    start: float  # time.perf_counter() as the call began: end_to_end's start


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


def generate(pipe: Text2ImagePipeline, call: Call) -> GenerationResult:
    """Run the checked `call` on `pipe`: text encoders, then the VAE encoder (image-to-image),
    then the denoiser, then the VAE decoder (output="image")."""
    config, cond, images = pipe.config, pipe.conditioning, call.images
    height, width, seed = call.height, call.width, call.seed
    pixel_mask = _pixel_mask(call)
    # a model not trained for inpainting gets the kept latents put back after each step
    blend = None
    if pixel_mask is not None and not config.kind.inpainting:
        blend = latent_mask(config, pixel_mask, images)
    timings: dict[str, float | list[float]] = {}
    # before any graph runs: a step count or eta the scheduler refuses is the caller's
    scheduler = pipe.make_scheduler(call.steps, height, width, call.eta)
    begin, end = _step_range(pipe, call, scheduler)

    # low_memory: one call at a time, and nothing left loaded however the call ends
    with pipe._low_memory_turn():
        encoders = [enc.session for enc in cond.encoders]
        loading = ensure_loaded(*encoders)  # low_memory: each component's load, kept apart
        t0 = time.perf_counter()
        fixed, negative = _encode_text(pipe, call)
        timings["text_encoders"] = _ms(t0)
        release(*encoders)  # low_memory: freed before the VAE encoder and the denoiser load

        first_load = False  # the VAE encoder loaded by this call (its first img2img one)
        extra = None  # an inpainting model's mask and masked image latents, every step
        clean = noise = None  # image-to-image: the image's latents, and the noise added
        if call.start_at is not None:  # as they are: diffusers adds no noise with denoising_start
            x = cond.check_latents(call.latents, height, width, images)
        elif call.pixels is None:
            x = cond.initial_latents(call.latents, seed, height, width, scheduler, images)
        else:
            first_load = not pipe.vae_encoder.loaded
            loading += ensure_loaded(pipe.vae_encoder)
            t0 = time.perf_counter()
            # an inpainting model at full strength starts from noise alone, as diffusers
            full = pixel_mask is not None and float(call.strength) == 1.0
            clean, extra = _encode_image(pipe, call, pixel_mask, full)
            timings["vae_encode"] = _ms(t0)
            if pipe.low_memory:
                release(pipe.vae_encoder)
            # the same seeded draw as text-to-image's initial noise, then noised to `begin`
            noise = cond.noise(seed, height, width, images)
            if full:
                # diffusers' inpaint pipelines start from pure noise at full strength
                x = cond.initial_latents(noise, seed, height, width, scheduler, images)
            else:
                x = scheduler.add_noise(clean, noise, begin).astype(np.float32)
        # low_memory: the VAE encoder is released before the denoiser loads
        loading += ensure_loaded(pipe.denoiser)
        kept = None if blend is None else Kept(blend, clean, noise)
        guided = replace(call.guided, negative=negative)
        feeds = _step_feeds(pipe, call.control, scheduler, fixed, begin, end)
        run = range(begin, end)
        x, step_ms = denoise(
            pipe.denoiser, scheduler, x, run, feeds, guided, seed, extra, kept, call.on_step
        )
        timings["denoiser_steps"] = step_ms
        release(pipe.denoiser)

        decoded = []
        if call.output == "image":
            loading += ensure_loaded(pipe.vae_decoder)
            t0 = time.perf_counter()
            decoded = [decode_image(pipe, x[i : i + 1], height, width) for i in range(images)]
            timings["vae_decode"] = _ms(t0)
            release(pipe.vae_decoder)
        if pipe.low_memory or first_load:
            timings["load"] = loading
        timings["end_to_end"] = _ms(call.start)
        return GenerationResult(images=decoded, latents=x, timings_ms=timings)


def _step_range(pipe: Text2ImagePipeline, call: Call, scheduler: Scheduler) -> tuple[int, int]:
    """The scheduler calls this run makes, [begin, end): image-to-image's strength, or a
    refiner's denoising_start, moves the first; denoising_end the last."""
    train_steps = train_timesteps(pipe.scheduler_config)
    if call.start_at is not None:  # a base model's latents, handed over mid-schedule
        begin = start_index(scheduler, call.start_at, train_steps)
    elif call.pixels is None:
        begin = 0
    else:
        begin = begin_at(pipe.config.kind, scheduler, call.steps, call.strength)
    end = len(scheduler.timesteps)
    if call.end_at is not None:
        end = end_index(scheduler, begin, call.end_at, train_steps)
    return begin, end


def _pixel_mask(call: Call) -> np.ndarray | None:
    """The call's mask as (1, 1, H, W), 1 where the image is repainted; None without one."""
    if call.mask_image is None:
        return None
    pixel_mask = prepare_mask(load_image(call.mask_image, "mask"), (call.height, call.width))
    if not pixel_mask.any():  # diffusers runs every step to give the image back
        log.warning(
            "the mask is all black (kept): nothing will be repainted; white marks what to repaint"
        )
    return pixel_mask


def _encode_image(
    pipe: Text2ImagePipeline, call: Call, pixel_mask: np.ndarray | None, full: bool
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """By the VAE encoder: the image's latents (None where an inpainting model starts from
    noise alone, at `full` strength), and an inpainting model's mask and masked-image
    latents (None for other models)."""
    config, vae_encoder = pipe.config, pipe.vae_encoder
    inpainting_model = bool(config.kind.inpainting)
    clean = extra = None
    if not (full and inpainting_model):
        clean = encode_image(config, vae_encoder, call.pixels, call.seed, call.images)
    if inpainting_model:
        extra = inpainting_inputs(
            config, vae_encoder, call.pixels, pixel_mask, call.seed, call.images, call.guided.cfg
        )
    return clean, extra


def _encode_text(pipe: Text2ImagePipeline, call: Call) -> tuple[Feeds, Feeds]:
    """The denoiser's fixed inputs (text embeddings, time ids, control images) and true
    CFG's negative text inputs (empty without it), read-only."""
    cond, height, width = pipe.conditioning, call.height, call.width
    time_ids = None
    if "time_ids" in pipe.config.kind.extra_inputs:
        # diffusers' img2img and inpaint pipelines (the refiner's too) default the
        # negative ids otherwise than its text-to-image one
        from_image = call.pixels is not None or call.start_at is not None
        time_ids = time_id_rows(
            call.sizing, height, width, image_to_image=from_image, aesthetic=call.aesthetic
        )
    fixed = cond.encode(
        call.prompts,
        call.negatives,
        call.guided.cfg,
        call.guided.scale,
        height,
        width,
        call.per_prompt,
        time_ids,
    )
    if pipe.config.controlnet is not None:
        size = (height, width)
        fixed.update(control_feeds(call.control, size, call.images, call.guided.cfg, call.guess))
    negative = {}  # true CFG's text inputs: the negative prompts, encoded as prompts
    if call.guided.true_cfg is not None:
        unguided = [n or "" for n in call.negatives]
        negative = cond.encode(
            unguided,
            None,
            False,
            call.guided.scale,
            height,
            width,
            call.per_prompt,
            prompts_are="negative prompt",
        )
    for value in (*fixed.values(), *negative.values()):
        # Read-only: the same every step, so a GPU backend copies it to the device once
        # (runtime/backends/ort_binding.py, AotiSession in runtime/backends/aoti.py).
        value.flags.writeable = False
    return fixed, negative


def _step_feeds(
    pipe: Text2ImagePipeline,
    control: Control,
    scheduler: Scheduler,
    fixed: Feeds,
    begin: int,
    end: int,
) -> Callable[[int, np.ndarray], Feeds]:
    """feeds(i, model_input): the denoiser's inputs at scheduler call i."""
    cond, controlnet = pipe.conditioning, pipe.config.controlnet is not None
    scales = control_scales(control, end - begin)

    def feeds(i: int, model_input: np.ndarray) -> Feeds:
        t = np.float32(scheduler.timesteps[i])
        step = {**fixed, **cond.step_feeds(model_input, t)}
        if controlnet:
            step[CONTROL_SCALE] = scales[i - begin]
        return step

    return feeds


def decode_image(
    pipe: Text2ImagePipeline, latents: np.ndarray, height: int, width: int
) -> np.ndarray:
    """One image's final latents (a batch of one) as (H, W, 3) uint8 pixels, by `pipe`'s
    VAE decoder, scaled and shifted back as the family's diffusers pipeline does."""
    config = pipe.config
    z = pipe.conditioning.vae_latents(latents, height, width)
    scaling = np.float32(config.vae_scaling_factor)
    if config.vae_latents_mean is not None:  # SDXL's per-channel statistics
        mean, std = latent_stats(config)
        z = z * std / scaling + mean
    else:
        z = z / scaling
    if config.vae_shift_factor is not None:
        z = z + np.float32(config.vae_shift_factor)
    sample = pipe.vae_decoder.run({VAE_INPUT: z})[VAE_OUTPUT]
    check_output(sample, (1, 3, height, width), "VAE decoder", "pixels")
    check_finite(sample, "in the VAE decoder's output", _VAE_NAN_FIX)
    return to_uint8(sample[0])
