"""A ControlNet's inputs from a bundle whose denoiser holds one (`export --controlnet`): the
control image and the conditioning scale of each step, as diffusers' ControlNet pipelines
(StableDiffusion(XL)ControlNet(Img2Img|Inpaint)Pipeline, diffusers 0.42) make them.

The scale defaults to 1 in every mode, as diffusers' text-to-image ControlNet pipelines
(its img2img ones default to 0.8, its SD1.5 inpaint one to 0.5: pass the scale to match).
The control image is resized to the run's size (Lanczos) and fed in [0, 1], not normalised;
one row per image, twice over under classifier-free guidance (guess mode, which runs the
ControlNet on the conditional half only, is not offered). The scale is
`scale` on the steps inside [start, end] of the steps that run, 0 outside:
diffusers' `controlnet_keep`.
"""

from __future__ import annotations

import numpy as np
from slimdiff.runtime.image import ImageInput, load_image, prepare_image
from slimdiff.runtime.manifest import PipelineSpec

from slimdiff.errors import UserError
from slimdiff.limits import MAX_CONTROL_SCALE

__all__ = ["check_control", "control_pixels", "control_scales"]


def check_control(
    config: PipelineSpec,
    image: ImageInput | None,
    scale: float,
    start: float,
    end: float,
):
    """The control image as an RGB image (None when not given), once the bundle can take
    one and the scale and window are valid; UserError otherwise."""
    if image is not None and config.controlnet is None:
        raise UserError(
            "this bundle has no ControlNet, which a control image needs; export it again "
            "with --controlnet DIR (recipe: export.controlnet)"
        )
    value, first, last = (
        _number(v, what) for v, what in ((scale, "scale"), (start, "start"), (end, "end"))
    )
    if not (np.isfinite(value) and 0 <= value <= MAX_CONTROL_SCALE):
        raise UserError(f"control scale {scale}: use a value from 0 to {MAX_CONTROL_SCALE:g}")
    if not (0 <= first < last <= 1):
        raise UserError(
            f"control window {start}..{end}: use 0 <= start < end <= 1 (fractions of the steps)"
        )
    return None if image is None else load_image(image)


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise UserError(f"control {what} {value!r}: use a number")
    return float(value)


def control_pixels(source, size: tuple[int, int], rows: int, channels: int) -> np.ndarray:
    """(rows, channels, H, W) float32 in [0, 1]: `source` at `size` (H, W), one row per
    denoiser row; zeros without a source (the ControlNet then adds nothing)."""
    if source is None:
        return np.zeros((rows, channels, *size), np.float32)
    pixels = prepare_image(source, size, normalize=False)
    return np.ascontiguousarray(np.repeat(pixels, rows, axis=0))


def control_scales(steps: int, scale: float, start: float, end: float) -> list[np.ndarray]:
    """The conditioning scale of each of `steps` denoiser calls, (1,) float32: `scale` where
    step i of n has i / n >= start and (i + 1) / n <= end, else 0 (diffusers'
    controlnet_keep, over the timesteps that run)."""
    keep = [not (i / steps < start or (i + 1) / steps > end) for i in range(steps)]
    return [np.array([scale if k else 0.0], np.float32) for k in keep]
