"""What the exporter and the runtime need to know of a pipeline's VAE, for every VAE class
slimdiff exports: diffusers' AutoencoderKL (SD1.5, SDXL, SD3, FLUX and their fp16-fixed
versions) and AutoencoderTiny (TAESD, TAESDXL, TAESD3, TAEF1: a few-MB decoder).

Example:
    >>> vae_scale_factor({"block_out_channels": [128, 256, 512, 512]})
    8
    >>> vae_scale_factor({"decoder_block_out_channels": [64] * 4, "upsampling_scaling_factor": 2})
    8
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["VAE_CLASSES", "decoder_params", "vae_scale_factor"]

# The VAE classes whose `decode(latents)` the exporter traces (export/wrappers.py).
VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")


def vae_scale_factor(config: Mapping[str, Any]) -> int:
    """Image pixels per latent pixel along a side. AutoencoderKL upsamples by 2 between its
    blocks; AutoencoderTiny's decoder by `upsampling_scaling_factor` between its blocks.
    (AutoencoderTiny also records `block_out_channels`, its encoder's; the decoder's is
    the one that sets the image size.)"""
    if "decoder_block_out_channels" in config:
        blocks = len(config["decoder_block_out_channels"])
        return int(config.get("upsampling_scaling_factor", 2)) ** (blocks - 1)
    return 2 ** (len(config["block_out_channels"]) - 1)


def decoder_params(vae: Any) -> int:
    """Parameters of what a bundle's VAE decoder holds: post_quant_conv (AutoencoderKL's;
    SD3/FLUX VAEs and AutoencoderTiny have none) and the decoder."""
    from slimdiff.lowbit import parameter_count

    return parameter_count(vae.decoder) + parameter_count(getattr(vae, "post_quant_conv", None))
