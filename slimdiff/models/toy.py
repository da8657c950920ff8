"""`toy:shapes`: a small SDXL-family pipeline trained by the project on `slimdiff.toy`.

It keeps SDXL's topology at toy width so every SDXL pass applies to it: two CLIP text
encoders (the second with a projection, its tokenizer padding with "!"), a UNet with three
stages (DownBlock2D, then two cross-attention stages with transformer depths 1, 2 and 4 in
place of SDXL's 1, 2 and 10), a mid-block with attention, `text_time` conditioning, and
an AutoencoderKL. It draws 64x64 images from 16x16x4 latents (the VAE downsamples 4x
where SDXL's does 8x: at 64x64 an 8x8 latent blurs the shapes).

The trained weights ship in the package (`toy_shapes/`, a diffusers pipeline folder in
fp16); `tools/train_toy.py` reproduces them, and `build_toy_pipeline` is the untrained
architecture it starts from.
"""

from __future__ import annotations

from pathlib import Path

import torch

from slimdiff.errors import UserError

__all__ = ["TOY_MODELS", "build_toy_pipeline", "load_toy", "parse_toy", "toy_folder"]

TOY_MODELS = ("shapes",)
TOY_SIDE = 64  # image side in pixels

_TEXT = {  # hidden, intermediate, layers, heads: SDXL reads the penultimate layer
    "text_encoder": (32, 128, 3, 2),
    "text_encoder_2": (64, 256, 3, 4),
}


def parse_toy(model: str) -> str | None:
    """ "shapes" for "toy:shapes"; None when `model` is not a toy reference."""
    kind, sep, name = model.partition(":")
    if kind != "toy" or not sep:
        return None
    if name not in TOY_MODELS:
        raise UserError(f"unknown toy model {model!r}; available: toy:{', toy:'.join(TOY_MODELS)}")
    return name


def toy_folder(name: str = "shapes") -> Path:
    return Path(__file__).with_name(f"toy_{name}")


def load_toy(name: str = "shapes", device: str = "cpu"):
    """The trained toy pipeline in float32, from the package."""
    folder = toy_folder(name)
    if not (folder / "model_index.json").is_file():
        raise UserError(
            f"toy:{name} weights are missing from {folder}; reinstall slimdiff, or train them "
            "with `python tools/train_toy.py`"
        )
    if device == "meta":
        return _pinned(build_toy_pipeline(device="meta"))
    return load_toy_folder(folder, device)


def load_toy_folder(folder: Path, device: str = "cpu"):
    """A toy pipeline folder (the shipped one, or one tools/train_toy.py wrote) in float32."""
    from diffusers import StableDiffusionXLPipeline

    # No dtype argument: diffusers renamed `torch_dtype` to `dtype` (the old name now
    # warns) within the range pyproject allows; `.float()` pins fp32 either way.
    return _pinned(
        StableDiffusionXLPipeline.from_pretrained(folder, use_safetensors=True).to(device)
    )


def _pinned(pipe):
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.float().eval().requires_grad_(False)
    return pipe


def build_toy_pipeline(seed: int = 0, device: str = "cpu", vae_scaling_factor: float = 1.0):
    """The untrained `toy:shapes` architecture, seeded."""
    from slimdiff.models.builtin import _clip, sdxl_pipeline

    torch.manual_seed(seed)
    with torch.device(device):
        clip_l = _clip(_TEXT["text_encoder"], None)
        # The second encoder projects its pooled output as OpenCLIP bigG does; its tokenizer
        # pads with "!". Its activation is gelu (bigG's) at this width too.
        clip_g = _clip(_TEXT["text_encoder_2"], _TEXT["text_encoder_2"][0], "!", "gelu")
        unet = build_toy_unet()
        vae = build_toy_vae(vae_scaling_factor)
    return sdxl_pipeline(vae, clip_l, clip_g, unet)


def build_toy_unet():
    from diffusers import UNet2DConditionModel

    context = _TEXT["text_encoder"][0] + _TEXT["text_encoder_2"][0]
    time_dim = 16
    # Widths are what a 2-core CPU trains in about an hour (~200 MFLOP per forward).
    return UNet2DConditionModel(
        sample_size=TOY_SIDE // 4,
        block_out_channels=(16, 32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 4),
        attention_head_dim=(1, 1, 2),  # head counts, as SDXL's config names them: 32-d heads
        cross_attention_dim=context,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=time_dim * 6 + _TEXT["text_encoder_2"][0],
        norm_num_groups=8,
    )


def build_toy_vae(scaling_factor: float = 1.0):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TOY_SIDE,
        scaling_factor=scaling_factor,
        force_upcast=True,
    )
