"""The shapes a bundle is built for: every component's input shapes at the smallest, the
default and the largest run (the manifest's `profile`, ShapeProfile).

TensorRT needs them (one optimization profile per engine: min, opt and max per input;
export/tensorrt.py and each bundle's build.sh use them), and a static-shape backend checks
its feeds against them. They come from the exporter's own example-input builders at three
`Sizes`, so they hold for every family without a rule per family: the denoiser's text
length is what the runtime joins from the encoders (runtime/conditioning.py: segments one
after another on the token axis, each as long as its longest encoder).

Batch: the runtime encodes the prompt once (with the negative one under classifier-free
guidance: 2 rows), repeats the embeddings per image, runs all images of a call through the
denoiser in one batch (2 x images under CFG) and decodes them one at a time. So the text
encoders' batch runs 1..2 (1 at opt where an empty negative prompt is zeros, SDXL), the
denoiser's 1..2 x max images with 2 at opt (CFG), and the VAE's is 1.

Example:
    >>> r = size_range(load_model("tiny:sdxl"))                 # doctest: +SKIP
    >>> r.min_size, r.opt_size, r.max_size                      # doctest: +SKIP
    ((32, 32), (64, 64), (96, 96))
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from slimdiff.export.components import Component
from slimdiff.export.dummy_inputs import Sizes
from slimdiff.runtime.manifest import VAE_DECODER, VAE_ENCODER

from slimdiff.errors import UserError
from slimdiff.models.loading import LoadedModel
from slimdiff.models.vae import vae_scale_factor

__all__ = ["SizeRange", "shape_profile", "size_range"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SizeRange:
    """Image sizes (height, width in pixels) and images per call a bundle is built for."""

    min_size: tuple[int, int]
    opt_size: tuple[int, int]
    max_size: tuple[int, int]
    max_images: int
    vae_scale: int  # pixels per latent pixel
    cfg: bool  # the pipeline runs classifier-free guidance (batch x 2)


def _vae_scale(model: LoadedModel) -> int:
    return vae_scale_factor(model.pipe.vae.config)


def size_range(
    model: LoadedModel,
    min_size: tuple[int, int] | None = None,
    max_size: tuple[int, int] | None = None,
    max_images: int = 1,
) -> SizeRange:
    """The range to build for: by default half to 1.5x the model's default size (rounded to
    the sizes the denoiser takes), one image per call; a bad range is a UserError."""
    arch = model.arch
    scale = _vae_scale(model)
    multiple = arch.kind_for(model.denoiser.config).size_multiple(scale)
    opt = tuple(model.default_size)

    limit = model.max_side  # SD3: its positional embedding's reach

    def fit(size, what: str) -> tuple[int, int]:
        h, w = (int(v) for v in size)
        if h % multiple or w % multiple or h < multiple or w < multiple:
            raise UserError(
                f"{what} {w}x{h}: image sides must be positive multiples of {multiple} pixels "
                f"for this model; pass e.g. {max(multiple, w // multiple * multiple)}x"
                f"{max(multiple, h // multiple * multiple)}"
            )
        model.check_size((h, w), what)
        return h, w

    def scaled(factor: float) -> tuple[int, int]:
        top = limit if limit is not None else None
        sides = (max(multiple, int(v * factor) // multiple * multiple) for v in opt)
        return tuple(min(s, top // multiple * multiple) if top else s for s in sides)

    lo = fit(min_size, "min size") if min_size is not None else scaled(0.5)
    hi = fit(max_size, "max size") if max_size is not None else scaled(1.5)
    if any(a > b for a, b in zip(lo, hi, strict=True)):
        raise UserError(f"min size {lo[1]}x{lo[0]} exceeds max size {hi[1]}x{hi[0]}")
    default = opt
    opt = tuple(min(max(o, a), b) for o, a, b in zip(opt, lo, hi, strict=True))
    if opt != default:
        log.warning(
            "the model's default size %dx%d is outside the range built for (%dx%d to %dx%d): "
            "runs without --size fall outside it on the backends that hold to the range "
            "(TensorRT)",
            default[1],
            default[0],
            lo[1],
            lo[0],
            hi[1],
            hi[0],
        )
    if max_images < 1:
        raise UserError(f"max images {max_images}: build for at least one image per call")
    return SizeRange(lo, opt, hi, max_images, scale, arch.uses_cfg_for(model.denoiser.config))


def shape_profile(component: Component, model: LoadedModel, sizes: SizeRange) -> dict:
    """{"min", "opt", "max"}: input name -> concrete shape, for `component`."""
    per_image = 2 if sizes.cfg else 1
    vae = component.name in (VAE_DECODER, VAE_ENCODER)  # one image at a time
    # With SDXL's force_zeros_for_empty_prompt the runtime encodes no negative prompt when
    # none is given (zeros instead): one prompt at opt, two when a negative one is.
    text = component.name in {s.name for s in model.text_encoders}
    zeros = bool(model.pipe.config.get("force_zeros_for_empty_prompt", False))
    batches = {
        "min": 1,
        "opt": 1 if vae or (text and zeros) else per_image,
        "max": 1 if vae else per_image if text else sizes.max_images * per_image,
    }
    pixels = {"min": sizes.min_size, "opt": sizes.opt_size, "max": sizes.max_size}
    tokens = model.arch.text_length()  # an absent optional encoder's zeros count too
    profile = {}
    for point, batch in batches.items():
        h, w = (v // sizes.vae_scale for v in pixels[point])
        example = Sizes(batch=batch, height=h, width=w, text_len=tokens, full_text=True)
        feeds = component.make_inputs(example)
        profile[point] = {n: [int(d) for d in feeds[n].shape] for n in component.input_names}
    return profile
