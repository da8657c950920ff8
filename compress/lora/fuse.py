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
with the scales, `fuse_lora(safe_fusing=True)`, then the adapter layers are unloaded, so
the artifact is plain weights. Where diffusers would drop part of a file or misread it
silently, the pass refuses or corrects it first (files.py: kohya alphas folded per layer,
DoRA and other LyCORIS types refused, damaged and non-finite files refused; load.py: every
layer of the file must find its module; scales.py: per-block scales reach every layer of
a block). Weights that fusing would make NaN or inf are refused before any is changed. A
component left out of a per-component scale keeps scale 1 (diffusers' default). Pickled
LoRA files (.bin, .pt, .ckpt) are refused: nothing is unpickled. The files' contents, not
their paths, key the compress cache (PassConfig.input_files), so an edited LoRA is never
served stale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from slimdiff.compress.base import Pass, PassConfig, PassReport, Stage, register_pass
from slimdiff.compress.lora.files import read_lora
from slimdiff.compress.lora.load import (
    LIBRARY_ERRORS,
    converted,
    library_detail,
    load_lora,
    lora_layers,
    quiet,
)
from slimdiff.compress.lora.scales import (
    check_scales,
    component_scales,
    set_block_scales,
    unet_layer_scales,
)

from slimdiff.errors import UserError

__all__ = ["FuseLoraPass", "lora_components"]


Scale = Annotated[float, pydantic.Field(ge=-8.0, le=8.0)]
# diffusers' set_adapters weights: a float, or per component ("unet", "text_encoder", ...)
# a float or, for a UNet, per stage ("down", "mid", "up") a float or per block ("block_1")
# a float or one per layer in the block (scales.py).
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
        self._check(pipe)
        try:
            import peft  # noqa: F401  (diffusers' LoRA loading needs it)
        except ImportError:
            raise UserError("lora.fuse needs the peft package: pip install peft") from None

    def _check(self, pipe: Any) -> None:
        for lora in self.config.loras:
            lora_file(lora.path)
            if isinstance(lora.scale, dict):
                check_scales(pipe, lora.path, lora.scale)

    def apply(self, pipe: Any, calib: Any | None) -> PassReport:
        loras = self.config.loras
        self._check(pipe)  # cheap, and nothing is loaded yet: again, whoever calls apply
        names = [f"slimdiff_lora_{i}" for i in range(len(loras))]
        fused: dict[str, int] = {}
        fusing: list[str] = []  # the components fuse_lora may have changed
        try:
            for name, lora in zip(names, loras, strict=True):
                file = lora_file(lora.path)
                state, folded = read_lora(file)
                load_lora(pipe, file, state, name, from_file=not folded)
                del state
            fused = {c: len(layers) for c, layers in lora_layers(pipe).items()}
            # per-block scales first: they refuse a LoRA with layers outside the blocks
            blocks = [
                unet_layer_scales(pipe, name, lora.path, lora.scale)
                for name, lora in zip(names, loras, strict=True)
            ]
            weights = [component_scales(lora.scale) for lora in loras]
            pipe.set_adapters(names, adapter_weights=weights)
            for name, scales in zip(names, blocks, strict=True):
                if scales:
                    set_block_scales(pipe.unet, name, scales)
            _check_finite(pipe, dict(zip(names, (lora.path for lora in loras), strict=True)))
            fusing = list(fused)
            pipe.fuse_lora(components=fusing, adapter_names=names, safe_fusing=True)
        except ValueError as err:  # diffusers' set_adapters, PEFT's safe_fusing (NaN)
            _undo(pipe, fusing)
            raise UserError(f"lora.fuse: {library_detail(err)}") from None
        except BaseException:
            _undo(pipe, fusing)
            raise
        pipe.unload_lora_weights()  # the adapter layers go; the fused weights stay
        return PassReport(
            self.name,
            summary={
                "loras": [{"path": lora.path, "scale": lora.scale} for lora in loras],
                "layers_fused": fused,
            },
        )


def _undo(pipe: Any, components: list[str]) -> None:
    """The pipeline as it was before the pass: layers already fused unfused (PEFT's
    unmerge), adapter layers removed."""
    with quiet():  # PEFT warns for each layer that was not fused yet
        if components:
            pipe.unfuse_lora(components=components)
        pipe.unload_lora_weights()


def _check_finite(pipe: Any, paths: dict[str, str]) -> None:
    """UserError if fusing would give a weight NaN or inf (a scale too large for the
    weights' dtype): checked on every layer before any is changed, where PEFT's safe_fusing
    stops at the first such layer, others fused already."""
    import torch
    from peft.tuners.lora import LoraLayer

    for component, module in pipe.components.items():
        if not hasattr(module, "named_modules"):
            continue
        for name, layer in module.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            adapters = [a for a in paths if a in layer.lora_A]
            weight = layer.get_base_layer().weight
            with torch.no_grad():
                deltas = [layer.get_delta_weight(a) for a in adapters]
                if any(d.shape != weight.shape for d in deltas):
                    continue
                merged = weight + sum(d.to(weight.dtype) for d in deltas)
            if not torch.isfinite(merged).all():
                files = ", ".join(paths[a] for a in adapters)
                raise UserError(
                    f"lora.fuse: fusing {files} makes {component}.{name} NaN or inf (in "
                    f"{weight.dtype}); lower its scale, or check the file"
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
            with quiet():
                state = converted(pipe, lora_file(path))
        except LIBRARY_ERRORS:
            return have  # the fuse itself will say what is wrong with the file
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
