"""Parameters and FLOPs of a model, per component and per denoiser block, and per block
the attention heads and FFN hidden widths (read from the modules: pruned models too).

`slimdiff inspect MODEL` prints this report. FLOPs are counted by
`torch.utils.flop_counter.FlopCounterMode` (2 x MACs for matmul and conv, its formula for
fused attention) while the diffusers modules run unchanged, so a compressed model is counted
by the same code as its original. On the meta device nothing is allocated or computed:
full-size SDXL counts in about a second.

What one report counts, at `size` pixels:
- denoiser: ONE forward at `batch` (default 2 under classifier-free guidance: uncond and
  cond in one call, else 1) with the family's real conditioning shapes; a generation costs
  this times the number of steps;
- text encoders: one forward each at their max_length, also at `batch` (under CFG the
  negative prompt is encoded too);
- vae_decoder: one decode of the images one denoiser call makes (batch // 2 under CFG).

Example:
    >>> from slimdiff.models import load_model
    >>> report = inspect_model(load_model("random:sdxl", device="meta"))
    >>> report["denoiser"]["params"], round(report["denoiser"]["flops_per_step"] / 1e12, 1)
    (2567463684, 13.5)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from slimdiff.errors import UserError
from slimdiff.lowbit import parameter_count
from slimdiff.models.arch import ArchSpec
from slimdiff.models.inputs import Sizes, denoiser_inputs, denoiser_kwargs
from slimdiff.models.structure import attention_sites, ffn_sites, find_modules
from slimdiff.models.vae import decoder_params

if TYPE_CHECKING:
    from rich.table import Table

    from slimdiff.models.loading import LoadedModel

__all__ = ["check_size", "count_flops", "format_table", "inspect_model", "load_for_inspect"]

# Latent pixels per pixel side for a lone component folder (no VAE config to read): all four
# families use an 8x VAE.
_VAE_SCALE = 8


def _cpu_sdpa_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


# torch registers formulas for the CUDA fused attention kernels only; on CPU, SDPA dispatches
# to this kernel and would count 0, so real CPU counts would disagree with meta counts (where
# SDPA falls back to the math path and its bmm's are counted). Same formula as the CUDA ones.
_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
    """FLOPs of `fn(*args, **kwargs)`: the total and a per-module map.

    Module names are FlopCounterMode's: the root module's class name, then the dotted path,
    e.g. "UNet2DConditionModel.down_blocks.1".
    """
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as fc:
        fn(*args, **kwargs)
    per_module = {name: sum(ops.values()) for name, ops in fc.get_flop_counts().items()}
    return fc.get_total_flops(), per_module


def load_for_inspect(model: str, with_weights: bool = False, allow_pickle: bool = False) -> Any:
    """`model` loaded to be counted: configs and shapes only, on the meta device whole
    (random:* models; folders and built-ins lazily, no weight read: a 12B model in
    seconds; a lazy model's real buffers moved too), unless `with_weights` (a recipe's passes
    run on it first) or pickled weights are allowed, which load into memory."""
    from slimdiff.models import load_model
    from slimdiff.models.loading import lazy_loadable

    if model.startswith("random:"):
        return load_model(model, device="meta")
    if with_weights or allow_pickle or not lazy_loadable(model):
        return load_model(model, allow_pickle=allow_pickle)
    loaded = load_model(model, weights="lazy")
    for part in loaded.pipe.components.values():
        if isinstance(part, torch.nn.Module):
            part.to("meta")
    return loaded


def inspect_model(
    model: LoadedModel, size: tuple[int, int] | None = None, batch: int | None = None
) -> dict:
    """A JSON-able report of params and FLOPs of `model` at `size` (h, w) pixels (see module)."""
    arch = model.arch
    height, width = size or model.default_size
    check_size(model, (height, width), "--size")
    cfg = arch.uses_cfg_for(model.denoiser.config)
    batch = (2 if cfg else 1) if batch is None else batch
    if batch < 1:
        raise UserError(f"batch must be >= 1, got {batch}")
    pipe = model.pipe
    denoiser = model.denoiser
    scale = pipe.vae_scale_factor if pipe is not None else _VAE_SCALE
    lat_h, lat_w = height // scale, width // scale

    flops, per_module = count_flops(
        denoiser, **_denoiser_inputs(arch, denoiser, batch, lat_h, lat_w)
    )
    prefix = type(denoiser).__name__ + "."
    widths = _widths(arch, denoiser)
    blocks = [
        {
            "name": name,
            "params": _params(block),
            "flops": per_module.get(prefix + name, 0),
            **_widths_in(widths, name),
            # Per module: {site: heads} and {site: hidden neurons}, which differ per layer
            # once pruned (in no config).
            "attention_heads": _sites_in(widths, name, "heads"),
            "ffn_widths": _sites_in(widths, name, "ffn_width"),
        }
        for name, block in _blocks(denoiser, arch.blocks)
    ]
    report: dict[str, Any] = {
        "model": model.source,
        "family": arch.family,
        "size": [height, width],
        "batch": batch,
        "denoiser": {
            "params": _params(denoiser),
            "flops_per_step": flops,
            **_widths_in(widths, ""),
            "blocks": blocks,
        },
    }
    total = report["denoiser"]["params"]
    if pipe is not None:
        text = {}
        for spec in arch.text_encoders:
            encoder = getattr(pipe, spec.name, None)
            if encoder is None:  # SD3 may be loaded without T5 (text_encoder_3=None)
                continue
            ids = torch.zeros(batch, spec.max_length, dtype=torch.long, device=encoder.device)
            text[spec.name] = {"params": _params(encoder), "flops": count_flops(encoder, ids)[0]}
            total += text[spec.name]["params"]
        report["text_encoders"] = text
        vae = pipe.vae
        images = max(1, batch // 2) if cfg else batch
        latents = torch.zeros(
            images, vae.config.latent_channels, lat_h, lat_w, device=vae.device, dtype=vae.dtype
        )
        params = decoder_params(vae)  # what the exported decoder holds
        report["vae_decoder"] = {"params": params, "flops": count_flops(vae.decode, latents)[0]}
        total += params
    report["total_params"] = total
    return report


def check_size(model: LoadedModel, size: tuple[int, int], what: str) -> None:
    """UserError for a (height, width) the model cannot draw: beyond its positions, or off
    its latent grid (named as the options take sizes: WIDTHxHEIGHT)."""
    height, width = size
    model.check_size((height, width), what)
    scale = model.pipe.vae_scale_factor if model.pipe is not None else _VAE_SCALE
    # Transformers patchify (SD3) or pack (FLUX) 2x2 latents into one token.
    multiple = model.arch.kind_for(model.denoiser.config).size_multiple(scale)
    if height % multiple or width % multiple:
        raise UserError(
            f"{what} {width}x{height} is not a multiple of {multiple} pixels, which "
            f"{model.arch.family} needs; try "
            f"{max(multiple, width // multiple * multiple)}x"
            f"{max(multiple, height // multiple * multiple)}"
        )


def _denoiser_inputs(
    arch: ArchSpec, denoiser: torch.nn.Module, batch: int, lat_h: int, lat_w: int
) -> dict[str, Any]:
    """The denoiser's keyword arguments as its pipeline passes them, zeros (values do not
    change FLOPs) with the real conditioning shapes (SD3: 77 CLIP + 256 T5 tokens)."""
    sizes = Sizes(batch, lat_h, lat_w, arch.text_length())
    # FluxPosEmbed builds its rotary tables on img_ids.device, so meta ids just work
    # (checked on diffusers 0.42); nothing needs to run on CPU.
    feeds = denoiser_inputs(
        arch, denoiser, sizes, zeros=True, device=denoiser.device, dtype=denoiser.dtype
    )
    return denoiser_kwargs(arch.present_inputs(denoiser.config), feeds)


def _blocks(module: torch.nn.Module, globs: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
    """Submodules named by `globs`, in glob order: "down_blocks.*" -> down_blocks.0, .1, ..."""
    for glob in globs:
        yield from find_modules(module, glob)


def _widths(arch: ArchSpec, denoiser: torch.nn.Module) -> list[tuple[str, str, int]]:
    """(site name, "heads" | "ffn_width", units) of every attention and feed-forward site:
    what pruning changes, read from the model itself (a pruned model's per-layer widths are
    in no config)."""
    sites = [(s.name, "heads", s.heads) for s in attention_sites(arch, denoiser)]
    return sites + [(s.name, "ffn_width", s.hidden) for s in ffn_sites(arch, denoiser)]


def _widths_in(widths: list[tuple[str, str, int]], block: str) -> dict[str, int]:
    """Heads summed over the attention modules in `block` ("" = everywhere), and hidden
    neurons over its feed-forward blocks (FLUX single blocks are one site of each)."""
    inside = [w for w in widths if not block or w[0] == block or w[0].startswith(block + ".")]
    return {
        "heads": sum(n for _, kind, n in inside if kind == "heads"),
        "ffn_width": sum(n for _, kind, n in inside if kind == "ffn_width"),
    }


def _sites_in(widths: list[tuple[str, str, int]], block: str, kind: str) -> dict[str, int]:
    return {
        site: n
        for site, k, n in widths
        if k == kind and (site == block or site.startswith(block + "."))
    }


def _params(module: torch.nn.Module | None) -> int:
    return parameter_count(module)  # quantized layers' integer weights count as weights


def format_table(report: dict) -> Table:
    """The report as a rich Table for the CLI: one row per component and denoiser block."""
    from rich.table import Table  # rich only for human output; keeps `import` of this lean

    height, width = report["size"]  # (height, width), as inspect_model takes it
    table = Table(
        title=f"{report['model']} ({report['family']}), {width}x{height}, batch {report['batch']}"
    )
    table.add_column("component")
    table.add_column("params (M)", justify="right")
    table.add_column("GFLOPs", justify="right")
    # Attention heads and FFN hidden neurons (summed over the block's modules): per-layer
    # widths, which pruning changes.
    table.add_column("heads", justify="right")
    table.add_column("FFN width", justify="right")

    def row(
        label: str, params: int, flops: int | None, widths: dict | None = None, **kwargs: Any
    ) -> None:
        gflops = "" if flops is None else f"{flops / 1e9:,.1f}"
        heads, ffn = ("", "") if widths is None else (widths["heads"], widths["ffn_width"])
        table.add_row(label, f"{params / 1e6:,.1f}", gflops, f"{heads}", f"{ffn}", **kwargs)

    den = report["denoiser"]
    row("denoiser (one step)", den["params"], den["flops_per_step"], den, style="bold")
    for block in den["blocks"]:
        row(f"  {block['name']}", block["params"], block["flops"], block)
    if den["blocks"]:  # embeddings, conv_in/out, norms: what no block glob covers
        rest_params = den["params"] - sum(b["params"] for b in den["blocks"])
        rest_flops = den["flops_per_step"] - sum(b["flops"] for b in den["blocks"])
        row("  (rest)", rest_params, rest_flops)
    for name, counts in report.get("text_encoders", {}).items():
        row(name, counts["params"], counts["flops"])
    if "vae_decoder" in report:
        row("vae_decoder", report["vae_decoder"]["params"], report["vae_decoder"]["flops"])
    # No FLOP total: the denoiser runs once per step, the others once per generation.
    row("total", report["total_params"], None, style="bold")
    return table
