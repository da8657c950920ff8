"""click options several `slimdiff` commands share (slimdiff/cli.py). Only click and the
core's limits are imported here, so `slimdiff --help` stays instant."""

from __future__ import annotations

from pathlib import Path

import click

from slimdiff.limits import MAX_CONDITIONING_SIDE, MAX_CONTROL_SCALE, MAX_SEED, MAX_STEPS

__all__ = [
    "FILE",
    "SEED",
    "STEPS",
    "allow_pickle_option",
    "control_options",
    "device_option",
    "dry_run_option",
    "expect_sha256_option",
    "guidance_options",
    "image_to_image_options",
    "lora_option",
    "option_group",
    "refiner_options",
    "scheduler_option",
    "set_option",
    "size_conditioning_options",
    "spacing_option",
]

FILE = click.Path(exists=True, dir_okay=False, path_type=Path)  # an input file


_IMAGE_TO_IMAGE = [
    click.option(
        "--image",
        "init_image",
        type=FILE,
        default=None,
        help="Image-to-image: start from this image (PNG, JPEG, ...), at its own size cut to "
        "the size multiple unless --size is given. Needs a bundle exported with --vae-encoder.",
    ),
    click.option(
        "--mask",
        "mask_image",
        type=FILE,
        default=None,
        help="With --image: inpaint, repainting where this mask is white and keeping the image "
        "where it is black (resized to the image; binarised at half grey).",
    ),
    click.option(
        "--strength",
        type=click.FloatRange(0.0, 1.0, min_open=True),
        default=None,
        help="With --image: how far to noise it, above 0 to 1 (1: from pure noise, lower "
        "keeps more of the image); strength x steps steps run. Default: the model's diffusers "
        "pipeline's (`verify` shows it): image-to-image SD1.5 0.8, SDXL 0.3, SD3/FLUX 0.6; "
        "inpainting SD1.5 1.0, SDXL 0.9999, SD3/FLUX 0.6.",
    ),
]


_REFINER = [
    click.option(
        "--refiner",
        type=click.Path(path_type=Path),
        default=None,
        help="An SDXL refiner's bundle: BUNDLE denoises the first --refiner-start of the "
        "schedule and hands its latents to the refiner, which runs the rest (diffusers' "
        "ensemble of expert denoisers: denoising_end / denoising_start).",
    ),
    click.option(
        "--refiner-start",
        type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
        default=None,
        help="With --refiner: the fraction of the schedule where the refiner takes over. "
        "Default: 0.8, as diffusers' example.",
    ),
    click.option(
        "--refiner-expect-sha256",
        metavar="HEX",
        default=None,
        help="Refuse the --refiner bundle unless its manifest.json has this SHA-256 (what "
        "--expect-sha256 is to BUNDLE; needed with it, since the refiner draws the image).",
    ),
    click.option(
        "--aesthetic-score",
        type=click.FloatRange(0.0, 10.0),
        default=None,
        help="SDXL refiner: the aesthetic score its prompt rows are conditioned on. Default: 6.",
    ),
    click.option(
        "--negative-aesthetic-score",
        type=click.FloatRange(0.0, 10.0),
        default=None,
        help="SDXL refiner: the score of its negative rows. Default: 2.5.",
    ),
]


class _Pair(click.ParamType):
    """WIDTHxHEIGHT (as --size) -> (height, width), or TOP,LEFT -> (top, left), pixels."""

    def __init__(self, crop: bool) -> None:
        self.crop = crop
        self.name = "TOP,LEFT" if crop else "WIDTHxHEIGHT"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        low = 0 if self.crop else 1
        first, sep, second = value.lower().replace(" ", "").partition("," if self.crop else "x")
        example = "e.g. 0,0 or 256,128" if self.crop else "e.g. 512x512"
        if not (sep and first.isdigit() and second.isdigit() and len(first + second) < 12):
            self.fail(f"{value!r} is not {self.name}; use {example}", param, ctx)
        pair = (int(first), int(second)) if self.crop else (int(second), int(first))
        if not all(low <= v <= MAX_CONDITIONING_SIDE for v in pair):
            self.fail(f"{value!r}: each value must be {low} to {MAX_CONDITIONING_SIDE}", param, ctx)
        return pair


def _size_conditioning(name: str, crop: bool, text: str) -> click.Option:
    pair = _Pair(crop)
    return click.option(name, type=pair, default=None, metavar=pair.name, help=text)


_SIZE_CONDITIONING = [
    _size_conditioning(
        "--original-size",
        False,
        "SDXL's size conditioning: the source image size the UNet is told about "
        "(diffusers' original_size). Default: the image's size.",
    ),
    _size_conditioning(
        "--crops-coords-top-left",
        True,
        "SDXL: the crop's top-left corner the UNet is told about, TOP,LEFT in pixels "
        "(diffusers' crops_coords_top_left). Default: 0,0 (uncropped).",
    ),
    _size_conditioning(
        "--target-size",
        False,
        "SDXL: the target size the UNet is told about (diffusers' target_size). Default: "
        "the image's size.",
    ),
    _size_conditioning(
        "--negative-original-size",
        False,
        "SDXL: the original size of CFG's negative rows, e.g. 512x512 to steer away from "
        "low-resolution sources; text-to-image uses it with --negative-target-size only, "
        "as diffusers.",
    ),
    _size_conditioning(
        "--negative-crops-coords-top-left",
        True,
        "SDXL: the crop corner of CFG's negative rows. Default: 0,0.",
    ),
    _size_conditioning(
        "--negative-target-size",
        False,
        "SDXL: the target size of CFG's negative rows (e.g. 1024x1024 with "
        "--negative-original-size 512x512).",
    ),
]


_CONTROL = [
    click.option(
        "--control-image",
        type=FILE,
        multiple=True,
        help="ControlNet: steer with this control image (an edge map, a depth map, a pose, "
        "... as the ControlNet was trained on), resized to --size; without --size the run "
        "takes its size. Needs a bundle exported with --controlnet; repeat for one per "
        "ControlNet, in export order.",
    ),
    click.option(
        "--control-scale",
        type=click.FloatRange(0.0, MAX_CONTROL_SCALE),
        multiple=True,
        help="With --control-image: how strongly it steers (diffusers' "
        "controlnet_conditioning_scale). Once for all ControlNets, or once each. Default: 1.",
    ),
    click.option(
        "--control-start",
        type=click.FloatRange(0.0, 1.0),
        multiple=True,
        help="With --control-image: the fraction of the steps after which it starts steering "
        "(diffusers' control_guidance_start). Once for all, or once each. Default: 0.",
    ),
    click.option(
        "--control-end",
        type=click.FloatRange(0.0, 1.0),
        multiple=True,
        help="With --control-image: the fraction of the steps after which it stops (diffusers' "
        "control_guidance_end). Once for all, or once each. Default: 1.",
    ),
    click.option(
        "--control-guess-mode",
        "control_guess",
        is_flag=True,
        help="With --control-image: diffusers' guess mode, the ControlNet steering as if "
        "without a prompt (its residuals scaled from 0.1 to 1, given to the prompt's half "
        "of the CFG batch only). Always on for a shuffle ControlNet.",
    ),
]


_GUIDANCE = [
    click.option("--guidance", type=float, default=None, help="0 to 100. Default: the bundle's."),
    click.option(
        "--guidance-rescale",
        type=click.FloatRange(0.0, 1.0),
        default=0.0,
        show_default=True,
        help="Rescale the guided prediction's std (diffusers' guidance_rescale; 0.7 for "
        "zero-terminal-SNR models). Needs a model that uses CFG.",
    ),
    click.option(
        "--true-cfg-scale",
        type=click.FloatRange(0.0, 100.0),
        default=1.0,
        show_default=True,
        help="FLUX: above 1 with --negative-prompt, a second transformer pass per step on the "
        "negative prompt, mixed as diffusers' FluxPipeline true_cfg_scale (twice the time).",
    ),
    click.option(
        "--eta",
        type=click.FloatRange(0.0, 1.0),
        default=None,
        help="TCD's gamma (diffusers' eta), 0 to 1: 0 is deterministic, the TCD authors "
        "suggest 0.3. Only with the TCD scheduler. Default: 0, as diffusers' pipelines.",
    ),
]


def option_group(options: list):
    """A decorator that applies `options` in order (the first is the first in --help)."""

    def apply(f):
        for option in reversed(options):
            f = option(f)
        return f

    return apply


# `run`'s --guidance, --guidance-rescale, --true-cfg-scale and --eta
guidance_options = option_group(_GUIDANCE)
# `run`'s --image, --mask and --strength (image-to-image and inpainting)
image_to_image_options = option_group(_IMAGE_TO_IMAGE)
# `run`'s --refiner, --refiner-start and the SDXL refiner's aesthetic scores
refiner_options = option_group(_REFINER)
# `run`'s SDXL size conditioning: --original-size, --crops-coords-top-left, --target-size
# and their --negative- forms (runtime/size_conditioning.py)
size_conditioning_options = option_group(_SIZE_CONDITIONING)
# `run`'s --control-image, --control-scale, --control-start and --control-end (a bundle
# exported with --controlnet)
control_options = option_group(_CONTROL)


def set_option(f):
    return click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a recipe field, e.g. --set bench.steps=4 (repeatable).",
    )(f)


def dry_run_option(f):
    return click.option(
        "--dry-run", is_flag=True, help="Validate and print the resolved recipe, then exit."
    )(f)


def device_option(f):
    return click.option(
        "--device",
        default=None,
        help="Where passes, calibration and torch runs go: auto (cuda when available, else "
        "cpu), cpu, cuda or cuda:N. Default: the recipe's `device:` (auto).",
    )(f)


def allow_pickle_option(f):
    return click.option(
        "--allow-pickle",
        is_flag=True,
        help="Also load pickled .bin weights (unpickling can run code: only files you trust).",
    )(f)


def _lora_specs(ctx, param, values: tuple[str, ...]) -> list[dict]:
    """PATH or PATH:SCALE -> lora.fuse's {"path", "scale"}; a suffix that is no number is
    part of the path (a Windows drive, a colon in a name)."""
    specs = []
    for value in values:
        path, sep, scale = value.rpartition(":")
        try:
            spec = {"path": path, "scale": float(scale)} if sep and path else {"path": value}
        except ValueError:
            if Path(path).expanduser().is_file() and not Path(value).expanduser().exists():
                raise click.BadParameter(
                    f"{value!r}: the scale {scale!r} after the colon is not a number; use e.g. "
                    f"{path}:0.8"
                ) from None
            spec = {"path": value}
        if not -8 <= spec.get("scale", 1.0) <= 8:
            raise click.BadParameter(f"{value!r}: the scale must be from -8 to 8")
        specs.append(spec)
    if len(specs) > 16:
        raise click.BadParameter("at most 16 LoRAs; merge some first, or use a recipe")
    return specs


def lora_option(f):
    return click.option(
        "--lora",
        "loras",
        multiple=True,
        metavar="PATH[:SCALE]",
        callback=_lora_specs,
        help="Fuse this LoRA (.safetensors; diffusers, kohya or A1111 layout) into the weights "
        "first, at SCALE (default 1). Repeatable. Recipe: pass lora.fuse (per-block scales).",
    )(f)


def _check_scheduler_name(ctx, param, value: str | None) -> str | None:
    if value is None:
        return None
    from slimdiff.runtime.schedulers import scheduler_names  # numpy only, and only when given

    names = scheduler_names()
    # short names in any case ("Euler-A"), class names as diffusers spells them
    match = next((n for n in names if n.lower() == value.lower()), None)
    if match is None:
        raise click.BadParameter(f"{value!r} is not a scheduler; use one of: {', '.join(names)}")
    return match


def scheduler_option(help_text: str):
    def decorate(f):
        return click.option(
            "--scheduler",
            metavar="NAME",
            default=None,
            callback=_check_scheduler_name,
            help=help_text + " euler, euler-karras, euler-a, heun, dpm2, dpm2-karras, dpm2-a, "
            "dpm2-a-karras, lms, lms-karras, ddim, ddpm, dpm++2m, dpm++2m-karras, dpm++2m-sde, "
            "dpm++2m-sde-karras, dpm++2s, dpm++2s-karras, dpm++sde, dpm++sde-karras, deis, "
            "deis-karras, pndm, lcm, tcd, "
            "unipc, edm-euler, edm-dpm++2m, edm-dpm++2m-sde (EDM models), flow-euler "
            "(SD3/FLUX), flow-heun (SD3), flow-dpm++2m, flow-unipc (SD3/FLUX), or "
            "a diffusers class name; built from the model's scheduler config as diffusers' "
            "from_config does.",
        )(f)

    return decorate


def sigmas_option(what: str):
    """--sigmas karras|exponential|beta: the scheduler's sigma schedule replaced."""
    return click.option(
        "--sigmas",
        type=click.Choice(["karras", "exponential", "beta"]),
        default=None,
        help=f"{what} on this sigma schedule instead of the scheduler's own (its "
        "use_<name>_sigmas key): Karras, exponential or Beta sigmas between the same ends. "
        "For schedulers that have them (Euler, Heun, DPM2, LMS, DPM-Solver, DEIS, UniPC, "
        "flow-match Euler, ...).",
    )


def spacing_option(what: str):
    """--timestep-spacing leading|trailing|linspace: diffusers' timestep_spacing set."""
    return click.option(
        "--timestep-spacing",
        type=click.Choice(["leading", "trailing", "linspace"]),
        default=None,
        help=f"{what} with this timestep spacing (diffusers' timestep_spacing): trailing for "
        "SDXL-Lightning, Hyper-SD, SDXL-Turbo and other few-step distillations. For "
        "schedulers that have one (Euler, Euler-a, Heun, DPM2, LMS, DDIM, DDPM, PNDM, "
        "DPM-Solver, DEIS, UniPC).",
    )


# Bounds shared with the recipe schema (slimdiff/recipe.py).
STEPS = click.IntRange(1, MAX_STEPS)
SEED = click.IntRange(0, MAX_SEED)


def expect_sha256_option(f):
    return click.option(
        "--expect-sha256",
        metavar="HEX",
        default=None,
        help="Refuse the bundle unless its manifest.json has this SHA-256 (the identity "
        "`slimdiff export` and `slimdiff verify` print).",
    )(f)
