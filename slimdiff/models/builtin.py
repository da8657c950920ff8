"""Built-in models that need no download: `tiny:<family>` and `random:<family>`, and the
SDXL refiner as `tiny:sdxl-refiner` / `random:sdxl-refiner`.

- `tiny:*` are complete diffusers pipelines with the family's real block topology at tiny
  width and seeded random weights, built in about a second: what tests use.
- `random:*` are the full-size architectures with random weights, for latency and memory
  measurements; with `device="meta"` they cost no memory (parameter and FLOP counting).

Configs follow the published ones (SD1.5 v1-5, SDXL base 1.0 and refiner 1.0, SD3-medium,
FLUX.1-dev);
tiny ones keep block types, counts and transformer depths' shape and shrink the widths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from slimdiff.errors import UserError
from slimdiff.models.families import FAMILIES
from slimdiff.models.tokenizer_files import (
    clip_vocab_size,
    make_clip_tokenizer,
    make_t5_tokenizer,
    t5_vocab_size,
)

__all__ = ["BUILTIN_KINDS", "BUILTIN_MODELS", "build_builtin", "builtin_class", "parse_builtin"]

BUILTIN_KINDS = ("tiny", "random")
# Built-in models besides the families' own: the SDXL refiner (family sdxl).
_EXTRA_MODELS = {"sdxl-refiner": "StableDiffusionXLImg2ImgPipeline"}
BUILTIN_MODELS = (*FAMILIES, *_EXTRA_MODELS)
_SEED = 0


@dataclass(frozen=True)
class _Size:
    """Widths for one scale; every config below reads from this."""

    unet_channels: tuple[int, ...]
    unet_heads: Any
    groups: int
    clip: tuple[int, int, int, int]  # hidden, intermediate, layers, heads
    clip_g: tuple[int, int, int, int]
    t5: tuple[int, int, int, int, int]  # d_model, d_ff, layers, heads, d_kv
    vae_channels: tuple[int, ...]
    vae_groups: int


def parse_builtin(model: str) -> tuple[str, str] | None:
    """("tiny", "sdxl") for "tiny:sdxl"; None when `model` is not a built-in reference."""
    kind, sep, family = model.partition(":")
    if not sep or kind not in BUILTIN_KINDS:
        return None
    if family not in BUILTIN_MODELS:
        raise UserError(
            f"unknown built-in model {model!r}; use {kind}:<model> with model one of "
            f"{', '.join(BUILTIN_MODELS)}"
        )
    return kind, family


def builtin_class(name: str) -> str:
    """The pipeline class of built-in model `name` ("sdxl", "sdxl-refiner", ...)."""
    return _EXTRA_MODELS.get(name) or FAMILIES[name].pipeline_classes[0]


def build_builtin(kind: str, family: str, device: str = "cpu", lazy: bool = False):
    """Build `kind:family` as a diffusers pipeline (weights seeded, deterministic).

    `lazy`: parameters on the meta device with a weight source (slimdiff/models/lazy.py),
    for export: `random:*` draws each tensor when asked (never the whole model in memory),
    `tiny:*` is built as usual and its weights handed to the source.

    `random:*` weights are drawn per tensor (slimdiff/models/weights.py InitWeights), built
    lazily or not, so both give the same model; `tiny:*` ones by torch's module inits under
    one seed, as they always were (tests compare against them).
    """
    from slimdiff.models.lazy import make_lazy, materialize
    from slimdiff.models.weights import InitWeights

    torch.manual_seed(_SEED)
    tiny = kind == "tiny"
    builder = {
        "sd15": _sd15,
        "sdxl": _sdxl,
        "sdxl-refiner": _sdxl_refiner,
        "sd3": _sd3,
        "flux": _flux,
    }[family]
    if tiny or device == "meta":
        with torch.device(device):
            pipe = builder(tiny)
    else:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):  # buffers real: computed at init
            pipe = builder(tiny)
    for name in _TORCH_PARTS:
        module = getattr(pipe, name, None)
        if module is None:
            continue
        module.eval().requires_grad_(False)
        if device == "meta":
            continue
        if not tiny:
            make_lazy(module, InitWeights(module, _SEED))
            if not lazy:
                materialize(module, keep_source=False).to(device)
        elif lazy:
            make_lazy(module)
    return pipe


_TORCH_PARTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


# ---------------------------------------------------------------- text encoders and VAE


def _clip(
    dims: tuple[int, int, int, int],
    projection: int | None,
    pad_token="<|endoftext|>",
    hidden_act: str | None = None,
):
    """A CLIP text encoder (with a projection when `projection`) and its tokenizer; the
    activation defaults to CLIP's: quick_gelu, gelu for OpenCLIP bigG (hidden 1280)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = make_clip_tokenizer(pad_token=pad_token)
    hidden, inter, layers, heads = dims
    cfg = CLIPTextConfig(
        vocab_size=max(clip_vocab_size(), 49408 if hidden >= 768 else 0),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=hidden_act or ("quick_gelu" if hidden < 1280 else "gelu"),
        projection_dim=projection or hidden,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(cfg), tok


def _t5(dims: tuple[int, int, int, int, int], max_length: int):
    from transformers import T5Config, T5EncoderModel

    d_model, d_ff, layers, heads, d_kv = dims
    tok = make_t5_tokenizer(max_length)
    cfg = T5Config(
        vocab_size=max(t5_vocab_size(), 32128 if d_model >= 4096 else 0),
        d_model=d_model,
        d_ff=d_ff,
        d_kv=d_kv,
        num_layers=layers,
        num_heads=heads,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return T5EncoderModel(cfg), tok


def _vae(size: _Size, latent_channels: int, **extra):
    from diffusers import AutoencoderKL

    n = len(size.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=size.vae_channels,
        layers_per_block=1 if size.vae_groups < 32 else 2,
        latent_channels=latent_channels,
        norm_num_groups=size.vae_groups,
        **extra,
    )


_TINY = _Size(
    unet_channels=(32, 64, 64, 64),
    unet_heads=4,
    groups=8,
    clip=(32, 64, 3, 4),
    clip_g=(32, 64, 3, 4),
    t5=(32, 64, 2, 4, 8),
    vae_channels=(16, 16, 32, 32),
    vae_groups=8,
)


# ---------------------------------------------------------------- pipelines


def _sd15(tiny: bool):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

    real = _Size(
        (320, 640, 1280, 1280),
        8,
        32,
        (768, 3072, 12, 12),
        (0, 0, 0, 0),
        (0, 0, 0, 0, 0),
        (128, 256, 512, 512),
        32,
    )
    size = _TINY if tiny else real
    text_encoder, tokenizer = _clip(size.clip, None)
    unet = UNet2DConditionModel(
        sample_size=16 if tiny else 64,
        block_out_channels=size.unet_channels,
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=size.unet_heads,  # SD1.x names the head count this way
        cross_attention_dim=size.clip[0],
        norm_num_groups=size.groups,
    )
    vae = _vae(size, 4, scaling_factor=0.18215, sample_size=128 if tiny else 512)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_sd_scheduler(EulerDiscreteScheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


_SDXL = _Size(
    (320, 640, 1280),
    (5, 10, 20),
    32,
    (768, 3072, 12, 12),
    (1280, 5120, 32, 20),
    (0, 0, 0, 0, 0),
    (128, 256, 512, 512),
    32,
)


def _sdxl(tiny: bool):
    size = _TINY if tiny else _SDXL
    text_encoder, tokenizer = _clip(size.clip, None)
    # SDXL's second encoder is OpenCLIP bigG with a projection; its tokenizer pads with "!".
    text_encoder_2, tokenizer_2 = _clip(size.clip_g, size.clip_g[0], pad_token="!")
    unet = sdxl_unet(tiny)
    return sdxl_pipeline(
        sdxl_vae(tiny), (text_encoder, tokenizer), (text_encoder_2, tokenizer_2), unet
    )


def sdxl_vae(tiny: bool):
    """The VAE of `tiny:sdxl` or `random:sdxl` alone (random weights from torch's current
    RNG), e.g. for tools/vae_speed.py."""
    size = _TINY if tiny else _SDXL
    return _vae(
        size, 4, scaling_factor=0.13025, force_upcast=True, sample_size=128 if tiny else 1024
    )


def sdxl_unet(tiny: bool):
    """The UNet of `tiny:sdxl` or `random:sdxl` alone (random weights from torch's current
    RNG): SDXL base's architecture at full width, or the tiny stand-in. For work on the
    denoiser only, e.g. tools/unet_speed.py, without building 0.8B parameters of text
    encoders."""
    from diffusers import UNet2DConditionModel

    size = _TINY if tiny else _SDXL
    time_dim = 8 if tiny else 256
    return UNet2DConditionModel(
        sample_size=16 if tiny else 128,
        block_out_channels=size.unet_channels[:3],
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        # SDXL: 2 transformer layers in stage 2, 10 in stage 3 and the mid-block; tiny keeps
        # the "deepest stage is deeper" shape (1, 2, 4) so depth cuts have something to cut.
        transformer_layers_per_block=(1, 2, 4) if tiny else (1, 2, 10),
        attention_head_dim=(2, 4, 4) if tiny else size.unet_heads,
        cross_attention_dim=size.clip[0] + size.clip_g[0],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=time_dim * 6 + size.clip_g[0],
        upcast_attention=False,
        norm_num_groups=size.groups,
    )


def sdxl_pipeline(vae, clip_l, clip_g, unet):
    """A StableDiffusionXLPipeline from its parts, with SDXL base's scheduler config and
    all-zero embeddings for an empty negative prompt (`force_zeros_for_empty_prompt`)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=clip_l[0],
        tokenizer=clip_l[1],
        text_encoder_2=clip_g[0],
        tokenizer_2=clip_g[1],
        unet=unet,
        scheduler=_sd_scheduler(EulerDiscreteScheduler),
        force_zeros_for_empty_prompt=True,
    )


def _sdxl_refiner(tiny: bool):
    """SDXL refiner 1.0: OpenCLIP bigG alone, a four-stage UNet (384-1536 channels, four
    transformer layers per attention block) conditioned on its text states (1280 wide),
    pooled text and five time ids with the aesthetic score, and SDXL's VAE."""
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        UNet2DConditionModel,
    )

    size = _TINY if tiny else _SDXL
    text_encoder_2, tokenizer_2 = _clip(size.clip_g, size.clip_g[0], pad_token="!")
    time_dim = 8 if tiny else 256
    unet = UNet2DConditionModel(
        sample_size=16 if tiny else 128,
        block_out_channels=size.unet_channels if tiny else (384, 768, 1536, 1536),
        layers_per_block=2,
        down_block_types=("DownBlock2D", *["CrossAttnDownBlock2D"] * 2, "DownBlock2D"),
        up_block_types=("UpBlock2D", *["CrossAttnUpBlock2D"] * 2, "UpBlock2D"),
        transformer_layers_per_block=1 if tiny else 4,
        attention_head_dim=(2, 4, 4, 4) if tiny else (6, 12, 24, 24),
        cross_attention_dim=size.clip_g[0],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=time_dim * 5 + size.clip_g[0],
        upcast_attention=False,
        norm_num_groups=size.groups,
    )
    return StableDiffusionXLImg2ImgPipeline(
        vae=sdxl_vae(tiny),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_sd_scheduler(EulerDiscreteScheduler),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )


def _sd3(tiny: bool):
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    real = _Size(
        (),
        None,
        32,
        (768, 3072, 12, 12),
        (1280, 5120, 32, 20),
        (4096, 10240, 24, 64, 64),
        (128, 256, 512, 512),
        32,
    )
    size = _TINY if tiny else real
    text_encoder, tokenizer = _clip(size.clip, size.clip[0])
    text_encoder_2, tokenizer_2 = _clip(size.clip_g, size.clip_g[0], pad_token="!")  # as SD3
    text_encoder_3, tokenizer_3 = _t5(size.t5, 256)
    # T5's width is the joint attention width; the CLIP features are zero-padded up to it.
    joint = size.t5[0] if not tiny else size.clip[0] + size.clip_g[0]
    if tiny:
        text_encoder_3, tokenizer_3 = _t5((joint, 128, 2, 4, 16), 256)
    transformer = SD3Transformer2DModel(
        sample_size=16 if tiny else 128,
        patch_size=2,
        in_channels=16,
        num_layers=2 if tiny else 24,
        attention_head_dim=16 if tiny else 64,
        num_attention_heads=4 if tiny else 24,
        joint_attention_dim=joint,
        caption_projection_dim=64 if tiny else 1536,
        pooled_projection_dim=size.clip[0] + size.clip_g[0],
        out_channels=16,
        pos_embed_max_size=32 if tiny else 192,
    )
    vae = _vae(
        size,
        16,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
        sample_size=128 if tiny else 1024,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=_on_cpu(FlowMatchEulerDiscreteScheduler, shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def _flux(tiny: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    real = _Size(
        (),
        None,
        32,
        (768, 3072, 12, 12),
        (0, 0, 0, 0),
        (4096, 10240, 24, 64, 64),
        (128, 256, 512, 512),
        32,
    )
    size = _TINY if tiny else real
    text_encoder, tokenizer = _clip(size.clip, None)
    text_encoder_2, tokenizer_2 = _t5(size.t5 if not tiny else (64, 128, 2, 4, 16), 512)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x 2x2 packing
        num_layers=2 if tiny else 19,
        num_single_layers=4 if tiny else 38,
        attention_head_dim=16 if tiny else 128,
        num_attention_heads=4 if tiny else 24,
        joint_attention_dim=64 if tiny else 4096,
        pooled_projection_dim=size.clip[0],
        guidance_embeds=True,  # FLUX.1-dev; schnell has none
        axes_dims_rope=(4, 6, 6) if tiny else (16, 56, 56),
    )
    vae = _vae(
        size,
        16,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        sample_size=128 if tiny else 1024,
    )
    scheduler = _on_cpu(
        FlowMatchEulerDiscreteScheduler,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def _on_cpu(cls, **kwargs):
    # Schedulers keep CPU tensors; build them outside a meta-device context.
    with torch.device("cpu"):
        return cls(**kwargs)


def _sd_scheduler(cls):
    # The SD1.5 / SDXL hub scheduler configs.
    return _on_cpu(
        cls,
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
