"""nn.Module wrappers that give each component the flat tensor IO of its ONNX graph.

torch.onnx traces positional tensors in and a tuple of tensors out; diffusers and
transformers models take keyword arguments and return dataclasses. Each wrapper here maps
the graph's inputs (in ArchSpec order) onto the model's call and returns the outputs in
the order of their ONNX names; the denoiser's keywords come from its ArchSpec.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from slimdiff.models.arch import TensorSpec
from slimdiff.models.inputs import denoiser_kwargs

__all__ = ["DenoiserWrapper", "TextEncoderWrapper", "VaeDecoderWrapper"]

# How each text-encoder output name is read off a transformers output (see arch.TextOutput).
_TEXT_OUTPUTS: dict[str, Callable[[Any], torch.Tensor]] = {
    "last_hidden_state": lambda out: out.last_hidden_state,
    # SDXL / SD3 condition on the layer before the final one (diffusers: hidden_states[-2]).
    "penultimate_hidden_state": lambda out: out.hidden_states[-2],
    "text_embeds": lambda out: out.text_embeds,  # CLIPTextModelWithProjection
    "pooler_output": lambda out: out.pooler_output,  # CLIPTextModel (FLUX)
}


class TextEncoderWrapper(nn.Module):
    """input_ids (B, S) int64 -> the outputs named in `outputs`, in that order.

    Example:
        >>> w = TextEncoderWrapper(pipe.text_encoder_2, ("penultimate_hidden_state", "text_embeds"))
        >>> hidden, pooled = w(input_ids)  # doctest: +SKIP
    """

    def __init__(self, encoder: nn.Module, outputs: Sequence[str]):
        super().__init__()
        unknown = [o for o in outputs if o not in _TEXT_OUTPUTS]
        if unknown:
            raise ValueError(
                f"unknown text encoder outputs {unknown}; known: {list(_TEXT_OUTPUTS)}"
            )
        self.encoder = encoder
        self.outputs = tuple(outputs)
        # hidden_states for every layer only when one is read: it keeps the graph lean.
        self._hidden = "penultimate_hidden_state" in self.outputs

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.encoder(input_ids, output_hidden_states=self._hidden, return_dict=True)
        return tuple(_TEXT_OUTPUTS[name](out) for name in self.outputs)


class DenoiserWrapper(nn.Module):
    """A denoiser with flat positional inputs, in `specs` order; each is passed under its
    spec's keyword (SDXL's text_embeds/time_ids go into added_cond_kwargs)."""

    def __init__(self, denoiser: nn.Module, specs: Sequence[TensorSpec]):
        super().__init__()
        self.denoiser = denoiser
        self.specs = tuple(specs)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        feeds = {s.name: x for s, x in zip(self.specs, inputs, strict=True)}
        return self.denoiser(**denoiser_kwargs(self.specs, feeds), return_dict=False)[0]


class VaeDecoderWrapper(nn.Module):
    """latent_sample (B, C, h, w), already unscaled/unshifted -> sample (B, 3, 8h, 8w)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderWrapper(nn.Module):
    """image (B, 3, 8h, 8w) in [-1, 1] -> (latent_mean, latent_std), each (B, C, h, w),
    before scaling and shifting.

    diffusers' img2img pipelines sample the KL posterior (`retrieve_latents` with a
    generator): the runtime draws mean + std * noise from its own seed. A VAE without a
    posterior (AutoencoderTiny's encode gives the latents themselves) has std 0.
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        encoded = self.vae.encode(image, return_dict=False)[0]
        if isinstance(encoded, DiagonalGaussianDistribution):  # AutoencoderKL's posterior
            return encoded.mean, encoded.std
        return encoded, torch.zeros_like(encoded)  # the latents themselves (AutoencoderTiny)
