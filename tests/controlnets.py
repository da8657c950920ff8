"""Tiny ControlNets for tests: built from a tiny UNet (diffusers' ControlNetModel.from_unet)
and saved as a diffusers folder, the form `export --controlnet` reads."""

from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_controlnet(unet, folder: Path, vae_scale: int = 8, seed: int = 0) -> Path:
    """A ControlNet mirroring `unet`, its weights perturbed so its residuals are not zero
    (from_unet zero-initialises the zero convolutions), saved to `folder`."""
    from diffusers import ControlNetModel

    steps = vae_scale.bit_length()  # one channel count per halving, plus the first
    channels = tuple(4 * 2**i for i in range(steps))
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in controlnet.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    controlnet.save_pretrained(folder)
    return Path(folder)


def write_original_controlnet(controlnet, path: Path, prefix: str = "control_model.") -> Path:
    """`controlnet` as one original-layout (lllyasviel ControlNet) safetensors file, the
    inverse of diffusers' convert_controlnet_checkpoint: the UNet-shaped half in the LDM
    names (tests/ldm_checkpoint.py), zero_convs, middle_block_out and input_hint_block."""
    from safetensors.torch import save_file

    from tests.ldm_checkpoint import _RESNET, _rename, _unet_prefixes

    config = dict(controlnet.config)
    prefixes = _unet_prefixes({**config, "up_block_types": config["down_block_types"]})
    hint = len(controlnet.controlnet_cond_embedding.blocks)
    renames = {
        "controlnet_cond_embedding.conv_in.": "input_hint_block.0.",
        "controlnet_cond_embedding.conv_out.": f"input_hint_block.{2 * hint + 2}.",
        "controlnet_mid_block.": "middle_block_out.0.",
        "add_embedding.linear_1.": "label_emb.0.0.",
        "add_embedding.linear_2.": "label_emb.0.2.",
    }
    renames.update(
        {
            f"controlnet_cond_embedding.blocks.{j}.": f"input_hint_block.{2 * j + 2}."
            for j in range(hint)
        }
    )
    renames.update(
        {
            f"controlnet_down_blocks.{i}.": f"zero_convs.{i}.0."
            for i in range(len(controlnet.controlnet_down_blocks))
        }
    )
    state = {}
    for key, value in controlnet.state_dict().items():
        known = next((k for k in renames if key.startswith(k)), None)
        name = renames[known] + key[len(known) :] if known else _rename(key, prefixes, _RESNET)
        state[prefix + name] = value.detach().contiguous().to(torch.float32)
    save_file(state, str(path))
    return Path(path)
