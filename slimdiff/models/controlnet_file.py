"""Single-file ControlNets: one `.safetensors` without a config, as ComfyUI and A1111 keep
them, in either layout:

- the original one (lllyasviel's ControlNet: `control_model.` or bare `input_blocks.*`,
  `zero_convs.*`, `input_hint_block.*`; e.g. ControlNet 1.1's safetensors conversions);
- diffusers' own (a `diffusion_pytorch_model.safetensors` taken out of its folder).

A ControlNet mirrors the encoder half of the UNet it was trained for, so the config comes
from the model's own UNet (what diffusers' ControlNetModel.from_unet copies), the control
hint block's widths from the file. diffusers' from_single_file would fetch a default
config from the hub instead (lllyasviel/control_v11p_sd15_canny), which cannot be had
offline and is wrong for a fine-tuned model. The weights must then fit that config
exactly: a ControlNet trained for another UNet (another family, or the uncompressed one
of a block-removed model) is refused, naming what does not fit.

Not known from weights alone: `global_pool_conditions` (the shuffle ControlNet's; taken
as false): such a ControlNet needs its diffusers folder.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimdiff.errors import UserError

__all__ = ["controlnet_config", "load_controlnet_file"]

_ORIGINAL_PREFIX = "control_model."
_PICKLED = (".ckpt", ".pt", ".pth", ".bin")


def load_controlnet_file(path: Path, unet: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The ControlNetModel in single file `path`, configured after `unet` (see the module
    docstring); UserError for a pickled, unreadable or non-ControlNet file, or weights
    that do not fit."""
    from diffusers import ControlNetModel
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    where = f"ControlNet {path}"
    if path.suffix.lower() in _PICKLED:
        raise UserError(
            f"{where} is a pickled file (unpickling can run code): use its .safetensors version"
        )
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError, ValueError) as err:
        raise UserError(f"{where}: not a readable .safetensors file ({err})") from None
    original = _original_layout(state)
    if original is None and "controlnet_cond_embedding.conv_in.weight" not in state:
        raise UserError(
            f"{where} holds no ControlNet (no control hint block, original or diffusers "
            "layout); a LoRA, a T2I-Adapter or a whole model is not one"
        )
    config = controlnet_config(unet, original if original is not None else state)
    if original is not None:
        state = _converted(original, config)
    state = {k: v.to(dtype) for k, v in state.items()}  # files often hold fp16
    with torch.device("meta"):
        controlnet = ControlNetModel.from_config(config)
    expected = controlnet.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k, v in expected.items() if k in state and v.shape != state[k].shape]
    if missing or unexpected or wrong:
        examples = ", ".join([*missing[:2], *unexpected[:2], *wrong[:2]])
        raise UserError(
            f"{where} does not fit a ControlNet of this model's UNet ({len(missing)} weights "
            f"missing, {len(unexpected)} unexpected, {len(wrong)} of other shapes, e.g. "
            f"{examples}): it was trained for another UNet (another family, or the "
            "uncompressed model); pass a ControlNet folder with its config.json"
        )
    controlnet.load_state_dict(state, strict=True, assign=True)
    controlnet.requires_grad_(False)
    return controlnet.eval()


def controlnet_config(unet: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A ControlNetModel config mirroring `unet` (the keys diffusers' from_unet copies: all
    that ControlNetModel takes), with the hint block's widths read off `state` (diffusers
    layout: controlnet_cond_embedding.*; original: input_hint_block.*)."""
    from diffusers import ControlNetModel

    taken = inspect.signature(ControlNetModel.__init__).parameters
    config = {k: v for k, v in unet.config.items() if k in taken}
    # Each width after the first adds two convolutions: one at the width before (stride 1),
    # one to the new width (stride 2); the second of each pair gives the widths.
    if "controlnet_cond_embedding.conv_in.weight" in state:
        first = state["controlnet_cond_embedding.conv_in.weight"]
        names = [f"controlnet_cond_embedding.blocks.{j}.weight" for j in range(1, 64, 2)]
    else:  # original: conv_in at 0, SiLU between; blocks at 2, 4, ...; conv_out last
        first = state["input_hint_block.0.weight"]
        names = [f"input_hint_block.{j}.weight" for j in range(4, 128, 4)]
    blocks = [state[name] for name in names if name in state]  # (conv_out is at 4k + 2)
    config["conditioning_channels"] = int(first.shape[1])
    widths = [int(first.shape[0]), *(int(b.shape[0]) for b in blocks)]
    config["conditioning_embedding_out_channels"] = tuple(widths)
    return config


def _original_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The original-layout ControlNet in `state` without its prefix; None when it is not
    one (diffusers layout, or no ControlNet)."""
    bare = {k.removeprefix(_ORIGINAL_PREFIX): v for k, v in state.items()}
    return bare if "input_hint_block.0.weight" in bare and "zero_convs.0.0.weight" in bare else None


def _converted(original: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers' converter for the original layout, plus SDXL's added embedding, which
    it leaves out (its `label_emb`, mapped as diffusers maps it for UNets)."""
    from diffusers.loaders.single_file_utils import (
        DIFFUSERS_TO_LDM_MAPPING,
        convert_controlnet_checkpoint,
    )

    state = convert_controlnet_checkpoint(original, config)
    mapping = DIFFUSERS_TO_LDM_MAPPING["controlnet"]
    for kind in ("addition_embed_type", "class_embed_type"):
        if config.get(kind):
            for ours, theirs in mapping[kind].items():
                if theirs in original:
                    state[ours] = original[theirs]
    return {k: v for k, v in state.items() if v is not None}
