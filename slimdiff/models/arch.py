"""ArchSpec: everything slimdiff knows about one model family, as data.

One record per family (sd15, sdxl, sd3, flux). Code elsewhere reads these fields instead of
branching on the family name: the exporter takes IO names and dynamic axes from here, the
bundle writer takes the pipeline constants, `inspect` takes the default resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["ArchSpec", "TensorSpec", "TextEncoderSpec"]

# What a text encoder's exported graph returns. The names are the ONNX output names.
#   last_hidden_state        (B, S, D)  final layer, after the final norm (SD1.5, T5)
#   penultimate_hidden_state (B, S, D)  hidden_states[-2] (SDXL, SD3 CLIP encoders)
#   text_embeds              (B, P)     pooled output through the projection (SDXL enc 2, SD3)
#   pooler_output            (B, D)     pooled output without projection (FLUX CLIP)
TextOutput = Literal[
    "last_hidden_state", "penultimate_hidden_state", "text_embeds", "pooler_output"
]


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a pipeline and how the pipeline uses it."""

    name: str  # pipeline attribute, e.g. "text_encoder_2"
    tokenizer: str  # pipeline attribute of its tokenizer, e.g. "tokenizer_2"
    kind: Literal["clip", "t5"]
    outputs: tuple[TextOutput, ...]
    max_length: int = 77  # tokens; the pipelines pad and truncate to this


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its name, dtype and symbolic shape.

    A shape entry is an int (fixed) or a string naming a dynamic axis ("B", "H", "W", "S").
    """

    name: str
    dtype: Literal["float32", "int64", "int32", "float16"]
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class ArchSpec:
    """A model family: components, denoiser structure, export IO and pipeline constants."""

    family: Literal["sd15", "sdxl", "sd3", "flux"]
    pipeline_classes: tuple[str, ...]  # diffusers class names that identify the family
    denoiser: Literal["unet", "transformer"]  # pipeline attribute of the denoiser
    denoiser_kind: Literal["unet", "sd3", "flux"]
    text_encoders: tuple[TextEncoderSpec, ...]
    denoiser_inputs: tuple[TensorSpec, ...]
    default_size: tuple[int, int]  # (height, width) in pixels
    default_steps: int
    default_guidance: float
    uses_cfg: bool  # classifier-free guidance batches (uncond, cond) into one call
    # Denoiser structure, as module-name globs, for passes and `inspect --per-block`.
    blocks: tuple[str, ...] = ()
    never_compress: tuple[str, ...] = ()
    # SDXL only: the unet's added conditions (text_embeds, time_ids).
    has_time_ids: bool = False
    # FLUX packs p x p latent patches into tokens: the denoiser sees (B, HW/p^2, C*p^2).
    latent_packing: int = 1
    # Components the runtime needs, besides the text encoders.
    vae_decoder_inputs: tuple[TensorSpec, ...] = field(
        default=(TensorSpec("latent_sample", "float32", ("B", "C", "h", "w")),)
    )

    @property
    def text_encoder_names(self) -> tuple[str, ...]:
        return tuple(te.name for te in self.text_encoders)

    @property
    def components(self) -> tuple[str, ...]:
        """Exported components, in the order the runtime runs them."""
        return (*self.text_encoder_names, self.denoiser, "vae_decoder")

    def initial_latent_shape(
        self, batch: int, channels: int, size: tuple[int, int], vae_scale: int = 8
    ) -> tuple[int, ...]:
        """Shape of the initial noise in the layout diffusers' `latents=` argument takes."""
        h, w = size[0] // vae_scale, size[1] // vae_scale
        p = self.latent_packing
        if p == 1:
            return (batch, channels, h, w)
        return (batch, (h // p) * (w // p), channels * p * p)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx dynamic_axes for the denoiser inputs."""
        return {
            t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            for t in self.denoiser_inputs
            if any(isinstance(d, str) for d in t.shape)
        }
