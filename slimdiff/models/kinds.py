"""How a pipeline drives its denoiser, as data: the torch-free half of an ArchSpec.

A `KindSpec` says what the denoising loop feeds the denoiser and how: which input takes the
latents, how latents are laid out (FLUX packs 2x2 patches into tokens), what the timestep
input is, how the schedule is set (FLUX's linspace sigmas and resolution-dependent shift),
how the text encoders' outputs become the denoiser's conditioning, and which extra inputs
(SDXL's time ids, FLUX's position ids and embedded guidance) it takes. Each ArchSpec holds
one; the exporter writes it, filled in for the exported model, into a bundle's manifest, and
the runtime's denoising loop reads only that record, so no code outside slimdiff.models
branches on the family.

This module imports numpy and pydantic only: the torch-free runtime imports it. The array
helpers take numpy arrays or torch tensors alike (export, calibration and the runtime share
them), so FLUX's packing and ids are written once.

Example:
    >>> spec = get_arch("flux").kind                              # doctest: +SKIP
    >>> x = np.zeros((1, 16, 8, 8), np.float32)
    >>> pack_latents(x, 2).shape
    (1, 16, 64)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import numpy as np
import pydantic

from slimdiff.errors import UserError

__all__ = [
    "AESTHETIC_SCORE",
    "CONTROL_GUESS",
    "CONTROL_IMAGE",
    "CONTROL_ROWS",
    "CONTROL_SCALE",
    "EXTRA_INPUTS",
    "KIND_WRITTEN_WHEN_SET",
    "NEGATIVE_AESTHETIC_SCORE",
    "KindSpec",
    "ShiftSpec",
    "calculate_shift",
    "drop_unset",
    "extra_inputs",
    "guidance_embedding",
    "img2img_begin",
    "is_inpainting",
    "latent_shape",
    "pack_latents",
    "refuse_inpainting",
    "timestep_args",
    "unpack_latents",
]

# Denoiser inputs besides the latents, the timestep and the text conditioning, each made by
# `extra_inputs` from the image geometry (and, for "guidance", the guidance value):
#   time_ids  (B, 6)  SDXL's micro-conditioning: original size, crop top-left, target size;
#             (B, 5) for the SDXL refiner (KindSpec.aesthetic_score): the aesthetic score
#             in place of the target size
#   img_ids   (L, 3)  FLUX's (0, row, column) id of each packed latent token
#   txt_ids   (S, 3)  FLUX's text token ids: all zero
#   guidance  (B,)    FLUX.1-dev's embedded guidance scale (schnell has no such input)
#   timestep_cond (B, G)  an LCM-distilled UNet's guidance embedding (its config's
#                     time_cond_proj_dim = G): sinusoids of (guidance - 1) * 1000
EXTRA_INPUTS = ("time_ids", "img_ids", "txt_ids", "guidance", "timestep_cond")
ExtraInput = Literal["time_ids", "img_ids", "txt_ids", "guidance", "timestep_cond"]
# A UNet steered by ControlNets (`export --controlnet`) takes their control images (N, B, 3,
# 8H, 8W) in [0, 1] and their scales (N,) besides (slimdiff/models/controlnet.py), and for
# diffusers' guess mode a weight per row (B,) (0 on the unconditional rows under CFG: the
# residuals reach the conditional half only) and a switch (1,) to its per-residual scales.
CONTROL_IMAGE = "controlnet_cond"
CONTROL_SCALE = "conditioning_scale"
CONTROL_ROWS = "control_rows"
CONTROL_GUESS = "control_guess"
# KindSpec fields a manifest holds only when they are set (see drop_unset).
KIND_WRITTEN_WHEN_SET = frozenset(
    {"guidance_embedding_dim", "strength_rounding", "inpainting", "aesthetic_score", "true_cfg"}
)
# diffusers' StableDiffusionXLImg2ImgPipeline defaults: the score the positive rows' time ids
# carry, and the negative (unconditional) rows'.
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5


def drop_unset(data: dict[str, Any], keys: Any) -> dict[str, Any]:
    """`data` without those of `keys` that are None: optional fields added to the manifest
    within a schema version are written only when set, so the manifests of every model
    without them stay byte-identical to earlier versions' (same identity), and those
    versions' strict readers still read them."""
    for key in keys:
        if data.get(key) is None:
            data.pop(key, None)
    return data


# The extra inputs that carry the guidance scale into the denoiser: a model with one is
# not run with classifier-free guidance (diffusers' pipelines decide it the same way).
_GUIDANCE_INPUTS = ("guidance", "timestep_cond")


class _Record(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(
        extra="forbid", frozen=True, strict=True, allow_inf_nan=False
    )


Name = Annotated[str, pydantic.StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]


class ShiftSpec(_Record):
    """The flow-matching pipelines' resolution-dependent shift `mu` (FLUX's calculate_shift),
    with the defaults the pipeline uses when the scheduler config lacks a key."""

    base_image_seq_len: int = pydantic.Field(256, ge=1, le=1 << 20)
    max_image_seq_len: int = pydantic.Field(4096, ge=2, le=1 << 20)
    base_shift: float = pydantic.Field(0.5, ge=-10, le=10)
    max_shift: float = pydantic.Field(1.15, ge=-10, le=10)

    @pydantic.model_validator(mode="after")
    def _line(self) -> ShiftSpec:
        if self.max_image_seq_len <= self.base_image_seq_len:
            raise ValueError("max_image_seq_len must exceed base_image_seq_len (mu is a line)")
        return self


class KindSpec(_Record):
    """What the denoising loop feeds one kind of denoiser (see module docstring)."""

    name: Name  # a label ("unet", "sd3", "flux"); nothing branches on it
    sample_input: Name  # the denoiser input that takes the (scaled) latents
    # Where the pooled text embedding goes ("text_embeds" for SDXL, "pooled_projections"
    # for SD3/FLUX); None when the denoiser takes none (SD1.5).
    pooled_input: Name | None = None
    # p: the latents reach the denoiser as (B, (h/p)(w/p), C p^2) tokens (FLUX: 2).
    latent_packing: int = pydantic.Field(1, ge=1, le=8)
    # Latent pixels per token side (SD3 patchifies 2x2 inside the model, FLUX packs 2x2):
    # the image-token count of the shift, and with the VAE scale the size multiple.
    token_patch: int = pydantic.Field(1, ge=1, le=8)
    # The denoiser's `timestep` input is the scheduler's t divided by this (FluxPipeline
    # passes t / 1000; the transformer multiplies it back).
    timestep_divisor: float = pydantic.Field(1.0, gt=0, le=1e6)
    # "linspace": the pipeline gives the scheduler sigmas = linspace(1, 1/n, n) (FLUX).
    sigmas: Literal["linspace"] | None = None
    # Present: the pipeline computes `mu` from the image-token count and passes it to the
    # scheduler, which uses it when its config has use_dynamic_shifting (SD3.5, FLUX).
    shift: ShiftSpec | None = None
    extra_inputs: tuple[ExtraInput, ...] = ()
    # G of "timestep_cond", the guidance embedding's width; None without that input.
    guidance_embedding_dim: int | None = pydantic.Field(None, ge=4, le=65536)
    # How the family's img2img pipeline turns `strength` into its first step (img2img_begin):
    # None rounds the denoised steps down (SD1.5, SDXL: start = n - int(n * strength)),
    # "start" rounds the start down (SD3, FLUX: start = int(n - n * strength)).
    strength_rounding: Literal["start"] | None = None
    # True: an inpainting-trained denoiser (SD1.5/SDXL inpainting UNets, 9 input channels),
    # whose sample input takes the latents, the mask and the masked image's latents joined
    # on the channel axis; it runs only with an image and a mask. None: plain latents.
    inpainting: Literal[True] | None = None
    # True: the SDXL refiner's UNet (diffusers' StableDiffusionXLImg2ImgPipeline with
    # requires_aesthetics_score): its time ids carry an aesthetic score in place of the
    # target size (6.0 on the prompt's rows, 2.5 on the negative's), and it runs only on an
    # image or on a base model's partly denoised latents. None: SDXL's six time ids.
    aesthetic_score: Literal[True] | None = None
    # True: the family's pipeline offers diffusers' `true_cfg_scale` (FluxPipeline): a
    # second denoiser pass per step on the negative prompt. None: it guides by CFG or not
    # at all (bundles exported before it: refused).
    true_cfg: Literal[True] | None = None

    @pydantic.model_serializer(mode="wrap")
    def _omit_absent_embedding(self, handler: Any) -> dict[str, Any]:
        return drop_unset(handler(self), KIND_WRITTEN_WHEN_SET)

    @property
    def embeds_guidance(self) -> bool:
        """The denoiser takes the guidance scale as an input (FLUX.1-dev, LCM UNets)."""
        return any(name in _GUIDANCE_INPUTS for name in self.extra_inputs)

    def size_multiple(self, vae_scale: int) -> int:
        """Pixels that height and width must be multiples of, from the latent grid alone."""
        return vae_scale * max(self.latent_packing, self.token_patch)

    def image_tokens(self, lat_h: int, lat_w: int) -> int:
        return (lat_h // self.token_patch) * (lat_w // self.token_patch)

    def input_names(self) -> set[str]:
        """Every denoiser input the loop feeds."""
        names = {self.sample_input, "timestep", "encoder_hidden_states", *self.extra_inputs}
        return names | ({self.pooled_input} if self.pooled_input else set())


# ---------------------------------------------------------------- latents


def _permute(x: Any, axes: tuple[int, ...]) -> Any:
    # numpy's transpose takes the axis order; torch's permute does (its transpose swaps two).
    return x.permute(*axes) if hasattr(x, "permute") else x.transpose(axes)


def pack_latents(x: Any, p: int) -> Any:
    """(B, C, h, w) -> (B, (h/p)(w/p), C p^2), FluxPipeline._pack_latents; p = 1: as is."""
    if p == 1:
        return x
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)  # (B, C, h/p, p, w/p, p)
    x = _permute(x, (0, 2, 4, 1, 3, 5))  # (B, h/p, w/p, C, p, p)
    return x.reshape(b, (h // p) * (w // p), c * p * p)  # (B, L, C p^2)


def unpack_latents(x: Any, p: int, lat_h: int, lat_w: int) -> Any:
    """(B, L, C p^2) -> (B, C, h, w), FluxPipeline._unpack_latents; p = 1: as is."""
    if p == 1:
        return x
    b, _, d = x.shape
    c = d // (p * p)
    x = x.reshape(b, lat_h // p, lat_w // p, c, p, p)  # (B, h/p, w/p, C, p, p)
    x = _permute(x, (0, 3, 1, 4, 2, 5))  # (B, C, h/p, p, w/p, p)
    return x.reshape(b, c, lat_h, lat_w)  # (B, C, h, w)


def latent_shape(spec: KindSpec, batch: int, channels: int, lat_h: int, lat_w: int) -> tuple:
    """Shape of the latents the denoiser sees, as diffusers' `latents=` argument takes them."""
    p = spec.latent_packing
    if p == 1:
        return (batch, channels, lat_h, lat_w)
    return (batch, (lat_h // p) * (lat_w // p), channels * p * p)


# ---------------------------------------------------------------- schedule


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's `mu`: the log-shift, linear in the number of image tokens (pipeline_flux.py)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def timestep_args(
    spec: KindSpec, scheduler_config: dict[str, Any], steps: int, lat_h: int, lat_w: int
) -> dict[str, Any]:
    """The keyword arguments the family's pipeline gives `scheduler.set_timesteps`.

    Example:
        >>> timestep_args(get_arch("sdxl").kind, {}, 30, 128, 128)   # doctest: +SKIP
        {'num_inference_steps': 30}
    """
    args: dict[str, Any] = {"num_inference_steps": steps}
    # FluxPipeline passes its linspace sigmas except to a scheduler that builds flow sigmas
    # itself (use_flow_sigmas: UniPC, DPM-Solver), which gets only mu
    if spec.sigmas == "linspace" and not scheduler_config.get("use_flow_sigmas"):
        args["sigmas"] = np.linspace(1.0, 1 / steps, steps)
    # mu only for a schedule that shifts by resolution, as SD3's pipeline passes it (FLUX's
    # always passes it, and a static-shift FlowMatchEuler ignores it there): a scheduler
    # without dynamic shifting (SD3's flow-match Heun) takes no mu
    if spec.shift is not None and scheduler_config.get("use_dynamic_shifting"):
        s, cfg = spec.shift, scheduler_config
        args["mu"] = calculate_shift(
            spec.image_tokens(lat_h, lat_w),
            cfg.get("base_image_seq_len", s.base_image_seq_len),
            cfg.get("max_image_seq_len", s.max_image_seq_len),
            cfg.get("base_shift", s.base_shift),
            cfg.get("max_shift", s.max_shift),
        )
    return args


def is_inpainting(config: Any) -> bool:
    """Whether a denoiser config is an inpainting-trained UNet's: in_channels = 2 x
    out_channels + 1 (the latents, the masked image's latents and the mask; diffusers'
    inpaint pipelines tell them apart by the same count)."""
    inputs, outputs = config.get("in_channels"), config.get("out_channels")
    return isinstance(inputs, int) and isinstance(outputs, int) and inputs == 2 * outputs + 1


def refuse_inpainting(config: Any, what: str, kind: KindSpec | None = None) -> None:
    """UserError for a model that cannot draw text-to-image where `what` draws it
    (calibration, bench): an inpainting model, or (`kind` given) the SDXL refiner."""
    if is_inpainting(config):
        raise UserError(
            f"{what} draws text-to-image, which an inpainting model (its UNet takes a mask "
            "and a masked image) cannot: passes that calibrate (blocks.remove with "
            "distillation, prune.ecodiff, quant.quest) and bench do not take it yet; "
            "lora.fuse, text.drop, vae.replace, export and run --image --mask do"
        )
    if kind is not None and kind.aesthetic_score:
        raise UserError(
            f"{what} draws text-to-image from noise, which the SDXL refiner is not trained "
            "for (it refines an image, or a base model's last steps): passes that calibrate "
            "(blocks.remove with distillation, prune.ecodiff, quant.quest) and bench do not "
            "take it; lora.fuse, vae.replace, export and run --image (or run BASE --refiner) do"
        )


def img2img_begin(spec: KindSpec, steps: int, strength: float, order: int) -> int:
    """The index of the first scheduler call of an image-to-image run: the family's img2img
    pipeline's get_timesteps, `t_start * scheduler.order` (Heun-like schedulers make two
    calls per step). `strength` 1 starts at the first step, lower values later.

    Example:
        >>> img2img_begin(KindSpec(name="unet", sample_input="sample"), 30, 0.75, 1)
        8
    """
    if spec.strength_rounding == "start":  # SD3 and FLUX round the start down
        start = int(max(steps - steps * strength, 0))
    else:  # SD1.5 and SDXL round the number of denoised steps down
        start = max(steps - min(int(steps * strength), steps), 0)
    return start * order


# ---------------------------------------------------------------- extra inputs


def extra_inputs(
    names: Sequence[str],
    *,
    batch: int,
    height: int,
    width: int,
    vae_scale: int,
    packing: int,
    text_len: int,
    guidance: float | np.ndarray = 0.0,
    embedding_dim: int | None = None,
    aesthetic: np.ndarray | None = None,
    time_ids: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The extra denoiser inputs `names` (see EXTRA_INPUTS) for one image of height x width
    pixels, float32, as the diffusers pipelines build them. `embedding_dim`: the width of
    "timestep_cond" (KindSpec.guidance_embedding_dim). `aesthetic`: the SDXL refiner's
    aesthetic score of each row (B,), which its time ids carry in place of the target
    size; None: SDXL's six time ids. `time_ids`: the rows themselves (B, 5 or 6), as the
    runtime builds them from a call's size conditioning (runtime/size_conditioning.py)."""
    out: dict[str, np.ndarray] = {}
    for name in names:
        if name == "time_ids" and time_ids is not None:
            out[name] = np.asarray(time_ids, np.float32)
        elif name == "time_ids":
            # original_size + crops_coords_top_left + target_size (SDXL's _get_add_time_ids),
            # or + aesthetic_score where the pipeline requires_aesthetics_score (refiner)
            if aesthetic is None:
                row = np.array([[height, width, 0, 0, height, width]], np.float32)
                out[name] = np.repeat(row, batch, axis=0)
            else:
                rows = np.zeros((batch, 5), np.float32)
                rows[:, :2] = (height, width)
                rows[:, 4] = np.broadcast_to(np.asarray(aesthetic, np.float32), (batch,))
                out[name] = rows
        elif name == "img_ids":
            # FluxPipeline._prepare_latent_image_ids: (0, row, column) per packed token
            h = height // vae_scale // packing
            w = width // vae_scale // packing
            ids = np.zeros((h, w, 3), np.float32)
            ids[..., 1] = np.arange(h)[:, None]
            ids[..., 2] = np.arange(w)[None, :]
            out[name] = ids.reshape(h * w, 3)  # (L, 3)
        elif name == "txt_ids":
            out[name] = np.zeros((text_len, 3), np.float32)
        elif name == "guidance":
            out[name] = np.broadcast_to(np.asarray(guidance, np.float32), (batch,)).copy()
        elif name == "timestep_cond":
            if not embedding_dim:
                raise ValueError("timestep_cond needs the guidance embedding's width")
            w = np.broadcast_to(np.asarray(guidance, np.float32), (batch,)) - np.float32(1)
            out[name] = guidance_embedding(w, embedding_dim)
        else:
            raise ValueError(f"unknown extra denoiser input {name!r}; known: {EXTRA_INPUTS}")
    return out


def guidance_embedding(w: np.ndarray, dim: int) -> np.ndarray:
    """(B, dim) sinusoidal embedding of guidance values `w` (B,), float32: the `w_embedding`
    of Luo et al., "Latent Consistency Models" (arXiv:2310.04378), from VDM's timestep
    embedding, as diffusers' pipelines compute it (get_guidance_scale_embedding; they pass
    w = guidance_scale - 1): sin then cos of w * 1000 * 10000^(-k / (dim/2 - 1)),
    zero-padded to an odd `dim`."""
    # diffusers' float32 steps, each rounded as float32 arithmetic rounds (products) or
    # from float64 (exp, sin, cos: correctly rounded, where numpy's and torch's float32
    # kernels may differ by an ulp). The arguments reach w * 1000 = 1.4e4 rad, where one
    # ulp of a frequency moves a sinusoid by up to 1e-3.
    f32 = np.float32
    half = dim // 2
    step = f32(np.log(f32(10000.0), dtype=np.float64)) / f32(half - 1)
    freqs = np.exp((np.arange(half, dtype=f32) * -step).astype(np.float64)).astype(f32)
    args = ((np.asarray(w, f32) * f32(1000.0))[:, None] * freqs[None, :]).astype(np.float64)
    emb = np.concatenate([np.sin(args), np.cos(args)], axis=1)
    if dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32)
