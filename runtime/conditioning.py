"""What differs between denoiser kinds: prompt conditioning, latent layout, timestep schedule.

One small class per `pipeline["denoiser_kind"]` in a bundle's manifest, each a port of the
matching diffusers pipeline (0.42):

- `UNetConditioning` ("unet"): StableDiffusionPipeline and, when `has_time_ids`,
  StableDiffusionXLPipeline (concatenated encoder states, pooled `text_embeds`, `time_ids`).
- `SD3Conditioning` ("sd3"): StableDiffusion3Pipeline (CLIP states zero-padded to T5's
  width and joined with T5's along the sequence).
- `FluxConditioning` ("flux"): FluxPipeline (2x2-packed latents, position ids, embedded
  guidance, sigmas given to the scheduler with a resolution-dependent shift).

The pipeline picks the class from `CONDITIONINGS` by the manifest's data, never by family.
Batches under classifier-free guidance are (uncond, cond), as diffusers concatenates them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from slimdiff.runtime.manifest import BundleError
from slimdiff.runtime.schedulers import Scheduler, calculate_shift
from slimdiff.runtime.text_encoder import TextEncoder

from slimdiff.errors import UserError

__all__ = [
    "CONDITIONINGS",
    "Conditioning",
    "FluxConditioning",
    "SD3Conditioning",
    "UNetConditioning",
]

Feeds = dict[str, np.ndarray]


def _cfg_batch(negative: np.ndarray, positive: np.ndarray, do_cfg: bool) -> np.ndarray:
    return np.concatenate([negative, positive]) if do_cfg else positive


class Conditioning:
    """Base: the UNet/SD3 latent layout (B, C, h, w) and a plain `set_timesteps(steps)`."""

    kind: ClassVar[str]
    sample_input: ClassVar[str] = "hidden_states"  # the denoiser input that takes latents

    def __init__(
        self, pipeline: dict[str, Any], encoders: list[TextEncoder], scheduler_config: dict
    ) -> None:
        self.pipeline = pipeline
        self.encoders = encoders
        self.scheduler_config = scheduler_config
        self.vae_scale = int(pipeline["vae_scale_factor"])
        self.channels = int(pipeline["latent_channels"])

    # ---------------------------------------------------------------- geometry

    def size_multiple(self) -> int:
        """Height and width must be multiples of this many pixels."""
        return self.vae_scale

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of diffusers' `latents=` argument for one image of this size."""
        return (1, self.channels, height // self.vae_scale, width // self.vae_scale)

    def initial_latents(
        self, latents: np.ndarray | None, seed: int, height: int, width: int, scheduler: Scheduler
    ) -> np.ndarray:
        """The given latents (checked) or seeded standard-normal noise, float32."""
        shape = self.latent_shape(height, width)
        if latents is None:
            return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        latents = np.asarray(latents, dtype=np.float32)
        if latents.shape != shape:
            raise UserError(
                f"latents have shape {latents.shape}; size {height}x{width} needs {shape}"
            )
        return latents

    def set_timesteps(self, scheduler: Scheduler, steps: int, shape: tuple[int, ...]) -> None:
        """Set the schedule for latents of `shape`; call before `initial_latents`."""
        scheduler.set_timesteps(steps)

    def vae_latents(self, latents: np.ndarray, height: int, width: int) -> np.ndarray:
        """Final latents in the VAE's (B, C, h, w) layout."""
        return latents

    # ---------------------------------------------------------------- conditioning

    def encode(
        self,
        prompt: str,
        negative_prompt: str | None,
        do_cfg: bool,
        guidance: float,
        height: int,
        width: int,
    ) -> Feeds:
        """Denoiser inputs that stay the same at every step (text states, ids, ...)."""
        raise NotImplementedError

    def denoiser_inputs(self) -> set[str]:
        """Names of the denoiser inputs `encode` + `step_feeds` provide for this bundle."""
        raise NotImplementedError

    def step_feeds(self, model_input: np.ndarray, t: np.float32) -> Feeds:
        """Denoiser inputs for one step: the (scaled) latents and the timestep per sample."""
        batch = model_input.shape[0]
        return {self.sample_input: model_input, "timestep": np.full(batch, t, np.float32)}


class UNetConditioning(Conditioning):
    """SD1.5 (one CLIP, last hidden state) and SDXL (two CLIPs, pooled, time ids).

    Which hidden state each encoder contributes comes from its manifest `outputs`.
    """

    kind = "unet"
    sample_input = "sample"

    def initial_latents(
        self, latents: np.ndarray | None, seed: int, height: int, width: int, scheduler: Scheduler
    ) -> np.ndarray:
        # diffusers' SD/SDXL prepare_latents scales given latents too, not only fresh noise,
        # and after set_timesteps: Euler's init_noise_sigma depends on the schedule.
        noise = super().initial_latents(latents, seed, height, width, scheduler)
        return (noise * np.float32(scheduler.init_noise_sigma)).astype(np.float32)

    def denoiser_inputs(self) -> set[str]:
        names = {"sample", "timestep", "encoder_hidden_states"}
        return names | ({"text_embeds", "time_ids"} if self.pipeline.get("has_time_ids") else set())

    def _embed(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        states, pooled = [], None
        for enc in self.encoders:
            out = enc(texts)
            states.append(out[enc.hidden_output])
            if pooled is None and "text_embeds" in out:
                pooled = out["text_embeds"]  # SDXL: the first projected encoder, i.e. enc 2
        return np.concatenate(states, axis=-1), pooled

    def encode(self, prompt, negative_prompt, do_cfg, guidance, height, width) -> Feeds:
        zero_negative = negative_prompt is None and self.pipeline.get(
            "force_zeros_for_empty_prompt", False
        )
        if do_cfg and not zero_negative:
            # One encoder call for both halves; CLIP has no padding mask so rows don't mix.
            states, pooled = self._embed([negative_prompt or "", prompt])
        else:
            states, pooled = self._embed([prompt])
            if do_cfg:  # SDXL's force_zeros_for_empty_prompt
                states = np.concatenate([np.zeros_like(states), states])
                pooled = None if pooled is None else np.concatenate([np.zeros_like(pooled), pooled])
        feeds = {"encoder_hidden_states": states}
        if self.pipeline.get("has_time_ids"):
            if pooled is None:
                raise BundleError("has_time_ids is set but no text encoder outputs text_embeds")
            # original_size + crops_coords_top_left + target_size, as SDXL's _get_add_time_ids
            time_ids = np.array([[height, width, 0, 0, height, width]], np.float32)
            feeds["text_embeds"] = pooled
            feeds["time_ids"] = np.repeat(time_ids, states.shape[0], axis=0)
        return feeds


class SD3Conditioning(Conditioning):
    """SD3: CLIP-L + CLIP-G penultimate states, padded to T5's width, then T5's states."""

    kind = "sd3"

    def size_multiple(self) -> int:
        return self.vae_scale * int(self.pipeline.get("patch_size") or 2)

    def set_timesteps(self, scheduler: Scheduler, steps: int, shape: tuple[int, ...]) -> None:
        cfg = self.scheduler_config
        if not cfg.get("use_dynamic_shifting"):
            scheduler.set_timesteps(steps)
            return
        # SD3.5-style dynamic shifting; the defaults are SD3 pipeline's (max_shift 1.16).
        patch = int(self.pipeline.get("patch_size") or 2)
        seq_len = (shape[2] // patch) * (shape[3] // patch)
        mu = calculate_shift(
            seq_len,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.16),
        )
        scheduler.set_timesteps(steps, mu=mu)

    def denoiser_inputs(self) -> set[str]:
        return {"hidden_states", "timestep", "encoder_hidden_states", "pooled_projections"}

    def _embed(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        clip_states, pooled, t5_states = [], [], []
        for enc in self.encoders:
            out = enc(texts)
            if enc.kind == "t5":
                t5_states.append(out[enc.hidden_output])
            else:
                clip_states.append(out[enc.hidden_output])
                pooled.append(out["text_embeds"])
        if len(t5_states) != 1 or not clip_states:
            raise BundleError("an sd3 bundle needs CLIP text encoders and exactly one T5 encoder")
        clip = np.concatenate(clip_states, axis=-1)  # (B, 77, D_l + D_g)
        t5 = t5_states[0]  # (B, S, D_t5)
        clip = np.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
        return np.concatenate([clip, t5], axis=1), np.concatenate(pooled, axis=-1)

    def encode(self, prompt, negative_prompt, do_cfg, guidance, height, width) -> Feeds:
        texts = [negative_prompt or "", prompt] if do_cfg else [prompt]
        states, pooled = self._embed(texts)
        return {"encoder_hidden_states": states, "pooled_projections": pooled}


class FluxConditioning(Conditioning):
    """FLUX: CLIP pooled + T5 states, 2x2 packed latents, ids, embedded guidance, no CFG."""

    kind = "flux"
    pack = 2  # FluxPipeline packs 2x2 latent patches into one token

    def size_multiple(self) -> int:
        return self.vae_scale * self.pack

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        h, w = height // self.vae_scale, width // self.vae_scale
        return (1, (h // self.pack) * (w // self.pack), self.channels * self.pack**2)

    def initial_latents(
        self, latents: np.ndarray | None, seed: int, height: int, width: int, scheduler: Scheduler
    ) -> np.ndarray:
        if latents is not None:
            return super().initial_latents(latents, seed, height, width, scheduler)
        # diffusers draws the noise unpacked, then packs it: same draw order here.
        shape = (1, self.channels, height // self.vae_scale, width // self.vae_scale)
        noise = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        return self._pack(noise)

    def _pack(self, x: np.ndarray) -> np.ndarray:
        b, c, h, w = x.shape
        p = self.pack
        x = x.reshape(b, c, h // p, p, w // p, p)  # (B, C, h/2, 2, w/2, 2)
        x = x.transpose(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
        return x.reshape(b, (h // p) * (w // p), c * p * p)  # (B, L, 4C)

    def vae_latents(self, latents: np.ndarray, height: int, width: int) -> np.ndarray:
        b, _, d = latents.shape
        p = self.pack
        h, w = height // self.vae_scale, width // self.vae_scale
        x = latents.reshape(b, h // p, w // p, d // (p * p), p, p)  # (B, h/2, w/2, C, 2, 2)
        x = x.transpose(0, 3, 1, 4, 2, 5)  # (B, C, h/2, 2, w/2, 2)
        return np.ascontiguousarray(x.reshape(b, d // (p * p), h, w))  # (B, C, h, w)

    def set_timesteps(self, scheduler: Scheduler, steps: int, shape: tuple[int, ...]) -> None:
        cfg = self.scheduler_config
        sigmas = np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(
            shape[1],  # image tokens
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        scheduler.set_timesteps(steps, mu=mu, sigmas=sigmas)

    def denoiser_inputs(self) -> set[str]:
        names = {"hidden_states", "timestep", "encoder_hidden_states", "pooled_projections"}
        names |= {"img_ids", "txt_ids"}
        return names | ({"guidance"} if self.pipeline.get("guidance_embeds") else set())

    def encode(self, prompt, negative_prompt, do_cfg, guidance, height, width) -> Feeds:
        pooled = states = None
        for enc in self.encoders:
            out = enc([prompt])
            if enc.kind == "t5":
                states = out[enc.hidden_output]  # (1, S, D)
            else:
                pooled = out["pooler_output"]  # (1, D_clip), not projected
        if pooled is None or states is None:
            raise BundleError("a flux bundle needs a CLIP and a T5 text encoder")
        h = height // self.vae_scale // self.pack
        w = width // self.vae_scale // self.pack
        img_ids = np.zeros((h, w, 3), np.float32)
        img_ids[..., 1] = np.arange(h)[:, None]  # row
        img_ids[..., 2] = np.arange(w)[None, :]  # column
        feeds = {
            "encoder_hidden_states": states,
            "pooled_projections": pooled,
            "txt_ids": np.zeros((states.shape[1], 3), np.float32),
            "img_ids": img_ids.reshape(h * w, 3),  # (L, 3)
        }
        if self.pipeline.get("guidance_embeds"):
            feeds["guidance"] = np.full(1, guidance, np.float32)
        return feeds

    def step_feeds(self, model_input: np.ndarray, t: np.float32) -> Feeds:
        # FluxPipeline passes timestep / 1000: the transformer scales it back internally.
        batch = model_input.shape[0]
        return {
            "hidden_states": model_input,
            "timestep": np.full(batch, t, np.float32) / np.float32(1000),
        }


CONDITIONINGS: dict[str, type[Conditioning]] = {
    cls.kind: cls for cls in (UNetConditioning, SD3Conditioning, FluxConditioning)
}
