"""Checks of CLI arguments that must fail before any heavy work: one line, exit 2.

Sizes, steps, guidance and seeds are bounded by the recipe schema's limits (slimdiff/
recipe.py), so `--size`, `--set bench.size=...` and a recipe file say the same thing; output
paths are probed for writing before a model is loaded or a bundle hashed.

Example:
    >>> check_size("1024x768")
    (768, 1024)
"""

from __future__ import annotations

import io
import math
import os
import stat
import tempfile
from pathlib import Path

import click

from slimdiff.errors import UserError
from slimdiff.limits import MAX_GUIDANCE, MAX_SIDE, MIN_SIDE
from slimdiff.recipe import parse_size

__all__ = [
    "check_guidance",
    "check_image_to_image",
    "check_output_dir",
    "check_output_file",
    "check_size",
    "image_paths",
    "read_latents",
]


def check_size(
    text: str | None, option: str = "--size", multiple: int | None = 8
) -> tuple[int, int] | None:
    """(height, width) from WIDTHxHEIGHT text given as `option`, each side a multiple of
    `multiple` in MIN_SIDE..MAX_SIDE. `multiple` None (run's --size): any side from 1 to
    MAX_SIDE, the bundle's own multiple being checked by the runtime, which knows it."""
    size = parse_size(text)
    if size is None:
        return None
    low = MIN_SIDE if multiple is not None else 1
    for side in size:
        if not low <= side <= MAX_SIDE:
            raise UserError(
                f"{option} {text}: each side must be {low} to {MAX_SIDE} pixels; use e.g. 1024x1024"
            )
    if multiple is not None and any(side % multiple for side in size):
        h, w = (max(multiple, round(s / multiple) * multiple) for s in size)
        raise UserError(
            f"{option} {text}: each side must be a multiple of {multiple}; use e.g. {w}x{h}"
        )
    return size


def check_guidance(value: float | None, what: str = "--guidance") -> float | None:
    if value is not None and not (math.isfinite(value) and 0 <= value <= MAX_GUIDANCE):
        raise UserError(f"{what} {value}: use a finite value from 0 to {MAX_GUIDANCE:g}")
    return value


def _probe_dir(folder: Path, what: str) -> None:
    """Create `folder` (and parents) if missing, then create and remove a file in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".slimdiff-probe-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UserError(
            f"{what}: cannot write in {folder} ({reason}); choose another folder"
        ) from None


def check_output_dir(path: str | Path, what: str = "--out", replaced: bool = False) -> Path:
    """An output folder slimdiff can create or write in: not a file, and writable (where
    it exists, else its parent). `replaced`: a folder swapped in whole (atomic_dir: a
    bundle, a converted model), built beside it, so its parent must be writable too."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} exists and is not a folder; pass a folder path")
    _probe_dir(path if path.is_dir() else path.parent, f"{what} {path}")
    if replaced and path.is_dir():
        _probe_dir(path.absolute().parent, f"{what} {path} (replaced from beside it)")
    return path


def check_output_file(path: str | Path, what: str = "--out") -> Path:
    """An output file path: a regular file or nothing there, in a writable folder. Devices,
    FIFOs and folders are refused: writing would replace or block on them."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        st = None
    except OSError as err:
        raise UserError(f"{what} {path}: {err.strerror}; choose a file path") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise UserError(f"{what} {path} is a folder; pass a file path such as {path / 'image.png'}")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise UserError(f"{what} {path} exists and is not a regular file; choose a file path")
    _probe_dir(path.parent, f"{what} {path}")
    return path


def image_paths(out: Path, images: int) -> list[Path]:
    """Where `run --images N` writes: OUT itself for one image, else OUT's stem plus -0,
    -1, ... (cat.png -> cat-0.png, cat-1.png)."""
    out = Path(out)
    if images == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(images)]


_MAX_LATENTS_BYTES = 1 << 30  # 16 FLUX images at 4096 px are 256 MiB of float32 latents


def read_latents(path: Path):
    """A .npy of finite floats (no pickles): the initial noise `--latents` gives."""
    import numpy as np

    # read once, whole: a pipe (`--latents <(...)`) cannot be opened twice
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_LATENTS_BYTES + 1)
    except OSError as err:
        raise UserError(f"--latents {path}: {err.strerror}") from None
    if len(data) > _MAX_LATENTS_BYTES:
        raise UserError(f"--latents {path}: over {_MAX_LATENTS_BYTES >> 20} MiB, not latents")
    if data[:6] != b"\x93NUMPY":  # np.load would call any other file pickled data
        raise UserError(f"--latents {path}: not a .npy file; write one with numpy.save")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise UserError(f"--latents {path}: not a plain .npy array ({err})") from None
    numeric = np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    if not isinstance(array, np.ndarray) or not numeric:
        raise UserError(
            f"--latents {path}: holds {getattr(array, 'dtype', type(array))}, not numbers"
        )
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise UserError(f"--latents {path}: holds NaN or infinite values")
    return array


def check_image_to_image(
    image: Path | None, mask: Path | None, strength: float | None, latents: Path | None
) -> None:
    """`run`'s image-to-image options together: --mask and --strength need --image, which
    draws its own latents."""
    if mask is not None and image is None:
        raise click.UsageError("--mask needs --image (the image it masks)")
    if strength is not None and image is None:
        raise click.UsageError("--strength needs --image (it sets how far the image is noised)")
    if image is not None and latents is not None:
        raise click.UsageError("--image and --latents are exclusive: image-to-image draws its own")


def check_refiner(
    refiner: Path | None, start: float | None, pin: str | None, base_pin: str | None
) -> None:
    """`run`'s refiner options together: --refiner-start and --refiner-expect-sha256 need
    --refiner; a pinned BUNDLE pins its refiner too, whose VAE draws the image."""
    if refiner is None:
        if start is not None:
            raise click.UsageError("--refiner-start needs --refiner (the refiner's bundle)")
        if pin is not None:
            raise click.UsageError("--refiner-expect-sha256 needs --refiner (the bundle it pins)")
    elif base_pin is not None and pin is None:
        raise click.UsageError(
            "--expect-sha256 pins BUNDLE, not the --refiner that draws the image: pin it too "
            "with --refiner-expect-sha256 HEX (its SHA-256, as `slimdiff verify REFINER` prints)"
        )


def check_negatives(negatives: tuple[str, ...], prompts: int) -> str | list[str] | None:
    """`run`'s --negative-prompt (repeatable) as the runtime's negative_prompt: none, one
    for every prompt, or one per --prompt in order; another count is refused (keeping the
    last one, as a plain option would, paired every prompt with it in silence)."""
    if len(negatives) <= 1:
        return negatives[0] if negatives else None
    if len(negatives) != prompts:
        raise click.UsageError(
            f"--negative-prompt given {len(negatives)} times for {prompts} --prompt: give one "
            "for every prompt, or one per --prompt, in order"
        )
    return list(negatives)


def check_control(
    images: tuple, scales: tuple, starts: tuple, ends: tuple, guess: bool = False
) -> dict:
    """`run`'s ControlNet options (each repeatable: one per ControlNet, or one for all) as
    the runtime's keywords: --control-scale, -start and -end need --control-image, and a
    start comes before its end. The runtime checks the counts against the bundle."""
    values = (("scale", scales), ("start", starts), ("end", ends), ("guess-mode", guess))
    given = [name for name, value in values if value]
    if given and not images:
        raise click.UsageError(f"--control-{given[0]} needs --control-image")
    for scale in scales:
        if not math.isfinite(scale):  # click's FloatRange lets NaN through
            raise click.UsageError(f"--control-scale {scale}: use a finite value")
    if len(starts) <= 1 and len(ends) <= 1:
        first, last = (starts or (0.0,))[0], (ends or (1.0,))[0]
        if first >= last:
            raise click.UsageError(
                f"--control-start {first:g} must be below --control-end {last:g}"
            )

    def one_or_each(value: tuple, default: float):
        return default if not value else value[0] if len(value) == 1 else list(value)

    return {
        "control_image": (images[0] if len(images) == 1 else list(images)) or None,
        "control_scale": one_or_each(scales, 1.0),
        "control_start": one_or_each(starts, 0.0),
        "control_end": one_or_each(ends, 1.0),
        "control_guess": bool(guess),
    }
