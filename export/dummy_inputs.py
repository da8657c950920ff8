"""Example inputs for tracing and for parity checks, built from a model's own config.

Two size sets: `TRACE` (what torch.onnx traces) and `CHECK` (what the parity check feeds),
deliberately different in batch, latent size and text length so a dimension that the
tracer baked into the graph shows up as a parity failure instead of a runtime surprise.

The denoiser's inputs come from its ArchSpec, through the builder in slimdiff.models.inputs
(which `inspect` shares); the text encoders' and the VAE decoder's are made here.
"""

from __future__ import annotations

import torch

from slimdiff.models.inputs import Sizes
from slimdiff.models.vae import vae_scale_factor

__all__ = [
    "CHECK",
    "DYNAMIC_AXES",
    "TRACE",
    "Sizes",
    "text_encoder_inputs",
    "vae_decoder_inputs",
    "vae_encoder_inputs",
]

# Axis names that vary at run time; the other names in ArchSpec shapes ("C", "D", "P") stand
# for a width fixed by the model's config and are resolved to ints here.
# "8H"/"8W": a control image's pixels (slimdiff/models/controlnet.py).
DYNAMIC_AXES = frozenset({"B", "H", "W", "L", "S", "h", "w", "8H", "8W"})


# The trace's latent side, 18, is deliberately not a multiple of a UNet's overall
# downsampling (2^3 for SD1.5's four stages): diffusers then takes its `upsample_size` path,
# upsampling each stage to its skip connection's traced size, so the graph runs at every
# size the torch UNet runs at (any multiple of 8 pixels) instead of only multiples of
# 64/32 px, where a divisible trace bakes in "x2" and a Concat fails at other sizes. It is
# even, as SD3/FLUX's 2x2 patches need. The check uses other sizes again (10 x 24, batch
# 3): a dimension the tracer baked in shows up as a parity failure. Batch 2 in the trace
# keeps the tracer from specialising on 1.
TRACE = Sizes(batch=2, height=18, width=18, text_len=16, full_text=False, seed=0)
CHECK = Sizes(batch=3, height=10, width=24, text_len=24, full_text=True, seed=1)

# Prompt words for the text encoders' example inputs (all single tokens in the tiny vocab).
_WORDS = ("a", "red", "blue", "small", "circle", "square", "photo", "of", "cat", "on", "the", "sky")


def text_encoder_inputs(tokenizer, max_length: int, sizes: Sizes) -> dict[str, torch.Tensor]:
    """input_ids (B, S) made by the pipeline's own tokenizer from random short prompts.

    Real prompts put BOS/EOS/padding where the pipeline does, so pooled outputs (which read
    the EOS position) are checked on the path they take in production. The trace uses a
    short S; the check uses the full `max_length` the runtime pads to.
    """
    gen = torch.Generator().manual_seed(sizes.seed)
    length = max_length if sizes.full_text else min(sizes.text_len, max_length)
    prompts = []
    for _ in range(sizes.batch):
        n = int(torch.randint(1, 12, (1,), generator=gen))
        idx = torch.randint(len(_WORDS), (n,), generator=gen).tolist()
        prompts.append(" ".join(_WORDS[i] for i in idx))
    ids = tokenizer(
        prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    ).input_ids
    return {"input_ids": ids.to(torch.int64)}


def vae_decoder_inputs(vae, sizes: Sizes) -> dict[str, torch.Tensor]:
    """latent_sample (B, C, h, w) ~ N(0, 1): what the runtime feeds after unscaling."""
    gen = torch.Generator().manual_seed(sizes.seed)
    shape = (sizes.batch, vae.config.latent_channels, sizes.height, sizes.width)
    return {"latent_sample": torch.randn(shape, generator=gen)}


def vae_encoder_inputs(vae, sizes: Sizes) -> dict[str, torch.Tensor]:
    """image (B, 3, H, W) ~ U(-1, 1), the pixels of latents of `sizes`: what the runtime
    feeds after normalising an input image."""
    gen = torch.Generator().manual_seed(sizes.seed)
    scale = vae_scale_factor(vae.config)
    shape = (sizes.batch, 3, sizes.height * scale, sizes.width * scale)
    return {"image": torch.rand(shape, generator=gen) * 2 - 1}
