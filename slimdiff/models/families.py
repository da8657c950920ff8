"""The four ArchSpecs: SD1.5, SDXL, SD3 and FLUX.

IO names follow the conventions of the reference exporters (optimum's UNetOnnxConfig,
TensorRT demoDiffusion): dynamic batch "B" (2x the prompts under CFG), latent "H"/"W".
"""

from __future__ import annotations

from slimdiff.errors import UserError
from slimdiff.models.arch import ArchSpec, TensorSpec, TextEncoderSpec

__all__ = ["FAMILIES", "family_of_pipeline", "get_arch"]

_UNET_BLOCKS = ("down_blocks.*", "mid_block", "up_blocks.*")
_UNET_NEVER = ("conv_in", "conv_out", "conv_norm_out", "time_embedding*", "add_embedding*")

SD15 = ArchSpec(
    family="sd15",
    pipeline_classes=("StableDiffusionPipeline",),
    denoiser="unet",
    denoiser_kind="unet",
    text_encoders=(TextEncoderSpec("text_encoder", "tokenizer", "clip", ("last_hidden_state",)),),
    denoiser_inputs=(
        TensorSpec("sample", "float32", ("B", 4, "H", "W")),
        TensorSpec("timestep", "float32", ("B",)),
        TensorSpec("encoder_hidden_states", "float32", ("B", 77, "D")),
    ),
    default_size=(512, 512),
    default_steps=30,
    default_guidance=7.5,
    uses_cfg=True,
    blocks=_UNET_BLOCKS,
    never_compress=_UNET_NEVER,
)

SDXL = ArchSpec(
    family="sdxl",
    pipeline_classes=("StableDiffusionXLPipeline",),
    denoiser="unet",
    denoiser_kind="unet",
    text_encoders=(
        TextEncoderSpec("text_encoder", "tokenizer", "clip", ("penultimate_hidden_state",)),
        TextEncoderSpec(
            "text_encoder_2", "tokenizer_2", "clip", ("penultimate_hidden_state", "text_embeds")
        ),
    ),
    denoiser_inputs=(
        TensorSpec("sample", "float32", ("B", 4, "H", "W")),
        TensorSpec("timestep", "float32", ("B",)),
        TensorSpec("encoder_hidden_states", "float32", ("B", 77, "D")),
        TensorSpec("text_embeds", "float32", ("B", "P")),
        TensorSpec("time_ids", "float32", ("B", 6)),
    ),
    default_size=(1024, 1024),
    default_steps=30,
    default_guidance=5.0,
    uses_cfg=True,
    blocks=_UNET_BLOCKS,
    never_compress=_UNET_NEVER,
    has_time_ids=True,
)

SD3 = ArchSpec(
    family="sd3",
    pipeline_classes=("StableDiffusion3Pipeline",),
    denoiser="transformer",
    denoiser_kind="sd3",
    text_encoders=(
        TextEncoderSpec(
            "text_encoder", "tokenizer", "clip", ("penultimate_hidden_state", "text_embeds")
        ),
        TextEncoderSpec(
            "text_encoder_2", "tokenizer_2", "clip", ("penultimate_hidden_state", "text_embeds")
        ),
        TextEncoderSpec("text_encoder_3", "tokenizer_3", "t5", ("last_hidden_state",), 256),
    ),
    denoiser_inputs=(
        TensorSpec("hidden_states", "float32", ("B", "C", "H", "W")),
        TensorSpec("encoder_hidden_states", "float32", ("B", "S", "D")),
        TensorSpec("pooled_projections", "float32", ("B", "P")),
        TensorSpec("timestep", "float32", ("B",)),
    ),
    default_size=(1024, 1024),
    default_steps=28,
    default_guidance=7.0,
    uses_cfg=True,
    blocks=("transformer_blocks.*",),
    never_compress=("pos_embed*", "time_text_embed*", "context_embedder", "norm_out*", "proj_out"),
)

FLUX = ArchSpec(
    family="flux",
    pipeline_classes=("FluxPipeline",),
    denoiser="transformer",
    denoiser_kind="flux",
    text_encoders=(
        TextEncoderSpec("text_encoder", "tokenizer", "clip", ("pooler_output",)),
        TextEncoderSpec("text_encoder_2", "tokenizer_2", "t5", ("last_hidden_state",), 512),
    ),
    # FLUX packs 2x2 latent patches into tokens: hidden_states is (B, HW/4, 4C).
    # img_ids/txt_ids have no batch axis (diffusers >= 0.31). `guidance` is only an input
    # when the transformer has guidance_embeds (FLUX.1-dev); the exporter drops it otherwise.
    denoiser_inputs=(
        TensorSpec("hidden_states", "float32", ("B", "L", "C")),
        TensorSpec("encoder_hidden_states", "float32", ("B", "S", "D")),
        TensorSpec("pooled_projections", "float32", ("B", "P")),
        TensorSpec("timestep", "float32", ("B",)),
        TensorSpec("img_ids", "float32", ("L", 3)),
        TensorSpec("txt_ids", "float32", ("S", 3)),
        TensorSpec("guidance", "float32", ("B",)),
    ),
    default_size=(1024, 1024),
    default_steps=28,
    default_guidance=3.5,
    uses_cfg=False,  # FLUX.1 is guidance-distilled: one batch, guidance as an input
    latent_packing=2,
    blocks=("transformer_blocks.*", "single_transformer_blocks.*"),
    never_compress=("x_embedder", "context_embedder", "time_text_embed*", "norm_out*", "proj_out"),
)

FAMILIES: dict[str, ArchSpec] = {spec.family: spec for spec in (SD15, SDXL, SD3, FLUX)}


def get_arch(family: str) -> ArchSpec:
    """The ArchSpec of `family` ("sd15", "sdxl", "sd3", "flux")."""
    try:
        return FAMILIES[family]
    except KeyError:
        raise UserError(
            f"unknown model family {family!r}; slimdiff supports: {', '.join(FAMILIES)}"
        ) from None


def family_of_pipeline(class_name: str) -> str:
    """Family of a diffusers pipeline class name, e.g. "StableDiffusionXLPipeline" -> "sdxl"."""
    for spec in FAMILIES.values():
        if class_name in spec.pipeline_classes:
            return spec.family
    supported = ", ".join(c for s in FAMILIES.values() for c in s.pipeline_classes)
    raise UserError(f"unsupported pipeline class {class_name!r}; slimdiff supports: {supported}")
