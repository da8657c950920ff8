"""The four ArchSpecs: SD1.5, SDXL, SD3 and FLUX.

IO names follow the conventions of the reference exporters (optimum's UNetOnnxConfig,
TensorRT demoDiffusion): dynamic batch "B" (2x the prompts under CFG), latent "H"/"W".
Module names are diffusers 0.42's.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from slimdiff.errors import UserError
from slimdiff.models.arch import (
    T5_ONNX,
    ArchSpec,
    AttentionSpec,
    FFNSpec,
    OnnxPlan,
    TensorSpec,
    TextEncoderSpec,
)
from slimdiff.models.kinds import KindSpec, ShiftSpec

__all__ = [
    "EQUIVALENT_PIPELINES",
    "FAMILIES",
    "REFINER_PIPELINE",
    "SDXL_REFINER",
    "arch_of_class",
    "arch_of_denoiser",
    "arch_of_pipeline",
    "family_of_denoiser",
    "family_of_pipeline",
    "get_arch",
    "is_refiner_unet",
    "text_to_image_class",
]

# ---------------------------------------------------------------- UNets (SD1.5, SDXL)

# ORT fusion plan, measured on random:sd15 (860M), ORT 1.32 CPU EP, 2 threads, fp32: 16
# Attention + 16 MultiHeadAttention; at 512 px, batch 2 the same speed (11.7 vs 12.5 s,
# noise) but peak RSS 8.1 -> 5.8 GB; at 768 px, batch 2 the unfused graph exceeded 23 GB
# (killed), the fused one peaked at 9.8 GB. Rel err 9e-7. SDPA exports crash ORT 1.32's
# UNet attention fusion (it reads num_heads from a Reshape whose shape is computed), hence
# "classic". opt_level 1 (ORT's constant folding first) lets the fusion match without
# symbolic shape inference, ~3x faster to optimize.
_UNET_ONNX = OnnxPlan("unet", attention="classic", on_cpu=True, opt_level=1)
_UNET_BLOCKS = ("down_blocks.*", "mid_block", "up_blocks.*")
_UNET_STRUCTURE = {
    "blocks": _UNET_BLOCKS,
    # BasicTransformerBlock: self-attention, cross-attention (to_k/to_v read the text
    # states; their output rows still group by head), GEGLU feed-forward.
    "attention": (
        AttentionSpec("**.transformer_blocks.*.attn1"),
        AttentionSpec("**.transformer_blocks.*.attn2"),
    ),
    "ffn": (FFNSpec("**.transformer_blocks.*.ff", gated=True),),
    "never_touch": ("conv_in", "conv_out", "conv_norm_out"),
    "time_projections": ("**.time_emb_proj",),
    "io_layers": ("conv_in", "conv_out"),
    "weight_only": ("**.conv_shortcut",),
}
_UNET_AXES = {
    "C": "in_channels",
    "D": "cross_attention_dim",
    "G": lambda cfg: cfg.get("time_cond_proj_dim") or 0,  # LCM UNets only (timestep_cond)
}
# LCM-distilled UNets (LCM-SDXL, LCM-SSD-1B, LCM-Dreamshaper) embed the guidance scale:
# time_cond_proj_dim in their config, `timestep_cond` in their call, no CFG batch.
_LCM_INPUT = TensorSpec("timestep_cond", "float32", ("B", "G"), when="time_cond_proj_dim")
_NO_CLASS_EMBEDDING = {"class_embed_type": None, "num_class_embeds": None}
_UNET_KIND = KindSpec(name="unet", sample_input="sample", extra_inputs=("timestep_cond",))

SD15 = ArchSpec(
    family="sd15",
    pipeline_classes=("StableDiffusionPipeline",),
    denoiser="unet",
    denoiser_class="UNet2DConditionModel",
    # class-conditioned UNets (unCLIP's image embedding, the x4 upscaler's noise level)
    # take inputs no SD1.5 pipeline gives
    config_match={"addition_embed_type": None, **_NO_CLASS_EMBEDDING},
    text_encoders=(TextEncoderSpec("text_encoder", "tokenizer", "clip", ("last_hidden_state",)),),
    denoiser_inputs=(
        TensorSpec("sample", "float32", ("B", "C", "H", "W")),
        TensorSpec("timestep", "float32", ("B",)),
        TensorSpec("encoder_hidden_states", "float32", ("B", 77, "D")),
        _LCM_INPUT,
    ),
    kind=_UNET_KIND,
    config_axes=_UNET_AXES,
    default_size=(512, 512),
    default_steps=30,
    default_guidance=7.5,
    uses_cfg=True,
    denoiser_onnx=_UNET_ONNX,
    time_embedders=("time_embedding",),
    # EcoDiff has no SD1.5 config; SD2's (the same UNet family) starts at 2.5.
    mask_init_logit=2.5,
    **_UNET_STRUCTURE,
)


def _pooled_width(time_ids: int):
    """The pooled text width of an SDXL-style UNet config whose added embedding takes
    [pooled text, `time_ids` Fourier-embedded time ids] concatenated (SDXL: 6, its
    refiner: 5)."""

    def width(cfg) -> int:
        added = cfg["projection_class_embeddings_input_dim"]
        return added - time_ids * cfg["addition_time_embed_dim"]

    return width


SDXL = ArchSpec(
    family="sdxl",
    pipeline_classes=("StableDiffusionXLPipeline",),
    denoiser="unet",
    denoiser_class="UNet2DConditionModel",
    config_match={"addition_embed_type": "text_time", **_NO_CLASS_EMBEDDING},
    text_encoders=(
        TextEncoderSpec("text_encoder", "tokenizer", "clip", ("penultimate_hidden_state",)),
        TextEncoderSpec(
            "text_encoder_2", "tokenizer_2", "clip", ("penultimate_hidden_state", "text_embeds")
        ),
    ),
    denoiser_inputs=(
        TensorSpec("sample", "float32", ("B", "C", "H", "W")),
        TensorSpec("timestep", "float32", ("B",)),
        TensorSpec("encoder_hidden_states", "float32", ("B", 77, "D")),
        TensorSpec("text_embeds", "float32", ("B", "P"), arg="added_cond_kwargs.text_embeds"),
        TensorSpec("time_ids", "float32", ("B", 6), arg="added_cond_kwargs.time_ids"),
        _LCM_INPUT,
    ),
    kind=_UNET_KIND.model_copy(
        update={"pooled_input": "text_embeds", "extra_inputs": ("time_ids", "timestep_cond")}
    ),
    config_axes={**_UNET_AXES, "P": _pooled_width(6)},
    # SDXL's added embedding (pooled text + time ids) joins the time embedding.
    time_embedders=("time_embedding", "add_embedding"),
    default_size=(1024, 1024),
    default_steps=30,
    default_guidance=5.0,
    # StableDiffusionXLImg2ImgPipeline (the refiner's too): 0.3, its inpaint one 0.9999
    # (one step of 30 skipped); its ControlNet img2img one 0.8
    default_strength=(0.3, 0.9999),
    controlnet_strength=(0.8, 0.9999),
    uses_cfg=True,
    denoiser_onnx=_UNET_ONNX,
    vae_latent_stats=True,
    **_UNET_STRUCTURE,
)

# The SDXL refiner (stabilityai/stable-diffusion-xl-refiner-1.0): an SDXL UNet trained on
# the low-noise end of the schedule, run by StableDiffusionXLImg2ImgPipeline with
# requires_aesthetics_score. It reads the second text encoder (OpenCLIP bigG) alone (its
# model_index.json has text_encoder null), so its text states are that encoder's width, and
# its five time ids carry an aesthetic score where SDXL's carry the target size. Family
# "sdxl" (its bundles say so); the differences are data, as for the families.
REFINER_PIPELINE = "StableDiffusionXLImg2ImgPipeline"
_REFINER_TIME_IDS = 5

SDXL_REFINER = replace(
    SDXL,
    pipeline_classes=(REFINER_PIPELINE,),
    text_encoders=SDXL.text_encoders[1:],
    denoiser_inputs=tuple(
        replace(s, shape=("B", _REFINER_TIME_IDS)) if s.name == "time_ids" else s
        for s in SDXL.denoiser_inputs
    ),
    kind=SDXL.kind.model_copy(update={"aesthetic_score": True}),
    config_axes={**SDXL.config_axes, "P": _pooled_width(_REFINER_TIME_IDS)},
)


def _refiner_conditioned(config: Any, text_width: Any, pooled_width: Any) -> bool:
    """Whether a UNet config takes the refiner's conditioning: text states `text_width`
    wide, and pooled text `pooled_width` wide beside five time ids."""
    try:
        return (
            config["addition_embed_type"] == "text_time"
            and config["cross_attention_dim"] == text_width
            and _pooled_width(_REFINER_TIME_IDS)(config) == pooled_width
        )
    except (KeyError, TypeError):
        return False


def is_refiner_unet(config: Any) -> bool:
    """Whether a lone SDXL UNet's config is the refiner's: its added embedding takes pooled
    text as wide as its text states (one encoder's, OpenCLIP bigG's projection) and five
    time ids. A pipeline says it itself (requires_aesthetics_score); this reads a UNet
    folder without one (`inspect`), where SDXL base's (2816 - 5 x 256 = 1536, text 2048)
    is told apart."""
    width = config.get("cross_attention_dim") if hasattr(config, "get") else None
    return _refiner_conditioned(config, width, width)


# ---------------------------------------------------------------- MMDiTs (SD3, FLUX)

_DIT_AXES = {"C": "in_channels", "D": "joint_attention_dim", "P": "pooled_projection_dim"}
# Joint attention: the image and text streams share the heads.
_JOINT = AttentionSpec(
    "transformer_blocks.*.attn",
    context_qkv=("add_q_proj", "add_k_proj", "add_v_proj"),
    context_out=("to_add_out",),
)
_DIT_FFN = (FFNSpec("transformer_blocks.*.ff"), FFNSpec("transformer_blocks.*.ff_context"))
_DIT_MODULATION = ("transformer_blocks.*.norm1.linear", "transformer_blocks.*.norm1_context.linear")

SD3 = ArchSpec(
    family="sd3",
    pipeline_classes=("StableDiffusion3Pipeline",),
    denoiser="transformer",
    denoiser_class="SD3Transformer2DModel",
    text_encoders=(
        TextEncoderSpec(
            "text_encoder", "tokenizer", "clip", ("penultimate_hidden_state", "text_embeds")
        ),
        TextEncoderSpec(
            "text_encoder_2", "tokenizer_2", "clip", ("penultimate_hidden_state", "text_embeds")
        ),
        # CLIP states (77 tokens), zero-padded to T5's width, then T5's 256 tokens; without
        # T5 (optional: diffusers' text_encoder_3=None) 256 zero tokens in its place.
        TextEncoderSpec(
            "text_encoder_3",
            "tokenizer_3",
            "t5",
            ("last_hidden_state",),
            256,
            1,
            T5_ONNX,
            optional=True,
        ),
    ),
    denoiser_inputs=(
        TensorSpec("hidden_states", "float32", ("B", "C", "H", "W")),
        TensorSpec("encoder_hidden_states", "float32", ("B", "S", "D")),
        TensorSpec("pooled_projections", "float32", ("B", "P")),
        TensorSpec("timestep", "float32", ("B",)),
    ),
    kind=KindSpec(
        name="sd3",
        sample_input="hidden_states",
        pooled_input="pooled_projections",
        # SD3.5 configs set use_dynamic_shifting; the SD3 pipeline's default max_shift.
        shift=ShiftSpec(max_shift=1.16),
        strength_rounding="start",
    ),
    token_patch_key="patch_size",
    config_axes=_DIT_AXES,
    default_size=(1024, 1024),
    default_steps=28,
    default_guidance=7.0,
    default_strength=(0.6, 0.6),  # StableDiffusion3Img2Img/InpaintPipeline
    flow_matching=True,
    vae_shift=True,  # latents / scaling_factor + shift_factor, as its pipeline decodes
    uses_cfg=True,
    # SD3 transformer (full width, 2 of 24 layers), joint attention -> MultiHeadAttention:
    # at 1024 px, batch 2, 22.2 -> 13.6 s and peak RSS 16.0 -> 5.6 GB; at 512 px no change.
    # It needs symbolic shape inference, and opt_level 1 loses the match (0, as ORT's
    # optimize_pipeline uses).
    denoiser_onnx=OnnxPlan("mmdit", on_cpu=True, shape_inference=True),
    blocks=("transformer_blocks.*",),
    # SD3.5's dual-attention blocks add a self-attention (attn2) on the image stream.
    attention=(_JOINT, AttentionSpec("transformer_blocks.*.attn2")),
    ffn=_DIT_FFN,
    never_touch=("pos_embed", "context_embedder", "norm_out", "proj_out"),
    time_embedders=("time_text_embed",),
    time_projections=_DIT_MODULATION,
    io_layers=("pos_embed", "proj_out"),
    never_quantize=("context_embedder", "norm_out"),
    mask_init_logit=4.0,  # EcoDiff's SD3.5 config
)

FLUX = ArchSpec(
    family="flux",
    pipeline_classes=("FluxPipeline",),
    denoiser="transformer",
    denoiser_class="FluxTransformer2DModel",
    text_encoders=(
        TextEncoderSpec("text_encoder", "tokenizer", "clip", ("pooler_output",)),
        TextEncoderSpec(
            "text_encoder_2", "tokenizer_2", "t5", ("last_hidden_state",), 512, 0, T5_ONNX
        ),
    ),
    # FLUX packs 2x2 latent patches into tokens: hidden_states is (B, HW/4, 4C).
    # img_ids/txt_ids have no batch axis (diffusers >= 0.31). `guidance` is only an input
    # when the transformer has guidance_embeds (FLUX.1-dev).
    denoiser_inputs=(
        TensorSpec("hidden_states", "float32", ("B", "L", "C")),
        TensorSpec("encoder_hidden_states", "float32", ("B", "S", "D")),
        TensorSpec("pooled_projections", "float32", ("B", "P")),
        TensorSpec("timestep", "float32", ("B",)),
        TensorSpec("img_ids", "float32", ("L", 3)),
        TensorSpec("txt_ids", "float32", ("S", 3)),
        TensorSpec("guidance", "float32", ("B",), when="guidance_embeds"),
    ),
    kind=KindSpec(
        name="flux",
        sample_input="hidden_states",
        pooled_input="pooled_projections",
        latent_packing=2,
        token_patch=2,
        timestep_divisor=1000.0,  # FluxPipeline passes timestep / 1000
        sigmas="linspace",
        shift=ShiftSpec(max_shift=1.15),
        extra_inputs=("img_ids", "txt_ids", "guidance"),
        strength_rounding="start",
        true_cfg=True,  # FluxPipeline's true_cfg_scale
    ),
    config_axes=_DIT_AXES,
    default_size=(1024, 1024),
    default_steps=28,
    default_guidance=3.5,
    default_strength=(0.6, 0.6),  # FluxImg2Img/InpaintPipeline
    flow_matching=True,
    vae_shift=True,  # latents / scaling_factor + shift_factor, as its pipeline decodes
    uses_cfg=False,  # FLUX.1 is guidance-distilled: one batch, guidance as an input
    # ORT 1.32's FLUX attention pattern wants q/k RMSNorm after the head transpose (the
    # layout of older diffusers' FluxAttnProcessor2_0); diffusers 0.42 normalises before it,
    # so only FastGelu fuses, which the CPU session does by itself.
    denoiser_onnx=OnnxPlan("mmdit"),
    blocks=("transformer_blocks.*", "single_transformer_blocks.*"),
    attention=(
        _JOINT,
        # Single-stream blocks: one proj_out takes [attention output, MLP hidden].
        AttentionSpec(
            "single_transformer_blocks.*",
            module="attn",
            qkv=("attn.to_q", "attn.to_k", "attn.to_v"),
            out=("proj_out",),
            out_columns="first",
        ),
    ),
    ffn=(
        *_DIT_FFN,
        FFNSpec(
            "single_transformer_blocks.*",
            up="proj_mlp",
            down="proj_out",
            activation="act_mlp",
            down_columns="last",
        ),
    ),
    never_touch=("x_embedder", "context_embedder", "norm_out", "proj_out"),
    time_embedders=("time_text_embed",),  # timestep, guidance and pooled-text embedders
    time_projections=(*_DIT_MODULATION, "single_transformer_blocks.*.norm.linear"),
    io_layers=("x_embedder", "proj_out"),
    never_quantize=("context_embedder", "norm_out"),
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


# Pipeline classes that hold a whole text-to-image model of a family, loaded as the family's
# own class (diffusers loads a folder's components into any pipeline class that takes them;
# DiffusionPipeline.from_pipe converts a loaded one): LCM-Dreamshaper's hub folder names
# LatentConsistencyModelPipeline, and folders saved from an img2img pipeline hold the same
# model. An SD1.5/SDXL inpainting pipeline holds the family's components too, its UNet
# taking a mask and a masked image besides the latents (KindSpec.inpainting): it loads as
# the family's and runs only with an image and a mask.
EQUIVALENT_PIPELINES = {
    "LatentConsistencyModelPipeline": "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline": "StableDiffusionPipeline",
    "StableDiffusionInpaintPipeline": "StableDiffusionPipeline",
    "StableDiffusionXLImg2ImgPipeline": "StableDiffusionXLPipeline",
    "StableDiffusionXLInpaintPipeline": "StableDiffusionXLPipeline",
    "StableDiffusion3Img2ImgPipeline": "StableDiffusion3Pipeline",
    "StableDiffusion3InpaintPipeline": "StableDiffusion3Pipeline",
    "FluxImg2ImgPipeline": "FluxPipeline",
    "FluxInpaintPipeline": "FluxPipeline",
}
# Classes whose folders hold the SDXL refiner when their config says
# requires_aesthetics_score (diffusers' docs load the refiner with either)
_REFINER_CLASSES = (REFINER_PIPELINE, "StableDiffusionXLInpaintPipeline")


def text_to_image_class(class_name: str, config: Any = None) -> str:
    """The pipeline class slimdiff loads a `class_name` folder as (itself if not listed).
    `config`: the folder's model_index.json (or a loaded pipeline's config), which tells
    the SDXL refiner (requires_aesthetics_score) from an SDXL saved by its img2img
    pipeline: the refiner keeps its class, which runs its time ids."""
    aesthetic = bool(config) and config.get("requires_aesthetics_score") is True
    if class_name in _REFINER_CLASSES and aesthetic:
        return REFINER_PIPELINE
    return EQUIVALENT_PIPELINES.get(class_name, class_name)


def arch_of_pipeline(pipe: Any) -> ArchSpec:
    """The ArchSpec of a loaded diffusers pipeline: its family's, or SDXL_REFINER for the
    SDXL refiner. UserError for a class slimdiff does not take, and for a pipeline that
    requires aesthetic scores but also has a first text encoder (not the refiner's layout,
    whose text states are the second encoder's alone)."""
    name = type(pipe).__name__
    arch = arch_of_class(text_to_image_class(name, getattr(pipe, "config", None)))
    if arch is not SDXL_REFINER:
        return arch
    if getattr(pipe, "text_encoder", None) is not None:
        raise UserError(
            f"this {name} sets requires_aesthetics_score and has a first text encoder: "
            "slimdiff takes the SDXL refiner's layout (text_encoder null, text_encoder_2 "
            "only); set text_encoder to [null, null] in model_index.json, or "
            "requires_aesthetics_score to false for an SDXL base model"
        )
    unet, text = getattr(pipe, "unet", None), getattr(pipe, "text_encoder_2", None)
    # (a missing one is named by the loader)
    if unet is not None and text is not None:
        t = text.config
        hidden, pooled = getattr(t, "hidden_size", None), getattr(t, "projection_dim", None)
        if not _refiner_conditioned(unet.config, hidden, pooled):
            raise UserError(
                f"this {name} sets requires_aesthetics_score, but its UNet is not conditioned "
                "as the SDXL refiner's (text states as wide as text_encoder_2's, its pooled "
                "embedding and five time ids with the aesthetic score); if it is an SDXL base "
                "model saved by the img2img pipeline, set requires_aesthetics_score to false "
                "in model_index.json"
            )
    return arch


def arch_of_class(class_name: str) -> ArchSpec:
    """The ArchSpec of a pipeline class as text_to_image_class answers it: REFINER_PIPELINE
    only for the refiner (the SDXL img2img class otherwise maps to SDXL's own)."""
    if class_name == REFINER_PIPELINE:
        return SDXL_REFINER
    return get_arch(family_of_pipeline(class_name))


def arch_of_denoiser(class_name: str, config: dict) -> ArchSpec | None:
    """The ArchSpec of a lone denoiser from its class and config (the refiner's for an SDXL
    refiner UNet); None if no family matches."""
    family = family_of_denoiser(class_name, config)
    if family == "sdxl" and is_refiner_unet(config):
        return SDXL_REFINER
    return None if family is None else get_arch(family)


def family_of_pipeline(class_name: str) -> str:
    """Family of a diffusers pipeline class name, e.g. "StableDiffusionXLPipeline" -> "sdxl"."""
    if not isinstance(class_name, str) or not class_name:
        raise UserError(
            f"model_index.json's _class_name is {class_name!r}, not a diffusers pipeline class; "
            "save the pipeline again with save_pretrained"
        )
    class_name = text_to_image_class(class_name)
    for spec in FAMILIES.values():
        if class_name in spec.pipeline_classes:
            return spec.family
    supported = ", ".join(c for s in FAMILIES.values() for c in s.pipeline_classes)
    if class_name.startswith(_EXPORTED_PREFIXES):
        raise UserError(
            f"this is {class_name}, an already exported model (ONNX or OpenVINO, saved by "
            "optimum or diffusers' Onnx pipelines); slimdiff compresses and exports from the "
            f"PyTorch model: pass its diffusers folder or hub id ({supported})"
        )
    raise UserError(
        f"unsupported pipeline class {class_name!r}; slimdiff supports: {supported} (and "
        f"their img2img and inpaint forms: {', '.join(EQUIVALENT_PIPELINES)})"
    )


# Pipeline classes of models exported by other tools: optimum's ORT/OpenVINO pipelines and
# diffusers' own (deprecated) Onnx pipelines
_EXPORTED_PREFIXES = ("ORT", "OV", "Onnx")


def family_of_denoiser(class_name: str, config: dict) -> str | None:
    """Family of a lone denoiser from its class and config; None if no family matches."""
    return next((s.family for s in FAMILIES.values() if s.matches_config(class_name, config)), None)


def why_no_family(class_name: str, config: dict) -> str:
    """What makes a denoiser of a known class fit no family, in a few words ("" if its
    class is not one slimdiff knows): the config keys that tell the families apart."""
    if class_name != "UNet2DConditionModel":
        return ""
    if config.get("class_embed_type") is not None or config.get("num_class_embeds"):
        return "class-conditioned (class_embed_type / num_class_embeds: unCLIP, upscalers)"
    kind = config.get("addition_embed_type")
    if kind not in (None, "text_time"):
        return f"conditioned by addition_embed_type {kind!r} (Kandinsky-style)"
    return ""
