"""A LoRA's scale per pipeline component and, for a UNet, per down/mid/up block.

The scale takes diffusers' set_adapters shapes: a number; per component a number; for a
UNet per stage ("down", "mid", "up") a number, or per block ("block_1") a number or one
per layer of the block. diffusers applies per-block scales to attention layers only: a
resnet or sampler takes the scale of the attention layer of the same index, or 1.0 in a
block without attention layers (SDXL's down_blocks.0, SD1.5's down_blocks.3), and a layer
outside the blocks (conv_in, time_embedding) raises IndexError. Here every adapted layer
of a block takes that block's scale (layer i of the block, attention or resnet, the i-th of
a list; a down/upsampler the last), set on PEFT's layers as set_adapters sets them; a
LoRA that also adapts layers outside the blocks is refused with per-block scales (no
block's scale is theirs: give the UNet one number). As in diffusers, a component, stage
or block the dict leaves out keeps scale 1.
"""

from __future__ import annotations

import re
from typing import Any

from slimdiff.errors import UserError

__all__ = ["check_scales", "component_scales", "set_block_scales", "unet_layer_scales"]

# (stage, block, layer in block) of a UNet module name: down_blocks.1.resnets.0.conv1 ->
# ("down", "1", "0"); a sampler has no layer index; mid_block.* -> ("mid", None, None)
_IN_BLOCK = re.compile(
    r"^(?:(down|up)_blocks\.(\d+)\.(?:(?:attentions|resnets)\.(\d+)|(?:down|up)samplers\.)"
    r"|(mid)_block\.)"
)


def check_scales(pipe: Any, path: str, scale: dict) -> None:
    """Per-component scales must name components this pipeline's LoRA loader fills
    (diffusers would skip a key it does not know, leaving the LoRA at full strength there),
    and per-block scales blocks and layer counts of its UNet."""
    loadable = getattr(pipe, "_lora_loadable_modules", ())
    have = {name for name in loadable if getattr(pipe, name, None) is not None}
    unknown = sorted(set(scale) - have)
    if unknown:
        raise UserError(
            f"lora.fuse: {path}: scale names {', '.join(unknown)}, which this "
            f"{type(pipe).__name__} does not have; its components: {', '.join(sorted(have))}"
        )
    for name, value in scale.items():
        if isinstance(value, dict) and name != "unet":
            raise UserError(
                f"lora.fuse: {path}: per-block scales (down/mid/up) apply to a UNet; "
                f"give {name} one number"
            )
        if isinstance(value, dict):
            _check_blocks(pipe.unet, path, value)


def _check_blocks(unet: Any, path: str, stages: dict) -> None:
    if isinstance(stages.get("mid"), dict):
        raise UserError(f"lora.fuse: {path}: the UNet's mid block takes one number")
    for stage in ("down", "up"):
        blocks = stages.get(stage)
        if not isinstance(blocks, dict):
            continue
        modules = unet.down_blocks if stage == "down" else unet.up_blocks
        have = [f"block_{i}" for i in range(len(modules))]
        unknown = sorted(set(blocks) - set(have))
        if unknown:
            raise UserError(
                f"lora.fuse: {path}: scale names {stage} {', '.join(unknown)}; this UNet's "
                f"{stage} blocks are {', '.join(have)}"
            )
        for block, value in blocks.items():
            layers = len(modules[int(block.removeprefix("block_"))].resnets)
            if isinstance(value, list) and len(value) not in (1, layers):
                raise UserError(
                    f"lora.fuse: {path}: {stage} {block} takes one scale or {layers} (one "
                    f"per layer), got {len(value)}"
                )


def component_scales(scale: float | dict) -> float | dict:
    """The weights for diffusers' set_adapters: a UNet's per-block dict stands as 1 there,
    its layers' scales are set after (set_block_scales)."""
    if not isinstance(scale, dict):
        return scale
    return {name: 1.0 if isinstance(value, dict) else value for name, value in scale.items()}


def unet_layer_scales(pipe: Any, adapter: str, path: str, scale: float | dict) -> dict[str, float]:
    """Per UNet layer carrying `adapter`, its block's scale; {} without per-block scales.
    UserError for a LoRA that also adapts layers outside the down/mid/up blocks."""
    from peft.tuners.lora import LoraLayer

    stages = scale.get("unet") if isinstance(scale, dict) else None
    if not isinstance(stages, dict):
        return {}
    scales, outside = {}, []
    for name, module in pipe.unet.named_modules():
        if not (isinstance(module, LoraLayer) and adapter in module.lora_A):
            continue
        value = _block_scale(stages, name)
        if value is None:
            outside.append(name)
        scales[name] = value
    if outside:
        more = f" and {len(outside) - 3} more" if len(outside) > 3 else ""
        raise UserError(
            f"lora.fuse: {path}: per-block scales cover the UNet's down, mid and up blocks, "
            f"but this LoRA also adapts {', '.join(outside[:3])}{more}, outside them; give "
            "unet one number (scale: {unet: 0.8}), or a LoRA without those layers"
        )
    return scales


def _block_scale(stages: dict, name: str) -> float | None:
    match = _IN_BLOCK.match(name)
    if match is None:
        return None
    stage, block, layer, mid = match.groups()
    value = stages.get(mid or stage, 1.0)
    if isinstance(value, dict):
        value = value.get(f"block_{block}", 1.0)
    if isinstance(value, list):  # one per layer: a sampler follows the block's last layer
        value = value[0] if len(value) == 1 else value[int(layer) if layer else -1]
    return float(value)


def set_block_scales(unet: Any, adapter: str, scales: dict[str, float]) -> None:
    """Each layer's scale for `adapter`, as diffusers' set_adapters sets it (PEFT's
    LoraLayer.set_scale: scale * alpha / r)."""
    for name, scale in scales.items():
        unet.get_submodule(name).set_scale(adapter, scale)
