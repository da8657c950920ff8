"""The ControlNets' inputs from a bundle whose denoiser holds them (`export --controlnet`):
the control images and each step's conditioning scales, as diffusers' ControlNet pipelines
(StableDiffusion(XL)ControlNet(Img2Img|Inpaint)Pipeline, diffusers 0.42) make them, with
several ControlNets as its MultiControlNetModel runs them (one image, scale and window
each, in the order the ControlNets were exported).

Each control image is resized to the run's size (Lanczos) and fed in [0, 1], not
normalised; one row per image, twice over under classifier-free guidance. Guess mode
(diffusers' `guess_mode`; forced, as there, when the first ControlNet pools its
conditions) weights the residuals by logspace(-1, 0) and, under CFG, gives them to the
conditional half only (slimdiff/models/controlnet.py ControlledDenoiser). A ControlNet's
scale is its `scale` on the steps inside its [start, end] of the steps that run, 0 outside:
diffusers' `controlnet_keep`. The scale defaults to 1 in every mode, as diffusers'
text-to-image ControlNet pipelines (its img2img ones default to 0.8, its SD1.5 inpaint one
to 0.5: pass the scale to match).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from slimdiff.runtime.call_checks import is_number
from slimdiff.runtime.image import ImageInput, load_image, prepare_image
from slimdiff.runtime.manifest import Manifest, PipelineSpec

from slimdiff.errors import UserError
from slimdiff.limits import MAX_CONTROL_SCALE
from slimdiff.models.kinds import CONTROL_GUESS, CONTROL_IMAGE, CONTROL_ROWS

log = logging.getLogger(__name__)

__all__ = [
    "Control",
    "check_control",
    "control_feeds",
    "control_pixels",
    "control_scales",
    "guess_feeds",
    "takes_guess",
]

Numbers = float | Sequence[float]


@dataclass(frozen=True)
class Control:
    """A run's ControlNet settings, one entry per ControlNet of the bundle; `images` is
    None when no control image is given (every scale then 0)."""

    images: list[Image.Image] | None
    scales: tuple[float, ...]
    starts: tuple[float, ...]
    ends: tuple[float, ...]
    guess: bool = False

    @property
    def count(self) -> int:
        return len(self.scales)


def _images(value) -> list:
    """One control image or a list of them (a file, a PIL image or a uint8 array each)."""
    if isinstance(value, (str, Path, Image.Image, np.ndarray)):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise UserError(f"control image {value!r}: use a file path, a PIL image or a uint8 array")


def _numbers(value: Numbers, what: str, count: int) -> tuple[float, ...]:
    """One number for every ControlNet, or a list of one each."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    for v in values:
        if not is_number(v):
            raise UserError(f"control {what} {v!r}: use a number")
    if len(values) != count:
        raise UserError(
            f"{len(values)} control {what}s for {count} ControlNet(s): give one for all, or "
            "one per ControlNet"
        )
    return tuple(float(v) for v in values)


def check_control(
    config: PipelineSpec,
    image: ImageInput | Sequence[ImageInput] | None,
    scale: Numbers,
    start: Numbers,
    end: Numbers,
    guess: bool = False,
    guess_inputs: bool = True,
) -> Control:
    """The run's ControlNet settings, once the bundle can take them; UserError for a
    control image on a bundle without a ControlNet, another number of images than it has
    ControlNets, a scale or window out of range, or guess mode on a bundle whose graph
    (`guess_inputs` False: exported before guess mode) cannot run it."""
    count = config.controlnet.count if config.controlnet is not None else 0
    if not isinstance(guess, (bool, np.bool_)):
        raise UserError(f"control guess mode {guess!r}: use True or False")
    if guess and count == 0:
        raise UserError("guess mode steers ControlNets; this bundle has none (--controlnet)")
    if guess and not guess_inputs:
        raise UserError(
            "this bundle's denoiser graph was exported before guess mode: export it again "
            "to run guess mode"
        )
    forced = bool(config.controlnet is not None and config.controlnet.global_pool_conditions)
    if image is not None and count == 0:
        raise UserError(
            "this bundle has no ControlNet, which a control image needs; export it again "
            "with --controlnet DIR (recipe: export.controlnet)"
        )
    n = max(count, 1)  # a bundle without one still checks what it was given
    scales, starts, ends = (
        _numbers(v, what, n) for v, what in ((scale, "scale"), (start, "start"), (end, "end"))
    )
    for s in scales:
        if not (np.isfinite(s) and 0 <= s <= MAX_CONTROL_SCALE):
            raise UserError(f"control scale {s:g}: use a value from 0 to {MAX_CONTROL_SCALE:g}")
    for first, last in zip(starts, ends, strict=True):
        if not (0 <= first < last <= 1):
            raise UserError(
                f"control window {first}..{last}: use 0 <= start < end <= 1 (fractions of "
                "the steps)"
            )
    if image is None:
        settings = {"scale": (scales, 1.0), "start": (starts, 0.0), "end": (ends, 1.0)}
        _refuse_settings_without_image(count, settings, bool(guess))
    images = None
    if image is not None:
        images = [load_image(i, "control image") for i in _images(image)]
        if len(images) != count:
            raise UserError(
                f"{len(images)} control image(s) for this bundle's {count} ControlNet(s): "
                "give one each, in the order they were exported"
            )
    return Control(images, scales[:count], starts[:count], ends[:count], bool(guess) or forced)


def _refuse_settings_without_image(count: int, settings: dict[str, tuple], guess: bool) -> None:
    """A scale or window other than the defaults, or guess mode, given without a control
    image would be dropped without a word (the run draws at scale 0): refused, as `run`
    refuses --control-scale without --control-image and diffusers' ControlNet pipelines
    take no conditioning scale without an image."""
    changed = [what for what, (values, default) in settings.items() if set(values) - {default}]
    for what in [*changed, *(["guess mode"] if guess else [])]:
        if count == 0:
            raise UserError(
                f"control {what} steers a ControlNet; this bundle has none (export it again "
                "with --controlnet DIR)"
            )
        raise UserError(
            f"control {what} needs a control image: pass control_image (run --control-image FILE)"
        )


def control_pixels(control: Control, size: tuple[int, int], rows: int) -> np.ndarray:
    """(count, rows, 3, H, W) float32 in [0, 1]: each control image at `size` (H, W), one
    row per denoiser row; zeros without images (the ControlNets then add nothing)."""
    if control.images is None:
        return np.zeros((control.count, rows, 3, *size), np.float32)
    stacked = [np.repeat(prepare_image(i, size, normalize=False), rows, 0) for i in control.images]
    return np.ascontiguousarray(np.stack(stacked))


def control_scales(control: Control, steps: int) -> list[np.ndarray]:
    """Each of `steps` denoiser calls' scales, (count,) float32: a ControlNet's scale where
    step i of n has i / n >= its start and (i + 1) / n <= its end, else 0 (diffusers'
    controlnet_keep, over the timesteps that run); all 0 without control images."""
    out = []
    given = control.images is not None
    for i in range(steps):
        keep = [
            not (i / steps < s or (i + 1) / steps > e)
            for s, e in zip(control.starts, control.ends, strict=True)
        ]
        out.append(
            np.array(
                [v if k and given else 0.0 for v, k in zip(control.scales, keep, strict=True)],
                np.float32,
            )
        )
    if given:
        _warn_idle(control, out)
    return out


def _warn_idle(control: Control, scales: list[np.ndarray]) -> None:
    """One warning for each ControlNet whose window keeps none of the steps that run (it
    costs its time and steers nothing, as in diffusers)."""
    for j, (start, end) in enumerate(zip(control.starts, control.ends, strict=True)):
        if control.scales[j] != 0 and not any(step[j] for step in scales):
            which = f"ControlNet {j}'s" if len(control.starts) > 1 else "the ControlNet's"
            log.warning(
                "%s window [%g, %g] keeps none of the %d steps that run, so it steers "
                "nothing: widen --control-start/--control-end, or run more steps",
                which,
                start,
                end,
                len(scales),
            )


def guess_feeds(control: Control, rows: int, do_cfg: bool) -> dict[str, np.ndarray]:
    """Guess mode's inputs: a weight per denoiser row (0 on the unconditional half under
    CFG in guess mode, else 1) and the switch to its residual scales (1 or 0)."""
    weights = np.ones(rows, np.float32)
    if control.guess and do_cfg:
        weights[: rows // 2] = 0  # (uncond, cond): the negative rows come first
    return {CONTROL_ROWS: weights, CONTROL_GUESS: np.array([float(control.guess)], np.float32)}


def takes_guess(manifest: Manifest) -> bool:
    """Whether the bundle's denoiser graph takes guess mode's inputs (ControlNet bundles
    exported since guess mode)."""
    if manifest.pipeline.controlnet is None:
        return False
    return manifest.components[manifest.pipeline.denoiser].io(CONTROL_ROWS) is not None


def control_feeds(
    control: Control, size: tuple[int, int], images: int, do_cfg: bool, guess_inputs: bool
) -> dict[str, np.ndarray]:
    """The ControlNets' inputs that stay the same every step: the control images, one row
    per denoiser row, and guess mode's where the graph takes them."""
    rows = images * (2 if do_cfg else 1)
    feeds = {CONTROL_IMAGE: control_pixels(control, size, rows)}
    if guess_inputs:
        feeds.update(guess_feeds(control, rows, do_cfg))
    return feeds
