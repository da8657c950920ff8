"""Images out of the VAE: float (3, H, W) in [-1, 1] -> uint8 (H, W, 3) -> PNG (or JPEG,
WebP: save_image) on disk; and
into it, for image-to-image: a file, PIL image or uint8 array -> (1, 3, H, W) in [-1, 1].

Example:
    >>> img = to_uint8(np.zeros((3, 8, 8), np.float32))   # mid-grey
    >>> int(img[0, 0, 0]), img.shape
    (128, (8, 8, 3))
    >>> save_png(img, "out/grey.png")                      # doctest: +SKIP
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from slimdiff.errors import UserError
from slimdiff.fsutil import atomic_write_bytes

__all__ = [
    "ImageInput",
    "describe",
    "image_format",
    "image_size",
    "load_image",
    "prepare_image",
    "prepare_mask",
    "save_image",
    "save_png",
    "to_uint8",
]

# What image-to-image takes: a file path, a PIL image, or an (H, W, 3) uint8 array.
ImageInput = Union[str, Path, Image.Image, np.ndarray]  # noqa: UP007 (a runtime alias)


def to_uint8(sample: np.ndarray) -> np.ndarray:
    """(3, H, W) float in about [-1, 1] -> (H, W, 3) uint8, as diffusers' postprocess.

    diffusers denormalises with `(x * 0.5 + 0.5).clamp(0, 1)` and rounds with
    `(x * 255).round()` (VaeImageProcessor.numpy_to_pil); the same steps here give the
    same bytes for the same floats.
    """
    x = np.clip(sample.astype(np.float32) * np.float32(0.5) + np.float32(0.5), 0.0, 1.0)
    x = x.transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)
    return (x * np.float32(255)).round().astype(np.uint8)


# File suffix -> (PIL format, save options). JPEG at quality 95 without chroma
# subsampling and lossless WebP: a generated image is the product, not a preview.
_FORMATS = {
    ".png": ("PNG", {}),
    ".jpg": ("JPEG", {"quality": 95, "subsampling": 0}),
    ".jpeg": ("JPEG", {"quality": 95, "subsampling": 0}),
    ".webp": ("WEBP", {"lossless": True}),
}


def image_format(path: str | Path) -> str:
    """The format `path`'s suffix names (.png, .jpg/.jpeg, .webp; none: PNG); UserError
    for another suffix, before any work."""
    suffix = Path(path).suffix.lower()
    if suffix == "":
        return "PNG"
    if suffix not in _FORMATS:
        raise UserError(
            f"{path}: images are written as .png, .jpg or .webp, not {suffix}; name the file "
            "with one of those"
        )
    return _FORMATS[suffix][0]


def save_image(image: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, 3) uint8 image atomically (temp file in the folder, rename), in the
    format its suffix names (image_format)."""
    path = Path(path)
    name = image_format(path)
    options = next((o for f, o in _FORMATS.values() if f == name), {})
    return _write(image, path, name, options)


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, 3) uint8 image as PNG atomically (temp file in the folder, rename),
    whatever the suffix."""
    return _write(image, Path(path), "PNG", {})


def _write(image: np.ndarray, path: Path, name: str, options: dict) -> Path:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3:
        fix = ""
        if image is None or getattr(image, "ndim", 0) == 4:  # a latents-only call's result
            fix = " (a call with output='latent' returns latents only: use output='image')"
        elif isinstance(image, Image.Image):
            fix = " (np.asarray(image.convert('RGB')) is one)"
        raise UserError(
            f"{path}: an image to save is an (H, W, 3) uint8 array, not {describe(image)}{fix}"
        )
    if image.shape[2] != 3:  # PIL's own error would not say what it takes
        fix = ""
        if image.shape[0] == 3:
            fix = " (channels first: image.transpose(1, 2, 0) puts them last)"
        elif image.shape[2] == 4:
            fix = " (RGBA: image[..., :3] drops the alpha channel)"
        raise UserError(
            f"{path}: an image to save is an (H, W, 3) uint8 array, not of shape {image.shape}{fix}"
        )
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), mode="RGB").save(buffer, format=name, **options)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load_image(image: ImageInput, what: str = "image") -> Image.Image:
    """An RGB PIL image from a file (EXIF orientation applied, as diffusers' load_image),
    a PIL image or an (H, W, 3) uint8 array; UserError naming what is wrong otherwise.
    `what` names it in messages ("mask", "control image")."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if path.is_dir():
            raise UserError(f"{what} {path}: a folder, not an image file")
        if not path.exists():
            raise UserError(f"{what} {path}: no such file")
        if not path.is_file():
            raise UserError(f"{what} {path}: not a regular file (a device or pipe?)")
        try:
            with Image.open(path) as opened:
                loaded = ImageOps.exif_transpose(opened)
                loaded.load()
        except Image.DecompressionBombError as err:
            raise UserError(f"{what} {path}: too large to open safely ({err})") from None
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise UserError(f"{what} {path}: cannot be read as an image ({err})") from None
        return _rgb(_has_pixels(loaded, f"{what} {path}"), f"{what} {path}")
    if isinstance(image, Image.Image):
        return _rgb(_has_pixels(image, what), what)
    if isinstance(image, np.ndarray):
        grey = image.ndim == 2  # a mask may be one channel
        if image.dtype != np.uint8 or not (grey or (image.ndim == 3 and image.shape[2] == 3)):
            raise UserError(
                f"{what} array of shape {image.shape} and dtype {image.dtype}: pass (H, W, 3) "
                "uint8 RGB (or (H, W) uint8 for a mask)"
            )
        if 0 in image.shape[:2]:
            raise UserError(_empty(what, image.shape[1], image.shape[0]))
        return Image.fromarray(np.ascontiguousarray(image), mode="L" if grey else "RGB")
    raise UserError(
        f"{what} must be a file path, a PIL image or an (H, W, 3) uint8 array, not "
        f"{describe(image)}"
    )


def _has_pixels(image: Image.Image, what: str) -> Image.Image:
    """`image`, once it has pixels: resized to a run's size, an empty one would become a
    blank image (or an all-black mask) with no word said."""
    if 0 in image.size:
        raise UserError(_empty(what, *image.size))
    return image


def _empty(what: str, width: int, height: int) -> str:
    return f"{what} of {width}x{height} pixels is empty; pass an image at least 1x1 pixel"


def describe(value: object) -> str:
    """`value` in a few words for a message: its type, an array's shape and dtype (its repr
    may run to pages)."""
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    if isinstance(value, Image.Image):
        return f"a PIL image ({value.mode})"
    if value is None:
        return "None"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


# 16-bit grey modes: PIL's convert("RGB") clips their values at 255 (diffusers' load_image
# has that bug: a 16-bit PNG comes out nearly white), so they are scaled down to 8 bits.
_GREY_16 = ("I;16", "I;16B", "I;16L")


def _rgb(image: Image.Image, name: str) -> Image.Image:
    """`image` in RGB: alpha dropped, grey and palette expanded, 16-bit grey scaled."""
    if image.mode in _GREY_16 or (image.mode == "I" and _above_8_bits(image)):
        # 16-bit grey: 65535 -> 255 (Pillow's own convert clips at 255 instead). Mode "I"
        # (32-bit integers) is 16-bit data where Pillow before 10 opened 16-bit PNGs as
        # "I", or 8-bit data (int32 arrays, 32-bit TIFFs) that Pillow converts as is
        grey = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(grey.round(), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        raise UserError(f"{name}: a floating-point image; save it with 8 or 16 bits per channel")
    return image.convert("RGB")


def _above_8_bits(image: Image.Image) -> bool:
    low, high = image.getextrema()
    return low < 0 or high > 255


def image_size(image: Image.Image, multiple: int, max_side: int) -> tuple[int, int]:
    """(H, W) an image-to-image run makes of `image` without a size: its own size cut down
    to multiples of `multiple`, as diffusers' VaeImageProcessor does."""
    width, height = image.size
    height, width = height - height % multiple, width - width % multiple
    if not (multiple <= height <= max_side and multiple <= width <= max_side):
        raise UserError(
            f"image of {image.size[0]}x{image.size[1]} pixels: each side must be {multiple} "
            f"to {max_side}; resize it, or pass a size"
        )
    return height, width


def prepare_image(image: Image.Image, size: tuple[int, int], normalize: bool = True) -> np.ndarray:
    """`image` as a VAE encoder takes it: (1, 3, H, W) float32 in [-1, 1] with (H, W) =
    `size`, as diffusers' VaeImageProcessor.preprocess makes it (Lanczos resize, its
    default; /255 then 2x - 1 in float32). Without `normalize`, in [0, 1]: a ControlNet's
    control image (diffusers' control_image_processor, do_normalize=False)."""
    _has_pixels(image, "image")
    height, width = size
    if (width, height) != image.size:
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    x = np.asarray(image.convert("RGB")).astype(np.float32) / np.float32(255)  # (H, W, 3)
    if normalize:
        x = np.float32(2) * x - np.float32(1)  # [0, 1] -> [-1, 1], VaeImageProcessor.normalize
    return np.ascontiguousarray(x.transpose(2, 0, 1)[np.newaxis])  # (1, 3, H, W)


def prepare_mask(mask: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """An inpainting mask as diffusers' mask processor makes it (VaeImageProcessor with
    do_convert_grayscale, do_binarize, no normalisation): grey, resized (Lanczos) to `size`
    (H, W), then 1 where it is at least half white (repainted), 0 elsewhere (kept);
    (1, 1, H, W) float32."""
    _has_pixels(mask, "mask")
    height, width = size
    grey = mask.convert("L")
    if (width, height) != grey.size:
        grey = grey.resize((width, height), resample=Image.Resampling.LANCZOS)
    x = np.asarray(grey).astype(np.float32) / np.float32(255)
    return (x >= 0.5).astype(np.float32)[np.newaxis, np.newaxis]
