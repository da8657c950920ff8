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
