"""Example inputs for tracing and for parity checks, built from a model's own config.

Two size sets: `TRACE` (what torch.onnx traces) and `CHECK` (what the parity check feeds),
deliberately different in batch, latent size and text length so a dimension that the
tracer baked into the graph shows up as a parity failure instead of a runtime surprise.

Per-kind knowledge (which config field is which width, what a realistic timestep or
position id looks like) is keyed by ArchSpec.denoiser_kind, not by family.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from slimdiff.models.arch import TensorSpec

__all__ = [
    "CHECK",
    "DYNAMIC_AXES",
    "TRACE",
    "Sizes",
    "denoiser_inputs",
    "text_encoder_inputs",
    "vae_decoder_inputs",
]

# Axis names that vary at run time; the other names in ArchSpec shapes ("C", "D", "P") stand
# for a width fixed by the model's config and are resolved to ints here.
DYNAMIC_AXES = frozenset({"B", "H", "W", "L", "S", "h", "w"})


@dataclass(frozen=True)
class Sizes:
    """Run-time sizes: batch, latent height/width (in latent pixels) and text length."""

    batch: int
    height: int
    width: int
    text_len: int  # the denoiser's text tokens ("S" in SD3/FLUX shapes)
    full_text: bool  # text encoders get the full max_length the runtime pads to
    seed: int


# Latent sides are multiples of 8 so every UNet downsampling and the 2x2 patching of
# SD3/FLUX divide evenly; batch 2 in the trace keeps the tracer from specialising on 1.
TRACE = Sizes(batch=2, height=16, width=16, text_len=16, full_text=False, seed=0)
CHECK = Sizes(batch=3, height=8, width=24, text_len=24, full_text=True, seed=1)

# Prompt words for the text encoders' example inputs (all single tokens in the tiny vocab).
_WORDS = ("a", "red", "blue", "small", "circle", "square", "photo", "of", "cat", "on", "the", "sky")


def text_encoder_inputs(tokenizer, max_length: int, sizes: Sizes) -> dict[str, torch.Tensor]:
    """input_ids (B, S) made by the pipeline's own tokenizer from random short prompts.

    Real prompts put BOS/EOS/padding where the pipeline does, so pooled outputs (which read
    the EOS position) are checked on the path they take in production. The trace uses a
    short S; the check uses the full `max_length` the runtime pads to.
    """
    gen = torch.Generator().manual_seed(sizes.seed)
    length = max_length if sizes.full_text else min(sizes.text_len, max_length)
    prompts = []
    for _ in range(sizes.batch):
        n = int(torch.randint(1, 12, (1,), generator=gen))
        idx = torch.randint(len(_WORDS), (n,), generator=gen).tolist()
        prompts.append(" ".join(_WORDS[i] for i in idx))
    ids = tokenizer(
        prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    ).input_ids
    return {"input_ids": ids.to(torch.int64)}


def vae_decoder_inputs(vae, sizes: Sizes) -> dict[str, torch.Tensor]:
    """latent_sample (B, C, h, w) ~ N(0, 1): what the runtime feeds after unscaling."""
    gen = torch.Generator().manual_seed(sizes.seed)
    shape = (sizes.batch, vae.config.latent_channels, sizes.height, sizes.width)
    return {"latent_sample": torch.randn(shape, generator=gen)}


# ---------------------------------------------------------------- denoisers


def _unet_axes(cfg, s: Sizes) -> dict[str, int]:
    axes = {"C": cfg.in_channels, "D": cfg.cross_attention_dim}
    if cfg.get("addition_embed_type") == "text_time":
        # SDXL's add_embedding takes [text_embeds, 6 Fourier-embedded time ids].
        axes["P"] = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return axes


def _dit_axes(cfg, s: Sizes) -> dict[str, int]:
    return {"C": cfg.in_channels, "D": cfg.joint_attention_dim, "P": cfg.pooled_projection_dim}


def _flux_axes(cfg, s: Sizes) -> dict[str, int]:
    # FLUX packs 2x2 latent patches into one token: L = (h/2) * (w/2), C = 4 * channels.
    return {**_dit_axes(cfg, s), "L": (s.height // 2) * (s.width // 2)}


def _flux_img_ids(s: Sizes) -> torch.Tensor:
    # FluxPipeline._prepare_latent_image_ids: (row, col) position of each packed token.
    h, w = s.height // 2, s.width // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)  # (h, w, 3) -> (L, 3)


def _sdxl_time_ids(s: Sizes) -> torch.Tensor:
    # (original_h, original_w, crop_top, crop_left, target_h, target_w) in pixels.
    h, w = 8 * s.height, 8 * s.width
    return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).repeat(s.batch, 1)


@dataclass(frozen=True)
class _DenoiserKind:
    axes: Callable  # (config, Sizes) -> sizes of the config-derived axes
    timestep_max: float  # timesteps as the pipeline passes them: [0, 1000) or FLUX's [0, 1)
    special: dict[str, Callable[[Sizes], torch.Tensor]]  # inputs that are not noise


DENOISER_KINDS: dict[str, _DenoiserKind] = {
    "unet": _DenoiserKind(_unet_axes, 1000.0, {"time_ids": _sdxl_time_ids}),
    "sd3": _DenoiserKind(_dit_axes, 1000.0, {}),
    "flux": _DenoiserKind(
        _flux_axes,
        1.0,  # FluxPipeline passes timestep / 1000
        {
            "img_ids": _flux_img_ids,
            "txt_ids": lambda s: torch.zeros(s.text_len, 3),
            "guidance": lambda s: torch.linspace(1.0, 5.0, s.batch),
        },
    ),
}


def resolve_shape(spec: TensorSpec, axes: dict[str, int]) -> tuple[int, ...]:
    """Concrete shape of `spec` given a size for each named axis."""
    return tuple(d if isinstance(d, int) else axes[d] for d in spec.shape)


def denoiser_inputs(
    kind: str, denoiser, specs: Sequence[TensorSpec], sizes: Sizes
) -> dict[str, torch.Tensor]:
    """One tensor per spec, in spec order, sized from `sizes` and the denoiser's config.

    Example:
        >>> feeds = denoiser_inputs("unet", unet, arch.denoiser_inputs, TRACE)  # doctest: +SKIP
        >>> feeds["sample"].shape  # doctest: +SKIP
        torch.Size([2, 4, 16, 16])
    """
    k = DENOISER_KINDS[kind]
    gen = torch.Generator().manual_seed(sizes.seed)
    axes = {"B": sizes.batch, "H": sizes.height, "W": sizes.width, "S": sizes.text_len}
    axes.update(k.axes(denoiser.config, sizes))
    feeds = {}
    for spec in specs:
        if spec.name in k.special:
            feeds[spec.name] = k.special[spec.name](sizes)
        elif spec.name == "timestep":
            feeds[spec.name] = torch.rand(sizes.batch, generator=gen) * k.timestep_max
        else:
            feeds[spec.name] = torch.randn(resolve_shape(spec, axes), generator=gen)
    return feeds
