"""Checks of a run's arguments, before any graph runs (runtime/pipeline.py): the prompts,
the step count, the guidance, the seed, given latents, the image-to-image image and mask,
the image count and the guidance rescale. Each raises UserError with the fix. And, as a
run goes, that its latents and pixels stay finite (check_finite)."""

from __future__ import annotations

import inspect
import logging
import reprlib
from typing import Any

import numpy as np
from PIL import Image
from slimdiff.runtime.image import ImageInput, load_image
from slimdiff.runtime.manifest import BundleError

from slimdiff.errors import UserError
from slimdiff.limits import MAX_GUIDANCE, MAX_IMAGES, MAX_SEED, MAX_SIDE, MAX_STEPS

__all__ = [
    "check_finite",
    "check_image",
    "check_images",
    "check_mask",
    "check_number",
    "check_on_step",
    "check_prompts",
    "check_rescale",
    "check_run_args",
    "check_size_pair",
    "check_step_count",
    "check_true_cfg",
    "check_values",
    "is_number",
    "is_whole",
    "warn_unguided",
    "whole_pair",
]

log = logging.getLogger("slimdiff.runtime.pipeline")

_OUTPUTS = ("image", "latent")


def is_whole(value: Any) -> bool:
    """Whether `value` is a whole number: an int, or a float with no fraction (not a bool)."""
    if isinstance(value, (bool, np.bool_)):
        return False
    return isinstance(value, (int, np.integer)) or (
        isinstance(value, (float, np.floating)) and float(value).is_integer()
    )


def is_number(value: Any) -> bool:
    """An int or float (numpy's too), not a bool: float() would take "7" and True."""
    return not isinstance(value, (bool, np.bool_)) and isinstance(
        value, (int, float, np.integer, np.floating)
    )


def check_number(value: Any, name: str, hint: str) -> float:
    """`value` as a float; UserError "`name` `value`: use a number`hint`" for anything but
    a number (is_number), where float() would fail on "abc" with a ValueError that does not
    name the argument."""
    if not is_number(value):
        raise UserError(f"{name} {reprlib.repr(value)}: use a number{hint}")
    return float(value)


def whole_pair(value: Any) -> tuple[int, int] | None:
    """`value` as two ints when it is two whole numbers (a tuple, list or array); else None."""
    items = tuple(value) if isinstance(value, (tuple, list, np.ndarray)) else None
    if items is None or len(items) != 2 or not all(is_whole(v) for v in items):
        return None
    return int(items[0]), int(items[1])


def check_size_pair(size: Any) -> tuple[int, int] | None:
    """A run's `size`, (height, width) in whole pixels, as ints (None stays None);
    UserError for anything else (a "WxH" string, one number, fractions)."""
    if size is None:
        return None
    pair = whole_pair(size)
    if pair is None:
        raise UserError(
            f"size {size!r}: pass (height, width) in whole pixels, e.g. size=(1024, 768)"
        )
    return pair


def check_step_count(steps: Any, default: int) -> int:
    """`steps` (None: `default`, the bundle's) as an int; UserError for anything but a
    whole number (the range is checked with the size)."""
    if steps is None:
        return int(default)
    if not is_whole(steps):
        raise UserError(f"steps {steps!r}: use a whole number from 1 to {MAX_STEPS}")
    return int(steps)


def check_prompts(prompt: Any, negative_prompt: Any) -> tuple[list[str], list[str | None]]:
    """(prompts, one negative per prompt); UserError for anything but a string or a
    non-empty list of strings, or a list of negatives of another length."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise UserError(f"prompt must be a string or a non-empty list of strings, not {prompt!r}")
    if not all(isinstance(p, str) for p in prompts):
        kinds = sorted({type(p).__name__ for p in prompts if not isinstance(p, str)})
        raise UserError(f"prompts must be strings, not {', '.join(kinds)}")
    for text in (
        *prompts,
        *(negative_prompt if isinstance(negative_prompt, (list, tuple)) else [negative_prompt]),
    ):
        _check_text(text)
    if negative_prompt is None or isinstance(negative_prompt, str):
        return list(prompts), [negative_prompt] * len(prompts)
    if not isinstance(negative_prompt, (list, tuple)) or len(negative_prompt) != len(prompts):
        raise UserError(
            f"negative_prompt must be one string, or a list of one per prompt ({len(prompts)})"
        )
    if not all(n is None or isinstance(n, str) for n in negative_prompt):
        raise UserError("negative prompts must be strings (or None)")
    return list(prompts), list(negative_prompt)


def _check_text(text: Any) -> None:
    """A prompt the tokenizer can take: text that encodes as UTF-8 (a shell argument in
    another encoding reaches Python with its bytes escaped as lone surrogates)."""
    if not isinstance(text, str):
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start : err.end].encode("utf-8", "surrogateescape")
        raise UserError(
            f"prompt {text[: max(err.start, 1)]!r}...: byte 0x{bad[:1].hex()} is not UTF-8 "
            "text; pass the prompt in UTF-8 (the terminal's or the file's encoding)"
        ) from None


def check_on_step(on_step: Any) -> None:
    """UserError unless `on_step` is None or can be called as on_step(done, total): one that
    cannot would fail with a TypeError after the text encoders and a denoiser step ran."""
    if on_step is None:
        return
    if not callable(on_step):
        raise UserError(
            f"on_step {reprlib.repr(on_step)}: pass a function of (done, total), or None"
        )
    try:
        signature = inspect.signature(on_step)
    except (TypeError, ValueError):  # a builtin without one: it is called as it is
        return
    try:
        signature.bind(1, 1)
    except TypeError as err:
        name = getattr(on_step, "__qualname__", None) or type(on_step).__name__  # no address
        raise UserError(
            f"on_step {name} cannot be called as on_step(done, total) "
            f"({err}); pass a function of two arguments, e.g. lambda done, total: ..."
        ) from None


# Latents are of about unit scale (a seeded draw's standard deviation is 1; partly denoised
# ones, handed over with denoising_start, reach a few times the largest sigma, ~80). Far
# above that they are not latents of any model: this bound, the largest fp16 number, is
# where an fp16 graph's inputs turn infinite, and larger ones overflow the scheduler's own
# float32 arithmetic (1e38 squared), which would end in a NaN blamed on the scheduler.
MAX_LATENT = 65504.0


def check_values(guidance: float, seed: int, latents: np.ndarray | None) -> None:
    if not (np.isfinite(guidance) and 0 <= guidance <= MAX_GUIDANCE):
        raise UserError(f"guidance {guidance}: use a finite value from 0 to {MAX_GUIDANCE:g}")
    if (
        isinstance(seed, bool)
        or not isinstance(seed, (int, np.integer))
        or not 0 <= seed <= MAX_SEED
    ):
        raise UserError(f"seed {seed!r}: use an integer from 0 to {MAX_SEED}")
    if latents is not None:
        try:
            array = np.asarray(latents)
        except ValueError:  # numpy refuses a ragged nested list
            raise UserError(
                "latents: a ragged nested list; pass an array of the latent shape "
                "(e.g. the latents of a run's output='latent' result)"
            ) from None
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise UserError(f"latents hold {array.dtype}, not numbers")
        if not np.isfinite(array).all():
            raise UserError("latents hold NaN or infinite values")
        largest = float(np.abs(array, dtype=np.float64).max(initial=0))
        if largest > MAX_LATENT:
            raise UserError(
                f"latents reach {largest:.3g} in magnitude, far above their scale (a seeded "
                f"draw's standard deviation is 1); pass latents within +-{MAX_LATENT:g}, e.g. "
                "noise of unit scale or a run's output='latent' latents"
            )


def check_image(image: ImageInput, latents: Any, has_vae_encoder: bool) -> Image.Image:
    """The image-to-image input as an RGB image, once the bundle can run one (it has a VAE
    encoder) and no `latents` are given."""
    if not has_vae_encoder:
        raise UserError(
            "this bundle has no VAE encoder, which image-to-image needs; export it again "
            "with --vae-encoder (recipe: export.vae_encoder: true)"
        )
    if latents is not None:
        raise UserError("latents and image are exclusive: image-to-image draws its own")
    return load_image(image)


def check_mask(mask_image: Any, has_image: bool, inpainting_model: bool) -> None:
    """A mask needs the image it masks; an inpainting model (its UNet takes a mask and a
    masked image) needs both."""
    if mask_image is not None and not has_image:
        raise UserError("a mask needs the image it masks: pass image as well")
    if inpainting_model and mask_image is None:
        raise UserError(
            "this is an inpainting model (its UNet takes a mask and a masked image): pass "
            "an image and a mask (run --image FILE --mask FILE)"
        )


def check_images(images: Any, do_cfg: bool, prompts: int, max_batch: int | None) -> int:
    """`images` (per prompt) as an int, at most MAX_IMAGES in all, and within the
    denoiser's batch range `max_batch` where the backend runs only the shapes the bundle
    was built for (TensorRT engines; None: any)."""
    if isinstance(images, bool) or not isinstance(images, (int, np.integer)):
        raise UserError(f"images {images!r}: use an integer from 1 to {MAX_IMAGES}")
    if not 1 <= images <= MAX_IMAGES:
        raise UserError(f"images {images}: use an integer from 1 to {MAX_IMAGES}")
    total = int(images) * prompts
    if total > MAX_IMAGES:
        raise UserError(
            f"{prompts} prompts x {images} images = {total} images per call, more than "
            f"{MAX_IMAGES}; split them over several calls"
        )
    per_image = 2 if do_cfg else 1
    if max_batch is not None and total * per_image > max_batch:
        most = max_batch // per_image
        raise UserError(
            f"{total} images per call: this bundle's denoiser is built for at most "
            f"{most} on this backend; ask for at most {most}, or export again with "
            f"--max-images {total}"
        )
    return int(images)


def check_rescale(guidance_rescale: Any, uses_cfg: bool) -> np.float32:
    """The guidance rescale, 0 to 1, for a model that uses CFG (`uses_cfg`) unless 0."""
    value = _as_float(guidance_rescale)
    if not (np.isfinite(value) and 0 <= value <= 1):
        raise UserError(f"guidance rescale {guidance_rescale}: use a value from 0 to 1")
    if value > 0 and not uses_cfg:
        raise UserError(
            "guidance rescale needs classifier-free guidance, which this model does not "
            "use (it embeds the guidance, or was distilled without it); leave it at 0"
        )
    return np.float32(value)


def warn_unguided(uses_cfg: bool, guidance: float, given: dict[str, bool], true_cfg: bool) -> None:
    """Warn, naming them, of the `given` negative-side values a run without
    classifier-free guidance ignores (diffusers ignores them without a word): on a model
    without CFG (FLUX.1, guidance-distilled), or at guidance 1 or below."""
    ignored = [name for name, on in given.items() if on]
    if not ignored:
        return
    why = (
        f"guidance {guidance:g} turns classifier-free guidance off (it runs above 1)"
        if uses_cfg
        else "this model runs without classifier-free guidance (it embeds the guidance, or "
        "was distilled without it)"
    )
    if true_cfg:  # the bundle's kind offers it
        why += "; a true_cfg_scale above 1 runs the negative prompt (run --true-cfg-scale)"
    log.warning("ignored: %s; %s", ", ".join(ignored), why)


def _as_float(value: Any) -> float:
    """`value` as a float, NaN when it is none (None, text): the range check refuses it."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def check_finite(values: np.ndarray, where: str, fix: str) -> None:
    """Refuse NaN or infinite `values` (latents `where` in the run, or decoded pixels):
    otherwise they silently become a black image. Exit code 1: the arguments were valid,
    the numbers broke down (a scheduler setting the model does not fit, overflow in fp16)."""
    if np.isfinite(values).all():
        return
    error = UserError(f"NaN or infinite values {where}; {fix}")
    error.exit_code = 1
    raise error


def check_output(value: np.ndarray, shape: tuple[int, ...], name: str, what: str) -> np.ndarray:
    """`value`, a graph's output, once it is a float array of `shape` (`what` it holds:
    "latents", "pixels"); a graph that gives another is not the one the manifest describes,
    where numpy would fail, or broadcast it into a wrong image."""
    if value.shape != shape or value.dtype.kind != "f":
        raise BundleError(
            f"the {name}'s output is {value.dtype} of shape {value.shape}, not float {what} "
            f"of shape {shape}: its graph does not match the bundle's manifest; export the "
            "bundle again"
        )
    return value


def check_run_args(
    config: Any, multiple: int, steps: int, size: tuple[int, int] | None, output: str
) -> tuple[int, int]:
    """The run's (height, width): `size`, else the bundle's default; the step count and
    output kind checked. `config` is the manifest's PipelineSpec, `multiple` the size
    multiple. Warns of a size far from the trained one."""
    if output not in _OUTPUTS:
        raise UserError(f"output {output!r} is not one of: {', '.join(_OUTPUTS)}")
    if steps < 1:
        raise UserError(f"steps must be at least 1, not {steps}")
    if steps > MAX_STEPS:
        raise UserError(f"steps must be at most {MAX_STEPS}, not {steps}")
    height, width = check_size_pair(size) or config.default_size
    m = multiple
    # width x height in messages, as `run --size` takes it
    top = min(MAX_SIDE, config.max_side or MAX_SIDE)  # SD3: its position embedding's
    if not (m <= height <= top and m <= width <= top):
        raise UserError(f"size {width}x{height}: each side must be {m} to {top} pixels")
    if height % m or width % m:
        fix_h, fix_w = (max(m, int(v / m + 0.5) * m) for v in (height, width))
        raise UserError(
            f"size {width}x{height} (width x height) is not a multiple of {m}; use e.g. "
            f"{fix_w}x{fix_h}"
        )
    trained_h, trained_w = config.default_size
    area = (height * width) / (trained_h * trained_w)
    if not 1 / 4 <= area <= 4:
        log.warning(
            "size %dx%d is far from the %dx%d this model draws by default; images this far "
            "from the trained size usually fall apart",
            width,
            height,
            trained_w,
            trained_h,
        )
    return height, width


def check_true_cfg(
    kind: Any, family: str, scale: Any, negatives: list[str | None]
) -> np.float32 | None:
    """diffusers' FluxPipeline `true_cfg_scale`: above 1 with a negative prompt, each step
    also runs the denoiser on the negative prompt and takes neg + scale * (pos - neg). The
    scale for such a run, else None (1, or no negative prompt: warned, as diffusers warns)."""
    value = _as_float(scale)
    if not (np.isfinite(value) and 0 <= value <= MAX_GUIDANCE):
        raise UserError(f"true_cfg_scale {scale!r}: use a finite value from 0 to {MAX_GUIDANCE:g}")
    if value <= 1:
        return None
    if not kind.true_cfg:  # KindSpec.true_cfg: FLUX's pipelines offer it
        raise UserError(
            f"true_cfg_scale is FLUX's second, negative-prompt pass; this {family} model "
            "guides with --guidance (classifier-free guidance)"
        )
    if all(n is None for n in negatives):  # diffusers: negative_prompt is not None
        log.warning(
            "true_cfg_scale %g needs a negative prompt; without one the run is not guided by "
            "it (as in diffusers)",
            value,
        )
        return None
    return np.float32(value)
