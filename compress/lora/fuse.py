"""`lora.fuse`: merge LoRA adapters into the weights before anything else runs.

    - pass: lora.fuse
      loras:
        - path: loras/lcm-lora-sdxl.safetensors   # relative to the current directory
          scale: 1.0                              # the LoRA's strength (default 1)
        - path: loras/style.safetensors           # per component, and per UNet block:
          scale: {text_encoder: 0.0, unet: {down: 0.5, mid: 1.0, up: {block_0: [0, 1, 1]}}}

Most SDXL deployments are a base or fine-tune plus LoRAs: a style, or a few-step
distillation (LCM-LoRA, TCD-LoRA, Hyper-SD, SDXL-Lightning LoRAs). Fused, W' = W + scale *
(alpha / r) * B A in every adapted layer, a LoRA costs nothing at inference, and the
passes after it (distillation, EcoDiff, QuEST) compress the model as it will be deployed:
it is a components pass, applied before calibration records the teacher. `slimdiff bench`
fuses it into its reference too, since the LoRA is part of the model, not a compression.

diffusers' LoRA loaders read the files (diffusers/PEFT, kohya-ss and A1111 layouts alike,
converted by diffusers per family) and PEFT fuses them: `load_lora_weights`, `set_adapters`
with the scales, `fuse_lora(safe_fusing=True)` (NaN weights are refused), then the adapter
layers are unloaded, so the artifact is plain weights. Pickled LoRA files (.bin, .pt,
.ckpt) are refused: nothing is unpickled. The files' contents, not their paths, key the
compress cache (PassConfig.input_files), so an edited LoRA is never served stale.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from slimdiff.compress.base import Pass, PassConfig, PassReport, Stage, register_pass

from slimdiff.errors import UserError, first_line

__all__ = ["FuseLoraPass", "lora_components"]


Scale = Annotated[float, pydantic.Field(ge=-8.0, le=8.0)]
# diffusers' set_adapters weights: a float, or per component ("unet", "text_encoder", ...)
# a float or, for a UNet, per stage ("down", "mid", "up") a float or per block ("block_1")
# a float or one per transformer layer in the block.
BlockScales = dict[Annotated[str, pydantic.Field(pattern=r"^block_[0-9]+$")], Scale | list[Scale]]
UnetScales = dict[Literal["down", "mid", "up"], Scale | BlockScales]
ComponentScales = dict[
    Annotated[str, pydantic.Field(pattern=r"^(unet|transformer|text_encoder(_[23])?)$")],
    Scale | UnetScales,
]


class LoraFile(PassConfig):
    path: Annotated[str, pydantic.Field(min_length=1)]
    scale: Scale | ComponentScales = 1.0


class FuseLoraConfig(PassConfig):
    loras: Annotated[tuple[LoraFile, ...], pydantic.Field(min_length=1, max_length=16)]

    def input_files(self) -> tuple[str, ...]:
        return tuple(lora.path for lora in self.loras)


@register_pass
class FuseLoraPass(Pass):
    """Fuse LoRA files into the pipeline's weights.

    Example:
        >>> config = FuseLoraConfig(loras=[{"path": "lcm-lora-sdxl.safetensors"}])
        >>> report = FuseLoraPass(config).apply(pipe, None)  # doctest: +SKIP
        >>> report.summary["layers_fused"]                   # doctest: +SKIP
        {'unet': 278}
    """

    name = "lora.fuse"
    stage = Stage.COMPONENTS
    Config = FuseLoraConfig
    applies_to_reference = True

    def preflight(self, pipe: Any, calib: Any | None) -> None:
        if not hasattr(pipe, "load_lora_weights"):
            raise UserError(f"lora.fuse: diffusers has no LoRA loader for {type(pipe).__name__}")
        for lora in self.config.loras:
            lora_file(lora.path)
            if isinstance(lora.scale, dict):
                _check_components(pipe, lora)
        try:
            import peft  # noqa: F401  (diffusers' LoRA loading needs it)
        except ImportError:
            raise UserError("lora.fuse needs the peft package: pip install peft") from None

    def apply(self, pipe: Any, calib: Any | None) -> PassReport:
        # preflight ran already (the runner, bench); each file is checked again as it loads
        names = [f"slimdiff_lora_{i}" for i in range(len(self.config.loras))]
        for name, lora in zip(names, self.config.loras, strict=True):
            _load(pipe, lora_file(lora.path), name)
        fused = _lora_layers(pipe)
        # diffusers expands per-block scales and changes them in place: give it copies
        weights = [copy.deepcopy(lora.scale) for lora in self.config.loras]
        try:
            pipe.set_adapters(names, adapter_weights=weights)
            pipe.fuse_lora(components=list(fused), adapter_names=names, safe_fusing=True)
        except ValueError as err:  # safe_fusing (NaN weights), or a block the model lacks
            pipe.unload_lora_weights()
            detail = str(err).strip().splitlines()[0][:300]
            raise UserError(f"lora.fuse: {detail}") from None
        pipe.unload_lora_weights()  # the adapter layers go; the fused weights stay
        return PassReport(
            self.name,
            summary={
                "loras": [{"path": lora.path, "scale": lora.scale} for lora in self.config.loras],
                "layers_fused": fused,
            },
        )


def _check_components(pipe: Any, lora: LoraFile) -> None:
    """Per-component scales must name components this pipeline has (diffusers would skip a
    key it does not know, leaving the LoRA at full strength there)."""
    have = {name for name, module in pipe.components.items() if hasattr(module, "modules")}
    unknown = sorted(set(lora.scale) - have)
    if unknown:
        raise UserError(
            f"lora.fuse: {lora.path}: scale names {', '.join(unknown)}, which this "
            f"{type(pipe).__name__} does not have; its components: {', '.join(sorted(have))}"
        )
    for name, value in lora.scale.items():
        if isinstance(value, dict) and name != "unet":
            raise UserError(
                f"lora.fuse: {lora.path}: per-block scales (down/mid/up) apply to a UNet; "
                f"give {name} one number"
            )
        if isinstance(value, dict):
            _check_blocks(pipe.unet, lora.path, value)


def _check_blocks(unet: Any, path: str, stages: dict) -> None:
    """Block names must be blocks with attention layers (where LoRAs sit): diffusers skips
    any other name without a word."""
    for stage in ("down", "up"):
        blocks = stages.get(stage)
        if not isinstance(blocks, dict):
            continue
        modules = unet.down_blocks if stage == "down" else unet.up_blocks
        have = [f"block_{i}" for i, block in enumerate(modules) if hasattr(block, "attentions")]
        unknown = sorted(set(blocks) - set(have))
        if unknown:
            raise UserError(
                f"lora.fuse: {path}: scale names {stage} {', '.join(unknown)}; this UNet's "
                f"{stage} blocks with attention layers are {', '.join(have)}"
            )


def lora_components(pipe: Any, paths: list[str]) -> list[str]:
    """The pipeline components the LoRA files adapt, read from their keys as diffusers'
    loader converts them (kohya and A1111 layouts included), without loading weights into
    the model: what a lazily loaded pipeline must fetch before it can fuse them. All the
    components with weights but the VAE where a file's keys say nothing."""
    have = [n for n, m in pipe.components.items() if hasattr(m, "parameters") and n != "vae"]
    found: set[str] = set()
    for path in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = type(pipe).lora_state_dict(str(lora_file(path)))
        except (ValueError, KeyError, IndexError, RuntimeError, OSError):
            return have  # the fuse itself will say what is wrong with the file
        state = loaded[0] if isinstance(loaded, tuple) else loaded
        prefixes = {key.split(".", 1)[0] for key in state}
        if not prefixes & set(have):
            return have
        found |= prefixes & set(have)
    return [n for n in have if n in found]


def lora_file(path: str) -> Path:
    """`path` as a readable safetensors LoRA file; UserError naming the fix otherwise."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(
            f"lora.fuse: {path} is not a file (paths are relative to the current directory)"
        )
    if file.suffix.lower() != ".safetensors":
        raise UserError(
            f"lora.fuse: {path} is not a .safetensors file; pickled LoRA files (.bin, .pt, "
            ".ckpt) are not loaded: convert it to safetensors"
        )
    return file


def _load(pipe: Any, file: Path, name: str) -> None:
    _refuse_lycoris(file)
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    # diffusers logs "No LoRA keys associated to ..." for each component a LoRA leaves
    # alone (most leave the text encoders): noise for a user, who sees the layer counts
    diffusers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe.load_lora_weights(str(file), adapter_name=name)
    except (ValueError, KeyError, IndexError, RuntimeError, OSError) as err:  # diffusers
        pipe.unload_lora_weights()
        detail = first_line(err)
        raise UserError(
            f"lora.fuse: {file} does not load into this {type(pipe).__name__} ({detail}); "
            "is it a LoRA for this model family?"
        ) from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    if not _lora_layers(pipe, name):
        pipe.unload_lora_weights()
        raise UserError(
            f"lora.fuse: no layer of {file} matches this {type(pipe).__name__}; "
            "is it a LoRA for this model family?"
        )


def _refuse_lycoris(file: Path) -> None:
    """LyCORIS's LoHa and LoKr factorizations (hada_*, lokr_* keys) are not LoRA: diffusers'
    loaders do not read them, so say that rather than "another family"."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
    except Exception as err:  # safetensors' own errors for a damaged or foreign file
        raise UserError(f"lora.fuse: {file} is not a readable safetensors file ({err})") from None
    kinds = {k for key in keys for k in ("hada_", "lokr_") if k in key}
    if kinds:
        found = " / ".join(k.rstrip("_") for k in sorted(kinds))
        raise UserError(
            f"lora.fuse: {file} is a LyCORIS {found} file (LoHa/LoKr), "
            "which diffusers' LoRA loaders do not read; merge it into the model with "
            "LyCORIS's tools, or use a plain LoRA"
        )


def _lora_layers(pipe: Any, adapter: str | None = None) -> dict[str, int]:
    """Per pipeline component, how many of its layers carry a LoRA adapter (`adapter`, or
    any)."""
    from peft.tuners.lora import LoraLayer

    counts = {}
    for component, module in pipe.components.items():
        if not hasattr(module, "modules"):
            continue
        n = sum(
            isinstance(m, LoraLayer) and (adapter is None or adapter in m.lora_A)
            for m in module.modules()
        )
        if n:
            counts[component] = n
    return counts
