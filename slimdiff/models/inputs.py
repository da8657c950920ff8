"""Denoiser inputs built from an ArchSpec and the denoiser's own config.

One builder for everything that calls a denoiser outside its pipeline: the exporter traces
and checks graphs on random inputs, `inspect` counts FLOPs on zeros of the real
conditioning shapes, and `denoiser_kwargs` maps flat feeds (ONNX input names) onto the
diffusers call (SDXL's `added_cond_kwargs`), so the IO contract lives in the ArchSpec.

Example:
    >>> feeds = denoiser_inputs(arch, unet, Sizes(2, 16, 16, 16))        # doctest: +SKIP
    >>> unet(**denoiser_kwargs(arch.present_inputs(unet.config), feeds))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from slimdiff.models.arch import ArchSpec, TensorSpec
from slimdiff.models.kinds import extra_inputs

__all__ = ["Sizes", "denoiser_inputs", "denoiser_kwargs", "denoiser_specs", "resolve_shape"]

# A sample's timestep is drawn in [0, this) before the kind's divisor: diffusers' schedulers
# run on 1000 training timesteps.
_TRAIN_TIMESTEPS = 1000.0
# Inputs drawn uniformly from their range: a control image in [0, 1] (as diffusers'
# ControlNet pipelines feed it, unnormalised), a conditioning scale around 1.
_UNIFORM = {"controlnet_cond": (0.0, 1.0), "conditioning_scale": (0.5, 1.5)}


@dataclass(frozen=True)
class Sizes:
    """Run-time sizes: batch, latent height/width (in latent pixels) and text length."""

    batch: int
    height: int
    width: int
    text_len: int  # the denoiser's text tokens ("S" in SD3/FLUX shapes)
    full_text: bool = False  # text encoders get the full max_length the runtime pads to
    seed: int = 0


def resolve_shape(spec: TensorSpec, axes: Mapping[str, int]) -> tuple[int, ...]:
    """Concrete shape of `spec` given a size for each named axis."""
    return tuple(d if isinstance(d, int) else axes[d] for d in spec.shape)


def denoiser_specs(arch: ArchSpec, denoiser: torch.nn.Module) -> tuple[TensorSpec, ...]:
    """The denoiser's graph inputs, in order: its ArchSpec's present ones, then any its
    module adds (a ControlNet's control image and scale: slimdiff/models/controlnet.py)."""
    return arch.present_inputs(denoiser.config) + tuple(getattr(denoiser, "input_specs", ()))


def denoiser_inputs(
    arch: ArchSpec,
    denoiser: torch.nn.Module,
    sizes: Sizes,
    *,
    zeros: bool = False,
    vae_scale: int = 8,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """One tensor per input the denoiser takes, in ArchSpec order, keyed by ONNX name.

    Random (seeded by `sizes.seed`): latents and text states ~ N(0, 1), timesteps uniform
    over the training range, and the extra inputs (time ids, position ids) as the pipelines
    build them. `zeros`: every input zero (FLOPs do not depend on values), on any device,
    `meta` included.
    """
    cfg = denoiser.config
    specs = denoiser_specs(arch, denoiser)
    axes = arch.axis_sizes(
        cfg, batch=sizes.batch, lat_h=sizes.height, lat_w=sizes.width, text_len=sizes.text_len
    )
    # a control image's pixels: the ControlNet's own scale (checked equal to the VAE's)
    pixels = getattr(denoiser, "pixels_per_latent", vae_scale)
    axes.update({"8H": sizes.height * pixels, "8W": sizes.width * pixels})
    like = {"device": device, "dtype": dtype or torch.float32}
    if zeros:
        return {s.name: torch.zeros(resolve_shape(s, axes), **like) for s in specs}
    kind = arch.kind_for(cfg)
    extra = extra_inputs(
        kind.extra_inputs,
        batch=sizes.batch,
        height=sizes.height * vae_scale,
        width=sizes.width * vae_scale,
        vae_scale=vae_scale,
        packing=kind.latent_packing,
        text_len=sizes.text_len,
        guidance=torch.linspace(1.0, 5.0, sizes.batch).numpy(),  # varied, for parity checks
        embedding_dim=kind.guidance_embedding_dim,
        # the refiner's aesthetic scores, varied over the batch as the guidance above
        aesthetic=torch.linspace(2.5, 6.0, sizes.batch).numpy() if kind.aesthetic_score else None,
    )
    gen = torch.Generator().manual_seed(sizes.seed)
    feeds: dict[str, torch.Tensor] = {}
    for spec in specs:
        if spec.name in extra:
            value = torch.from_numpy(extra[spec.name])
        elif spec.name == "timestep":
            t = torch.rand(sizes.batch, generator=gen) * _TRAIN_TIMESTEPS
            value = t / kind.timestep_divisor
        elif spec.name in _UNIFORM:  # a control image's pixels, a conditioning scale
            low, high = _UNIFORM[spec.name]
            value = low + (high - low) * torch.rand(resolve_shape(spec, axes), generator=gen)
        else:
            value = torch.randn(resolve_shape(spec, axes), generator=gen)
        feeds[spec.name] = value.to(**like)
    return feeds


def denoiser_kwargs(specs: Iterable[TensorSpec], feeds: Mapping[str, Any]) -> dict[str, Any]:
    """The denoiser's keyword arguments for flat `feeds`: each under its spec's `arg`
    (dotted into nested dicts), else its name. Feeds without a spec are an error."""
    by_name = {s.name: s for s in specs}
    kwargs: dict[str, Any] = {}
    for name, value in feeds.items():
        *path, leaf = (by_name[name].arg or name).split(".")
        node = kwargs
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return kwargs
