"""SDXL's size and crop conditioning ("micro-conditioning", Podell et al. 2023, SDXL
Sec. 2.2): the UNet's time ids tell it the size of the image it learnt from
(`original_size`), where that image was cropped (`crops_coords_top_left`) and the size
it draws (`target_size`); CFG's negative rows may carry other values
(`negative_original_size`, ...), which steers away from, say, low-resolution sources.

The rows are those of diffusers 0.42's SDXL pipelines (`_get_add_time_ids`), whose
defaults differ by pipeline, and this port keeps each one's:

- text-to-image (StableDiffusionXLPipeline, its ControlNet pipeline): the negative rows
  take the negative values only when both negative sizes are given (the negative crop
  then defaults to (0, 0)); otherwise they equal the prompt's rows.
- image-to-image and inpainting (StableDiffusionXLImg2ImgPipeline, ...InpaintPipeline):
  each negative size defaults to its prompt's, and the negative rows carry the prompt's
  crop (that pipeline ignores negative_crops_coords_top_left).
- the SDXL refiner (the img2img pipeline with requires_aesthetics_score): five ids,
  original size, crop and aesthetic score; the negative crop defaults to (0, 0) and the
  target sizes are not used.

Where a pipeline ignores a given value, this logs a warning and ignores it too, so that
the image stays diffusers'. Two departures: diffusers' text-to-image pipeline repeats the
[negative, prompt] pair of rows over the batch, which past one image gives some negative
rows the prompt's ids (and the other way round) when the two differ; here negative rows
carry the negative ids for every batch. And its SDXL ControlNet inpaint pipeline ignores
the negative values altogether; here they apply as in its other image-to-image
pipelines. Heights and widths in pixels, (height, width) as diffusers.

Example:
    >>> values = check_size_conditioning(True, {"original_size": (512, 512)})
    >>> negative, positive = time_id_rows(values, 1024, 1024, image_to_image=False)
    >>> positive.tolist()
    [512.0, 512.0, 0.0, 0.0, 1024.0, 1024.0]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from slimdiff.runtime.call_checks import whole_pair

from slimdiff.errors import UserError
from slimdiff.limits import MAX_CONDITIONING_SIDE

__all__ = ["SIZE_CONDITIONING", "SizeConditioning", "check_size_conditioning", "time_id_rows"]

log = logging.getLogger(__name__)

Pair = tuple[int, int]


@dataclass(frozen=True)
class SizeConditioning:
    """A call's micro-conditioning values, checked; None: the pipeline's default."""

    original_size: Pair | None = None
    crops_coords_top_left: Pair | None = None
    target_size: Pair | None = None
    negative_original_size: Pair | None = None
    negative_crops_coords_top_left: Pair | None = None
    negative_target_size: Pair | None = None

    @property
    def has_negatives(self) -> bool:
        """Whether any value for CFG's negative rows was given."""
        return any(getattr(self, k) is not None for k in SIZE_CONDITIONING if "negative" in k)


SIZE_CONDITIONING = tuple(f.name for f in fields(SizeConditioning))


def check_size_conditioning(takes_time_ids: bool, values: dict[str, Any]) -> SizeConditioning:
    """`values` (keyword -> a (height, width) or (top, left) pair, or None) checked: whole
    numbers, sizes 1 to MAX_CONDITIONING_SIDE, crops 0 to it. UserError for a bad value,
    or for any value given to a denoiser without SDXL's time ids (`takes_time_ids`)."""
    unknown = sorted(set(values) - set(SIZE_CONDITIONING))
    if unknown:
        raise ValueError(f"not size conditioning: {', '.join(unknown)}")
    given = {k: v for k, v in values.items() if v is not None}
    if given and not takes_time_ids:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise UserError(
            f"{', '.join(given)}: size and crop conditioning is SDXL's (its UNet's time ids); "
            f"this bundle's denoiser takes none: leave them out (run: {flags})"
        )
    return SizeConditioning(**{k: _pair(k, v) for k, v in given.items()})


def _pair(name: str, value: Any) -> Pair:
    crop = "crops" in name
    low = 0 if crop else 1
    what = "(top, left) in pixels" if crop else "(height, width) in pixels"
    fix = f"use two whole numbers {what}, each {low} to {MAX_CONDITIONING_SIDE}"
    pair = whole_pair(value)
    if pair is None or not all(low <= v <= MAX_CONDITIONING_SIDE for v in pair):
        raise UserError(f"{name} {value!r}: {fix}")
    return pair


def time_id_rows(
    values: SizeConditioning,
    height: int,
    width: int,
    *,
    image_to_image: bool,
    aesthetic: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(negative row, prompt row) of the time ids for a height x width image, float32: six
    ids, or five with the refiner's (negative, positive) `aesthetic` scores.
    `image_to_image`: the run is diffusers' img2img or inpaint pipeline's (it starts from
    an image or from a base model's latents), whose negative defaults differ."""
    size = (height, width)
    original = values.original_size or size
    crop = values.crops_coords_top_left or (0, 0)
    target = values.target_size or size
    neg_original = values.negative_original_size
    neg_crop = values.negative_crops_coords_top_left
    neg_target = values.negative_target_size
    if aesthetic is not None:  # the refiner
        _ignored(values, ("target_size", "negative_target_size"), "the SDXL refiner")
        positive = (*original, *crop, aesthetic[1])
        negative = (*(neg_original or original), *(neg_crop or (0, 0)), aesthetic[0])
    elif image_to_image:
        _ignored(values, ("negative_crops_coords_top_left",), "SDXL image-to-image")
        positive = (*original, *crop, *target)
        negative = (*(neg_original or original), *crop, *(neg_target or target))
    else:
        positive = (*original, *crop, *target)
        if neg_original is not None and neg_target is not None:
            negative = (*neg_original, *(neg_crop or (0, 0)), *neg_target)
        else:
            negative = positive
            unused = ("negative_original_size", "negative_target_size")
            unused += ("negative_crops_coords_top_left",)
            _ignored(values, unused, "SDXL text-to-image without both negative sizes")
    return np.array(negative, np.float32), np.array(positive, np.float32)


def _ignored(values: SizeConditioning, names: tuple[str, ...], where: str) -> None:
    given = [n for n in names if getattr(values, n) is not None]
    if given:
        log.warning("%s: not used by %s (as in diffusers); ignored", ", ".join(given), where)
