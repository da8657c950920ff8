"""`slimdiff export`'s parts beside the exporter: the options that edit what is exported
(`edit_options`); the component passes it applies without a recipe, `--lora` (lora.fuse)
and `--vae` (vae.replace), in a recipe's order, on the model loaded for the export; and
its per-component report.

Their files are checked before the model loads. LoRAs fuse into weights held in memory: a
lazily loaded model fetches only the components the files adapt (usually the denoiser);
the others stay lazy, each loaded while it exports, so the peak stays a plain export's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from slimdiff.app.options import lora_option, option_group
from slimdiff.errors import UserError

__all__ = ["edit_options", "fetch_for_loras", "load_edited", "report"]


_EDITS = [
    click.option(
        "--drop-text-encoder",
        "drop",
        multiple=True,
        metavar="NAME",
        help="Leave out a text encoder the pipeline runs without, zeros in its place as "
        "diffusers feeds them (SD3: text_encoder_3, T5-XXL). Repeatable. Recipe: pass "
        "text.drop.",
    ),
    click.option(
        "--vae",
        "vae",
        default=None,
        metavar="DIR",
        help="Decode with the VAE in DIR (a diffusers VAE folder, or a pipeline folder's "
        "vae/): a tiny decoder such as TAESDXL, or an fp16-safe VAE. Recipe: pass vae.replace.",
    ),
    lora_option,
    click.option(
        "--vae-encoder",
        is_flag=True,
        help="Also export the VAE encoder, which image-to-image needs (run --image). Recipe: "
        "export.vae_encoder.",
    ),
    click.option(
        "--controlnet",
        "controlnets",
        multiple=True,
        metavar="PATH",
        help="Steer the UNet with this ControlNet, SD1.5 or SDXL: a diffusers ControlNet "
        "folder, or one .safetensors file (original or diffusers layout). The denoiser graph "
        "holds both and runs take --control-image. Repeat for several (their residuals "
        "summed). Recipe: export.controlnet.",
    ),
]

# `export`'s --drop-text-encoder, --vae, --lora, --vae-encoder and --controlnet: what goes
# into the bundle besides the model as loaded
edit_options = option_group(_EDITS)


def load_edited(
    model: str,
    weights: str,
    allow_pickle: bool,
    drop: tuple[str, ...],
    loras: list[dict],
    vae: str | None,
    echo: Callable[[str], Any],
):
    """`model` loaded for export (slimdiff.models.loading.load_for_export) with `loras`
    fused and the VAE in `vae` swapped in; `echo` reports the fused layers."""
    from slimdiff.models.loading import load_for_export

    swap = _vae_pass(vae) if vae is not None else None  # a bad folder: before the model loads
    fuse = _lora_pass(loras, weights) if loras else None  # bad files too
    loaded = load_for_export(model, weights, allow_pickle, without=drop)
    if fuse is not None:
        fetch_for_loras(loaded, loras)
    for edit in (fuse, swap):  # in a recipe's order: lora.fuse, then vae.replace
        if edit is not None:
            edit.preflight(loaded.pipe, None)
            report = edit.apply(loaded.pipe, None)
            if edit is fuse:
                layers = ", ".join(f"{n} {c}" for n, c in report.summary["layers_fused"].items())
                echo(f"fused {len(loras)} LoRA(s): {layers} layers")
    return loaded


def _lora_pass(loras: list[dict], weights: str):
    """lora.fuse for `export --lora`, its files checked (UserError) before any load."""
    from slimdiff.compress.lora.fuse import FuseLoraPass, lora_file

    if weights == "stream":
        raise UserError(
            "--lora fuses LoRAs into weights held in memory, which --weights stream never "
            "loads; use --weights auto or memory"
        )
    for lora in loras:
        lora_file(lora["path"])
    return FuseLoraPass(FuseLoraPass.Config(loras=loras))


def fetch_for_loras(loaded, loras: list[dict]) -> None:
    """Fetch the weights of the components the LoRA files adapt, where loaded lazily."""
    from slimdiff.compress.lora.fuse import lora_components
    from slimdiff.models.lazy import is_lazy, materialize

    for name in lora_components(loaded.pipe, [lora["path"] for lora in loras]):
        module = getattr(loaded.pipe, name)
        if is_lazy(module):
            materialize(module)


def _vae_pass(path: str):
    """vae.replace for `export --vae DIR`, its folder checked (UserError) before any load."""
    from slimdiff.compress.vae.replace import ReplaceVaePass, read_vae

    read_vae(path)
    return ReplaceVaePass(ReplaceVaePass.Config(path=path))


def report(manifest, out, echo: Callable[[str], Any]) -> None:
    """One line per component (precision, parity against torch), the bundle's identity
    and the peak memory."""
    from slimdiff.memory import peak_rss_mib

    for name, comp in manifest.components.items():
        parity = comp.parity
        skipped = comp.extra.get("parity_skipped")
        check = (
            f"parity not checked: {skipped}"
            if skipped
            else f"rel err {parity.get('rel_err', float('nan')):.2e} "
            f"(tol {parity.get('tolerance', float('nan')):.0e})"
        )
        echo(f"{name:<16} {comp.precision:<5} {check}")
    echo(f"bundle: {out}  sha256 {manifest.sha256}")
    echo(f"peak RSS {peak_rss_mib() / 1024:.2f} GiB")
