"""Prompt conditioning, latent layout and timestep schedule, driven by the manifest's `kind`.

One class for every family: what differs between them (SDXL's pooled embedding and time
ids, SD3's CLIP states zero-padded to T5's width and joined with T5's along the sequence,
FLUX's 2x2-packed latents, position ids, embedded guidance and shifted linspace sigmas) is
data in the bundle's `pipeline.kind` record and its text encoder records, written by the
exporter from the model's ArchSpec (slimdiff/models/kinds.py). This is a port of the
diffusers pipelines (0.42): StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux.

Batches under classifier-free guidance are (uncond, cond), as diffusers concatenates them.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from slimdiff.runtime.manifest import BundleError
from slimdiff.runtime.schedulers import Scheduler
from slimdiff.runtime.text_encoder import TextEncoder
from slimdiff.runtime.tokenizer import shown

from slimdiff.errors import UserError
from slimdiff.models.kinds import (
    KindSpec,
    extra_inputs,
    latent_shape,
    pack_latents,
    timestep_args,
    unpack_latents,
)

__all__ = ["Conditioning"]

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]


class Conditioning:
    """The denoising loop's per-family pieces, from a bundle's `pipeline` record.

    Example:
        >>> cond = Conditioning(manifest.pipeline, encoders, scheduler_config)  # doctest: +SKIP
        >>> cond.latent_shape(1024, 1024)                                        # doctest: +SKIP
        (1, 4, 128, 128)
    """

    def __init__(
        self, pipeline: dict[str, Any], encoders: list[TextEncoder], scheduler_config: dict
    ) -> None:
        self.pipeline = pipeline
        kind = pipeline["kind"]
        if not isinstance(kind, KindSpec):
            # runtime/manifest.py validated the record strictly when it read the bundle.
            raise TypeError(f"pipeline['kind'] must be a validated KindSpec, not {type(kind)}")
        self.kind = kind
        self.encoders = encoders
        self.scheduler_config = scheduler_config
        self.vae_scale = int(pipeline["vae_scale_factor"])
        self.channels = int(pipeline["latent_channels"])

    # ---------------------------------------------------------------- geometry

    def size_multiple(self) -> int:
        """Height and width must be multiples of this many pixels."""
        return int(self.pipeline.get("size_multiple") or self.kind.size_multiple(self.vae_scale))

    def _latent_hw(self, height: int, width: int) -> tuple[int, int]:
        return height // self.vae_scale, width // self.vae_scale

    def latent_shape(self, height: int, width: int, images: int = 1) -> tuple[int, ...]:
        """Shape of diffusers' `latents=` argument for `images` images of this size."""
        return latent_shape(self.kind, images, self.channels, *self._latent_hw(height, width))

    def initial_latents(
        self,
        latents: np.ndarray | None,
        seed: int,
        height: int,
        width: int,
        scheduler: Scheduler,
        images: int = 1,
    ) -> np.ndarray:
        """The given latents (checked) or seeded standard-normal noise, times the scheduler's
        init_noise_sigma, float32. Call after `set_timesteps` (Euler's sigma depends on it).

        diffusers' prepare_latents scales given latents too, not only fresh noise; the flow
        schedulers' sigma is 1. Noise is drawn unpacked, then packed (as FluxPipeline), for
        all images in one draw, as diffusers draws a batch from one generator: the first
        image's noise is the noise of a one-image call with the same seed.
        """
        if latents is None:
            latents = self.noise(seed, height, width, images)
        else:
            latents = self.check_latents(latents, height, width, images)
        return (latents * np.float32(scheduler.init_noise_sigma)).astype(np.float32)

    def check_latents(self, latents: Any, height: int, width: int, images: int) -> np.ndarray:
        """Given latents as float32, UserError unless they have the shape of `images`
        images of this size."""
        shape = self.latent_shape(height, width, images)
        try:
            latents = np.asarray(latents, dtype=np.float32)
        except (TypeError, ValueError):
            raise UserError("latents must be an array of numbers") from None
        if latents.shape != shape:
            count = "" if images == 1 else f" for {images} images"
            raise UserError(
                f"latents have shape {latents.shape}; size {width}x{height} (width x height) "
                f"needs {shape}" + count
            )
        return latents

    def latents_size(self, latents: Any) -> tuple[int, int] | None:
        """(height, width) in pixels of unpacked (B, C, h, w) latents; None otherwise (the
        size must then be given)."""
        try:
            shape = np.shape(latents)
        except ValueError:  # a ragged nested list: refused with the run's other arguments
            return None
        if len(shape) != 4 or self.kind.latent_packing != 1:
            return None
        return shape[2] * self.vae_scale, shape[3] * self.vae_scale

    def noise(self, seed: int, height: int, width: int, images: int = 1) -> np.ndarray:
        """Seeded standard-normal latents of `images` images, float32, in the denoiser's
        layout: drawn unpacked (B, C, h, w) in one draw, then packed (as FluxPipeline)."""
        raw = (images, self.channels, *self._latent_hw(height, width))
        noise = np.random.default_rng(seed).standard_normal(raw).astype(np.float32)
        return pack_latents(noise, self.kind.latent_packing)

    def set_timesteps(self, scheduler: Scheduler, steps: int, height: int, width: int) -> None:
        """Set the schedule as the family's pipeline does; call before `initial_latents`."""
        args = timestep_args(
            self.kind, self.scheduler_config, steps, *self._latent_hw(height, width)
        )
        scheduler.set_timesteps(**args)

    def vae_latents(self, latents: np.ndarray, height: int, width: int) -> np.ndarray:
        """Final latents in the VAE's (B, C, h, w) layout."""
        h, w = self._latent_hw(height, width)
        return np.ascontiguousarray(unpack_latents(latents, self.kind.latent_packing, h, w))

    # ---------------------------------------------------------------- conditioning

    def denoiser_inputs(self) -> set[str]:
        """Names of the denoiser inputs `encode` + `step_feeds` provide for this bundle."""
        return self.kind.input_names()

    def _embed(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """(encoder_hidden_states, pooled) for `texts`: hidden outputs side by side within a
        segment, segments zero-padded to the widest and joined on the token axis; pooled
        outputs side by side (see TextEncoderSpec). An encoder the bundle runs without
        (`zero_text`) gives its segment in zeros."""
        segments: dict[int, list[np.ndarray]] = {}
        pooled = []
        for enc in self.encoders:
            out = enc(texts, warn=False)
            if enc.hidden_output is not None:
                segments.setdefault(enc.segment, []).append(out[enc.hidden_output])
            pooled += [out[name] for name in enc.pooled_outputs]
        if not segments:
            raise BundleError("no text encoder outputs hidden states; export the bundle again")
        for zero in self.pipeline.get("zero_text") or ():  # SD3 without T5, as diffusers
            shape = (len(texts), zero["max_length"], zero["hidden_size"])
            segments[zero["segment"]] = [np.zeros(shape, np.float32)]
        parts = [np.concatenate(segments[k], axis=-1) for k in sorted(segments)]
        width = max(p.shape[-1] for p in parts)
        parts = [np.pad(p, ((0, 0), (0, 0), (0, width - p.shape[-1]))) for p in parts]
        return np.concatenate(parts, axis=1), (np.concatenate(pooled, -1) if pooled else None)

    def encode(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str | None] | None,
        do_cfg: bool,
        guidance: float,
        height: int,
        width: int,
        images: int = 1,
        time_ids: tuple[np.ndarray, np.ndarray] | None = None,
        prompts_are: str = "prompt",
    ) -> Feeds:
        """Denoiser inputs that stay the same at every step (text states, ids, ...), for
        `images` images of each prompt, batched as diffusers batches a list of prompts with
        num_images_per_prompt: under CFG the negative rows first, then the prompts', each
        prompt's rows repeated per image (p0, p0, p1, p1, ...). `negative_prompt`: one for
        all prompts, or one per prompt (None: empty, or zeros where the pipeline says so).
        `time_ids`: SDXL's (negative row, prompt row) of time ids (runtime/
        size_conditioning.py time_id_rows; the refiner's carry its aesthetic scores); None:
        the default six ids of a height x width image on every row. `prompts_are`: what the
        long-prompt warning calls `prompt` ("negative prompt" for FLUX's true CFG pass)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = (
            list(negative_prompt)
            if isinstance(negative_prompt, (list, tuple))
            else [negative_prompt] * len(prompts)
        )
        self._warn_cut(prompts, negatives if do_cfg else [], prompts_are)
        # warned of above, once per prompt, not per encoder
        halves = [self._encode_one(p, n, do_cfg) for p, n in zip(prompts, negatives, strict=True)]
        # [(uncond, cond) per prompt] -> uncond rows of every prompt, then the cond rows
        parts = [[h[k] for h in halves] for k in range(len(halves[0]))]
        states = np.concatenate([s for part in parts for s, _ in part])
        pooled = None
        if halves[0][0][1] is not None:
            pooled = np.concatenate([p for part in parts for _, p in part])
        if images > 1:  # each prompt's row -> one row per image
            states = np.repeat(states, images, axis=0)
            pooled = None if pooled is None else np.repeat(pooled, images, axis=0)
        feeds = {"encoder_hidden_states": states}
        if self.kind.pooled_input is not None:
            if pooled is None:
                raise BundleError(
                    f"the denoiser takes {self.kind.pooled_input} but no text encoder outputs a "
                    "pooled embedding; export the bundle again"
                )
            feeds[self.kind.pooled_input] = pooled
        ids = None
        if time_ids is not None:
            rows = states.shape[0]
            ids = np.repeat(time_ids[1][None], rows, axis=0)
            ids[: rows // 2 if do_cfg else 0] = time_ids[0]
        elif self.kind.aesthetic_score:
            raise ValueError("the refiner's time ids need its aesthetic scores")
        feeds.update(
            extra_inputs(
                self.kind.extra_inputs,
                batch=states.shape[0],
                height=height,
                width=width,
                vae_scale=self.vae_scale,
                packing=self.kind.latent_packing,
                text_len=states.shape[1],
                guidance=guidance,
                embedding_dim=self.kind.guidance_embedding_dim,
                time_ids=ids,
            )
        )
        return feeds

    def _warn_cut(self, prompts: list[str], negatives: list[str | None], what: str) -> None:
        """Warn once of each distinct prompt longer than a text encoder reads (SDXL's two
        encoders and SD3's three all cut a long one), a negative one named as such."""
        texts = dict.fromkeys(prompts, what)
        for text in negatives:
            if text:  # None and "" are never cut
                texts.setdefault(text, "negative prompt")
        cut = [(enc, set(enc.cut(list(texts)))) for enc in self.encoders]
        for text, name in texts.items():
            reads = sorted({(enc.max_length, enc.kind) for enc, gone in cut if text in gone})
            if reads:
                log.warning(
                    "%s %r is longer than %s; the rest is ignored, as in diffusers",
                    name,
                    shown(text),
                    " and ".join(f"the {n} tokens {kind.upper()} reads" for n, kind in reads),
                )

    def _encode_one(
        self, prompt: str, negative: str | None, do_cfg: bool
    ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """[(states, pooled)] of one prompt: [uncond, cond] under CFG, else [cond]. One
        encoder call of batch 2 (or 1) per prompt, so the text encoders run the batches
        their shape profiles are built for, whatever the number of prompts."""
        zero_negative = negative is None and self.pipeline.get(
            "force_zeros_for_empty_prompt", False
        )
        if do_cfg and not zero_negative:
            # One encoder call for both halves; CLIP has no padding mask so rows don't mix.
            states, pooled = self._embed([negative or "", prompt])
            return [
                (states[:1], None if pooled is None else pooled[:1]),
                (states[1:], None if pooled is None else pooled[1:]),
            ]
        states, pooled = self._embed([prompt])
        if not do_cfg:
            return [(states, pooled)]
        # SDXL's force_zeros_for_empty_prompt
        zeros = None if pooled is None else np.zeros_like(pooled)
        return [(np.zeros_like(states), zeros), (states, pooled)]

    def step_feeds(self, model_input: np.ndarray, t: np.float32) -> Feeds:
        """Denoiser inputs for one step: the (scaled) latents and the timestep per sample."""
        batch = model_input.shape[0]
        timestep = np.full(batch, t, np.float32) / np.float32(self.kind.timestep_divisor)
        return {self.kind.sample_input: model_input, "timestep": timestep}
