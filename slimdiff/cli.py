"""The `slimdiff` command: a thin layer that builds the same objects the Python API takes.

Bad input (a recipe, a model folder, a bundle, an argument) ends with one line on stderr
and exit code 2. Heavy libraries are imported inside commands so `slimdiff run` stays
torch-free and `slimdiff --help` is instant.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from slimdiff import __version__
from slimdiff.app.export_cli import edit_options
from slimdiff.app.extras import require
from slimdiff.app.options import (
    FILE,
    SEED,
    STEPS,
    allow_pickle_option,
    control_options,
    device_option,
    dry_run_option,
    expect_sha256_option,
    guidance_options,
    image_to_image_options,
    refiner_options,
    scheduler_option,
    set_option,
    sigmas_option,
    size_conditioning_options,
    spacing_option,
)
from slimdiff.app.shell import Group
from slimdiff.errors import UserError
from slimdiff.limits import MAX_IMAGES
from slimdiff.threads import MAX_THREADS

SIZE_HELP = (
    "Image size as WIDTHxHEIGHT in multiples of the model's size multiple (8 for SD1.5 and "
    "SDXL, 16 for SD3 and FLUX; `slimdiff verify` prints a bundle's), e.g. 1024x1024."
)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="slimdiff")
@click.option("-v", "--verbose", count=True, help="-v: progress logs, -vv: debug logs.")
@click.option(
    "--threads",
    type=click.IntRange(1, MAX_THREADS),
    default=None,
    help="CPU threads for torch and onnxruntime (sets SLIMDIFF_THREADS, which subprocesses "
    "inherit). Default: the CPUs this process may use, at most 2 for tiny models.",
)
def main(verbose: int, threads: int | None) -> None:
    """Compress, export, run and benchmark text-to-image diffusion models."""
    from slimdiff.app.shell import prepare
    from slimdiff.threads import ENV

    if threads is not None:
        os.environ[ENV] = str(threads)
    prepare(verbose)


def _size(value: str | None, option: str = "--size") -> tuple[int, int] | None:
    from slimdiff.app.args import check_size

    return check_size(value, option)


# ----------------------------------------------------------------------------- recipes


@main.command("recipes")
def recipes_cmd() -> None:
    """List the built-in recipes, one line each."""
    from slimdiff.recipe import builtin_recipes, load_recipe

    for name, path in builtin_recipes().items():
        r = load_recipe(path)
        passes = ", ".join(p.name for p in r.passes) or "no passes"
        click.echo(f"{name:<28} {r.model:<22} {passes:<28} {r.description}")


@main.command("validate")
@click.argument("recipes", nargs=-1, required=True)
@set_option
def validate_cmd(recipes: tuple[str, ...], overrides: tuple[str, ...]) -> None:
    """Validate recipe files (or built-in names); exit 2 if any is invalid."""
    from slimdiff.recipe import load_recipe

    failed = 0
    for ref in recipes:
        try:
            r = load_recipe(ref, overrides)
        except UserError as err:
            for line in err.details or [str(err)]:
                click.secho(f"error: {line}", fg="red", err=True)
            failed += 1
            continue
        click.echo(f"ok: {ref} ({r.model}, {len(r.passes)} passes, export {r.export.targets})")
    if failed:
        sys.exit(2)


# ----------------------------------------------------------------------------- compress


@main.command("compress")
@click.argument("recipe")
@click.option("--model", help="Model to compress (overrides the recipe's `model`).")
@click.option(
    "--out", type=click.Path(path_type=Path), help="Output folder (not needed with --dry-run)."
)
@device_option
@allow_pickle_option
@set_option
@dry_run_option
def compress_cmd(
    recipe: str, model: str | None, out: Path | None, device, allow_pickle, overrides, dry_run
) -> None:
    """Compress a model with RECIPE, then export it as the recipe says.

    Writes OUT/artifact (a diffusers folder; pruned and quantized ones load through
    slimdiff only) and OUT/bundle (the exported bundle); OUT/work
    keeps calibration caches and distillation checkpoints, so a killed run resumes when the
    same command is run again.
    """
    require("compress")
    from slimdiff.recipe import load_recipe

    values = {k: v for k, v in (("model", model), ("device", device)) if v is not None}
    r = load_recipe(recipe, overrides, values)
    if dry_run:
        from slimdiff.app.flow import check_recipe_model

        click.echo(r.to_yaml(), nl=False)
        click.echo(f"# {check_recipe_model(r, allow_pickle)}")
        return
    if out is None:
        raise UserError("compress needs --out FOLDER (for OUT/artifact and OUT/bundle)")
    from slimdiff.app.args import check_output_dir
    from slimdiff.app.flow import compress_and_export

    check_output_dir(out)
    result = compress_and_export(r, out, allow_pickle=allow_pickle)
    click.echo(f"artifact: {result.artifact}")
    for target, path in result.bundles.items():
        click.echo(f"bundle ({target}): {path}")


# ----------------------------------------------------------------------------- convert


@main.command("convert")
@click.argument("checkpoint", type=FILE)
@click.option(
    "--config",
    "config",
    required=True,
    help="A diffusers folder (or hub id) of the same architecture: the base model the "
    "checkpoint was fine-tuned from. Its configs, tokenizers and scheduler are used.",
)
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="Diffusers folder to write."
)
@allow_pickle_option
def convert_cmd(checkpoint: Path, config: str, out: Path, allow_pickle) -> None:
    """Convert a single-file CHECKPOINT (A1111/ComfyUI .safetensors) to a diffusers folder.

    Every command takes the folder, which loads lazily for streamed exports; the file
    itself also loads directly where diffusers can fetch its default config (the hub or
    its cache).
    """
    require("convert")
    from slimdiff.app.convert import convert_file

    click.echo(convert_file(checkpoint, config, out, allow_pickle))


# ----------------------------------------------------------------------------- export


@main.command("export")
@click.argument("model")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle folder.")
@click.option(
    "--target",
    type=click.Choice(["onnx", "tensorrt", "aoti"]),
    default="onnx",
    show_default=True,
    help="onnx: ONNX graphs; tensorrt: ONNX in TensorRT's form + build.sh (engines are built "
    "on the device); aoti: AOTInductor packages for the denoiser (and what else exports).",
)
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option(
    "--vae-precision",
    type=click.Choice(["fp32", "fp16"]),
    default=None,
    help="Default: fp32 for VAEs that overflow in fp16 (SDXL), else --precision.",
)
@click.option("--no-optimize", is_flag=True, help="Skip onnxruntime's fusions.")
@click.option(
    "--qdq",
    type=click.Choice(["ort", "tensorrt"]),
    default=None,
    help="Quantized models: onnxruntime's asymmetric Q/DQ, or ModelOpt's symmetric form for "
    "TensorRT (unverified: no TensorRT here). Default: tensorrt for --target tensorrt, else ort.",
)
@click.option(
    "--min-size",
    default=None,
    help="Smallest WIDTHxHEIGHT the bundle is built for (TensorRT "
    "profiles). Default: half the model's default size.",
)
@click.option(
    "--max-size",
    default=None,
    help="Largest WIDTHxHEIGHT the bundle is built for. Default: 1.5x the model's default size.",
)
@click.option(
    "--max-images",
    type=click.IntRange(1, MAX_IMAGES),
    default=1,
    show_default=True,
    help="Images per call the bundle is built for.",
)
@click.option(
    "--weights",
    type=click.Choice(["auto", "memory", "stream"]),
    default="auto",
    show_default=True,
    help="memory: load each component's weights to export it (ORT fusions, parity). stream: "
    "trace without weights, then write them one tensor at a time (a model larger than "
    "memory; no fusions; parity where it fits). auto: stream the components that do not "
    "fit in memory.",
)
@scheduler_option("The scheduler the bundle ships. Default: the model's.")
@sigmas_option("Ship the scheduler")
@spacing_option("Ship the scheduler")
@edit_options
@allow_pickle_option
def export_cmd(
    model: str,
    out: Path,
    target: str,
    precision: str,
    vae_precision,
    no_optimize,
    qdq: str | None,
    min_size: str | None,
    max_size: str | None,
    max_images: int,
    weights: str,
    scheduler: str | None,
    sigmas: str | None,
    timestep_spacing: str | None,
    drop: tuple[str, ...],
    vae: str | None,
    loras: list[dict],
    vae_encoder: bool,
    controlnets: tuple[str, ...],
    allow_pickle,
) -> None:
    """Export MODEL (artifact, diffusers folder, hub id or built-in) to a runnable bundle."""
    require("export")
    from slimdiff.app.args import check_output_dir
    from slimdiff.app.export_cli import load_edited, report
    from slimdiff.export import (
        check_controlnet_export,
        check_out_dir,
        controlnet_specs,
        export_bundle,
    )

    check_output_dir(out, replaced=True)
    check_out_dir(out)  # not a folder of the user's: refused before the model loads
    sizes = {"min_size": _size(min_size, "--min-size"), "max_size": _size(max_size, "--max-size")}
    for spec in controlnet_specs(list(controlnets)):  # before the model loads
        check_controlnet_export(spec, weights)
    loaded = load_edited(model, weights, allow_pickle, drop, loras, vae, click.echo)
    manifest = export_bundle(
        loaded,
        out,
        target=target,
        precision=precision,
        vae_precision=vae_precision,
        optimize=not no_optimize,
        qdq=qdq,
        max_images=max_images,
        release_weights=True,  # the model was loaded for this export alone
        weights=weights,
        scheduler=scheduler,
        sigmas=sigmas,
        timestep_spacing=timestep_spacing,
        vae_encoder=vae_encoder,
        controlnet=list(controlnets),
        allow_pickle=allow_pickle,
        **sizes,
    )
    del loaded
    report(manifest, out, click.echo)


# ----------------------------------------------------------------------------- run


@main.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@expect_sha256_option
@click.option(
    "--load",
    is_flag=True,
    help="Also load every graph, one at a time, on --backend and check its inputs and "
    "outputs against the manifest, as `run` does (seconds to minutes, the largest graph's "
    "memory).",
)
@click.option(
    "--backend",
    default="ort-cpu",
    show_default=True,
    help="The backend --load loads the graphs on.",
)
def verify_cmd(bundle: Path, expect_sha256: str | None, load: bool, backend: str) -> None:
    """Check BUNDLE as `run` would before it samples: the schema, paths and every file's
    SHA-256, the scheduler config and tokenizers it parses; with --load, the graphs too.

    Prints the bundle's identity (SHA-256 of its manifest.json, which pins every file) and
    a one-line summary; exit 2 with one line saying what is wrong otherwise.
    """
    from slimdiff.runtime.backends import get_backend
    from slimdiff.runtime.bundle_files import open_bundle
    from slimdiff.runtime.preflight import check_graphs, check_parts

    runner = get_backend(backend) if load else None  # a bad name fails before any hashing
    # every file read again, whatever the record of files hashed before says
    verified = open_bundle(bundle, expect_sha256=expect_sha256, reread=True)
    check_parts(verified)
    loaded = []
    if runner is not None:
        loaded = check_graphs(verified, runner)
    click.echo(f"bundle: {bundle}  sha256 {verified.sha256}")
    click.echo(verified.summary())
    if loaded:
        click.echo(f"loaded: {', '.join(loaded)} on {runner.name}, as the manifest declares")
    click.echo(verified.usage())


@main.command("run")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--prompt",
    required=True,
    multiple=True,
    help="Repeat for several prompts, run in one batch; their images are written in order.",
)
@click.option(
    "--negative-prompt",
    multiple=True,
    help="One for every prompt, or repeated: one per --prompt, in order.",
)
@click.option("--steps", type=STEPS, default=None, help="Default: the bundle's.")
@guidance_options
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option(
    "--images",
    type=click.IntRange(1, MAX_IMAGES),
    default=1,
    show_default=True,
    help="Images of each prompt, in one batch (diffusers' num_images_per_prompt). More than "
    "one image in all are written as OUT's name plus -0, -1, ..., prompt by prompt; the "
    "first is the image of --images 1.",
)
@click.option("--size", default=None, help=SIZE_HELP + " With --image: resized to it.")
@image_to_image_options
@control_options
@refiner_options
@size_conditioning_options
@click.option(
    "--latents",
    type=FILE,
    help="Initial noise (.npy) in the layout diffusers' `latents=` takes, to compare exactly.",
)
@click.option(
    "--backend",
    default="ort-cpu",
    show_default=True,
    help="ort-cpu | ort-cuda | trt | trt-rtx | aoti (the last three: see the README)",
)
@scheduler_option("Sample with this scheduler instead of the bundle's.")
@sigmas_option("Sample")
@spacing_option("Sample")
@click.option(
    "--low-memory",
    is_flag=True,
    help="Load each component only while it runs (text encoders, then the denoiser, then "
    "the VAE decoder): the peak is the largest one's, not their sum; loads cost time.",
)
@expect_sha256_option
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Image to write: .png (or no suffix), .jpg (quality 95) or .webp (lossless).",
)
def run_cmd(
    bundle, prompt, negative_prompt, steps, guidance, guidance_rescale, true_cfg_scale, eta,
    seed, images,
    size, init_image, mask_image, strength, control_image, control_scale, control_start,
    control_end, control_guess, refiner, refiner_start, refiner_expect_sha256, aesthetic_score,
    negative_aesthetic_score, latents, backend, scheduler, sigmas, timestep_spacing,
    low_memory, expect_sha256, out, **sizing,
):  # fmt: skip
    """Generate an image (or --images N) from a bundle with the torch-free runtime; from
    an --image too (image-to-image), steered by a --control-image (ControlNet), finished by
    an SDXL --refiner."""
    # `sizing`: SDXL's size conditioning (--original-size, ...) under the API's keywords
    from slimdiff.app.args import (
        check_control,
        check_guidance,
        check_image_to_image,
        check_negatives,
        check_output_file,
        check_refiner,
        check_size,
        image_paths,
        read_latents,
    )
    from slimdiff.app.run import generate, timings_line
    from slimdiff.runtime import Text2ImagePipeline
    from slimdiff.runtime.image import image_format, save_image

    check_guidance(guidance)
    negative_prompt = check_negatives(negative_prompt, len(prompt))
    check_image_to_image(init_image, mask_image, strength, latents)
    check_refiner(refiner, refiner_start, refiner_expect_sha256, expect_sha256)
    control = check_control(control_image, control_scale, control_start, control_end, control_guess)
    size = check_size(size, multiple=None)  # the bundle's multiple: the runtime checks it
    outs = image_paths(out, images * len(prompt))
    for path in outs:
        check_output_file(path)
        image_format(path)
    init = read_latents(latents) if latents is not None else None
    load = {
        "backend": backend,
        "scheduler": scheduler,
        "low_memory": low_memory,
        "sigmas": sigmas,
        "timestep_spacing": timestep_spacing,
    }
    pipe = Text2ImagePipeline.from_bundle(bundle, expect_sha256=expect_sha256, **load)
    call = {
        "negative_prompt": negative_prompt,
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
        "size": size,
        "latents": init,
        "guidance_rescale": guidance_rescale,
        "true_cfg_scale": true_cfg_scale,
        "eta": eta,
        "images": images,
        "image": init_image,
        "strength": strength,
        "mask_image": mask_image,
        **control,
        **sizing,
    }
    aesthetic = {
        "aesthetic_score": aesthetic_score,
        "negative_aesthetic_score": negative_aesthetic_score,
    }
    text = prompt[0] if len(prompt) == 1 else list(prompt)
    second = None
    if refiner is not None:
        second = Text2ImagePipeline.from_bundle(
            refiner, expect_sha256=refiner_expect_sha256, **load
        )
    results = generate(pipe, second, text, call, refiner_start, aesthetic)
    for image, path in zip(results[-1].images, outs, strict=True):
        save_image(image, path)
    click.echo(f"{', '.join(map(str, outs))}  ({timings_line(results)})")


# ----------------------------------------------------------------------------- inspect


@main.command("inspect")
@click.argument("model")
@click.option("--recipe", default=None, help="Apply this recipe's passes first.")
@click.option("--size", default=None, help=SIZE_HELP + " Default: the family's.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@allow_pickle_option
@set_option
@dry_run_option
def inspect_cmd(
    model: str,
    recipe: str | None,
    size: str | None,
    as_json: bool,
    allow_pickle: bool,
    overrides,
    dry_run: bool,
) -> None:
    """Parameters and FLOPs per denoiser step, per component and per block.

    FLOPs are for one denoiser call at the given size (default: the recipe's bench size, else
    the family's), with the CFG batch of 2 where the family uses classifier-free guidance.
    """
    require("inspect")
    from slimdiff.recipe import load_recipe

    if (overrides or dry_run) and not recipe:
        raise UserError("--set and --dry-run apply to a recipe; add --recipe NAME_OR_FILE")
    r = load_recipe(recipe, overrides) if recipe else None
    if dry_run:
        click.echo(r.to_yaml(), nl=False)
        return
    from slimdiff.inspect import format_table, inspect_model, load_for_inspect

    loaded = load_for_inspect(model, with_weights=r is not None, allow_pickle=allow_pickle)
    if r is not None:
        from slimdiff.compress import build_passes

        pipe = loaded.require_pipeline("--recipe")
        for p in build_passes(r):
            p.preflight(pipe, None)  # what compress would refuse, in its words
            p.apply(pipe, None)
    report = inspect_model(loaded, size=_size(size) or (r.bench.size if r else None))
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        from rich.console import Console

        Console().print(format_table(report))


# ----------------------------------------------------------------------------- bench


@main.command("bench")
@click.argument("recipes", nargs=-1, required=True)
@click.option("--model", default=None, help="Run every recipe on this model instead.")
@click.option("--steps", type=STEPS, default=None)
@click.option("--size", default=None, help=SIZE_HELP)
@click.option(
    "--backend",
    default=None,
    help="ort-cpu | ort-cuda | trt | trt-rtx | aoti (default: the recipe's).",
)
@click.option("--repeat", type=click.IntRange(1, 1000), default=None, help="Timed runs per recipe.")
@click.option("--out", type=click.Path(path_type=Path), help="Results folder (not with --dry-run).")
@device_option
@allow_pickle_option
@set_option
@dry_run_option
def bench_cmd(
    recipes, model, steps, size, backend, repeat, out, device, allow_pickle, overrides, dry_run
) -> None:
    """Compress (cached), export and run each recipe; write results.json/md, a plot, grids."""
    require("bench")
    from slimdiff.recipe import load_recipe

    values = {
        k: v
        for k, v in (
            ("model", model),
            ("device", device),
            ("bench.steps", steps),
            ("bench.backend", backend),
            ("bench.repeat", repeat),
            ("bench.size", _size(size)),
        )
        if v is not None
    }
    loaded = [load_recipe(r, overrides, values) for r in recipes]
    if dry_run:
        for r in loaded:
            click.echo(r.to_yaml() + "---")
        return
    if out is None:
        raise UserError("bench needs --out FOLDER for its results")
    from slimdiff.app.args import check_output_dir
    from slimdiff.app.bench import run_bench

    check_output_dir(out)
    results = run_bench(loaded, out, allow_pickle=allow_pickle)
    click.echo((out / "results.md").read_text())
    click.echo(f"results: {out / 'results.json'}  ({len(results['recipes'])} recipes)")


if __name__ == "__main__":
    main()
