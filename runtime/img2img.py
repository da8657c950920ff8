"""Image-to-image and inpainting pieces of the runtime's run: where the run begins, the
image's latents from the bundle's VAE encoder, and the inpainting mask on the latent grid.

Ports of diffusers' img2img and inpaint pipelines (SD, SDXL, SD3, FLUX; diffusers 0.42):
get_timesteps, prepare_latents' encode (retrieve_latents samples the posterior) and
prepare_mask_latents. The per-family differences come from the manifest's records.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from slimdiff.runtime.backends import Session
from slimdiff.runtime.call_checks import check_number
from slimdiff.runtime.manifest import VAE_ENCODER_INPUT, VAE_ENCODER_OUTPUTS, PipelineSpec
from slimdiff.runtime.schedulers import Scheduler

from slimdiff.errors import UserError
from slimdiff.models.kinds import KindSpec, img2img_begin, pack_latents

__all__ = [
    "MASKED_STREAM",
    "POSTERIOR_STREAM",
    "begin_at",
    "default_strength",
    "encode_image",
    "inpainting_inputs",
    "latent_mask",
    "latent_stats",
    "run_strength",
]

POSTERIOR_STREAM = 2  # seeds img2img's draw from the VAE encoder's posterior
MASKED_STREAM = 3  # and an inpainting model's draw for the masked image


def default_strength(config: PipelineSpec, inpaint: bool) -> float:
    """The strength of a run that gives none: the bundle's record of its diffusers
    pipelines' defaults; 0.8 (0.3 for the SDXL refiner) for bundles exported before it."""
    record = config.default_strength
    if record is None:
        return 0.3 if config.kind.aesthetic_score else 0.8
    return record.inpaint if inpaint else record.image


def run_strength(config: PipelineSpec, strength: Any, image: Any, mask: Any) -> Any:
    """A call's strength: the one given, which needs an image (UserError without), else
    the default for its mode (default_strength); begin_at checks its value."""
    if strength is not None and image is None:
        raise UserError(
            "strength sets how far an image is noised: pass the image as well (image=...), "
            "or leave strength out"
        )
    return default_strength(config, mask is not None) if strength is None else strength


def begin_at(kind: KindSpec, scheduler: Scheduler, steps: int, strength: float) -> int:
    """The first scheduler call of an image-to-image run, set as the scheduler's begin index
    (its history starts there); UserError for a strength that is not a number from 0 to 1
    or leaves no step."""
    value = check_number(strength, "strength", " above 0 and at most 1")
    if not (np.isfinite(value) and 0 < value <= 1):
        raise UserError(f"strength {strength}: use a value above 0 and at most 1")
    begin = img2img_begin(kind, steps, value, scheduler.order)
    if begin >= len(scheduler.timesteps):
        raise UserError(
            f"strength {value:g} with {steps} steps leaves no step to run; raise the "
            "strength or the steps (strength x steps must reach 1)"
        )
    try:
        scheduler.set_begin_index(begin)
    except ValueError as err:  # PNDM's Runge-Kutta start cannot begin mid-schedule
        raise UserError(f"image-to-image at strength {value:g}: {err}") from None
    return begin


def latent_stats(config: PipelineSpec) -> tuple[np.ndarray, np.ndarray]:
    """The VAE's per-channel latent mean and std, (1, C, 1, 1) float32."""
    return tuple(  # type: ignore[return-value]
        np.asarray(v, np.float32).reshape(1, -1, 1, 1)
        for v in (config.vae_latents_mean, config.vae_latents_std)
    )


def encode_image(
    config: PipelineSpec,
    encoder: Session,
    pixels: np.ndarray,
    seed: int,
    images: int,
    stream: int = POSTERIOR_STREAM,
) -> np.ndarray:
    """The image's latents in the denoiser's layout, scaled as the decoder unscales them,
    one row per image: a draw from the VAE posterior (diffusers' retrieve_latents samples
    it too), repeated for every image as diffusers' img2img pipelines do."""
    out = encoder.run({VAE_ENCODER_INPUT: pixels})
    mean, std = (np.asarray(out[n], np.float32) for n in VAE_ENCODER_OUTPUTS)
    rng = np.random.default_rng([stream, seed])
    z = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
    scaling = np.float32(config.vae_scaling_factor)
    if config.vae_latents_mean is not None:  # SDXL's per-channel statistics
        mean_c, std_c = latent_stats(config)
        z = (z - mean_c) * scaling / std_c
    else:
        if config.vae_shift_factor is not None:
            z = z - np.float32(config.vae_shift_factor)
        z = z * scaling
    z = np.repeat(z.astype(np.float32), images, axis=0)
    return pack_latents(z, config.kind.latent_packing)


def _latent_grid(config: PipelineSpec, pixel_mask: np.ndarray) -> np.ndarray:
    """(1, 1, H, W) -> (1, 1, h, w): torch's nearest interpolation to the latent size, as
    the pipelines' prepare_mask_latents (an integer ratio picks every s-th pixel)."""
    scale = config.vae_scale_factor
    return pixel_mask[:, :, ::scale, ::scale]


def latent_mask(config: PipelineSpec, pixel_mask: np.ndarray, images: int) -> np.ndarray:
    """The mask on the latent grid in the denoiser's layout (1: repaint), every image."""
    grid = _latent_grid(config, pixel_mask)
    full = np.broadcast_to(grid, (images, config.latent_channels, *grid.shape[2:]))
    return np.ascontiguousarray(pack_latents(full, config.kind.latent_packing))


def inpainting_inputs(
    config: PipelineSpec,
    encoder: Session,
    pixels: np.ndarray,
    pixel_mask: np.ndarray,
    seed: int,
    images: int,
    do_cfg: bool,
) -> np.ndarray:
    """What an inpainting UNet takes besides the latents: the mask on the latent grid and
    the latents of the image with the repainted part blacked out (its own posterior draw),
    (B, 1 + C, h, w), B as the denoiser batch; diffusers' prepare_mask_latents."""
    masked_pixels = pixels * (pixel_mask < 0.5)
    masked = encode_image(config, encoder, masked_pixels, seed, images, MASKED_STREAM)
    grid = np.repeat(_latent_grid(config, pixel_mask), images, axis=0)
    joined = np.concatenate([grid, masked], axis=1).astype(np.float32)
    return np.concatenate([joined, joined]) if do_cfg else joined
