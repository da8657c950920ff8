"""SD3 and FLUX single files (tests/ldm_checkpoint_mmdit.py) read back by diffusers itself.

Each writer's file goes through diffusers' own `from_single_file` with a local config (the
tiny pipeline saved as a folder) and must give every tensor back exactly. The detected type
(`infer_diffusers_model_type`) is checked where sizes allow it: FLUX by key names, SD3.5
large by its 38th block; "sd3" and "sd35_medium" need full-width tensors, so those are
checked on meta-device transformers of the real configs, where diffusers' converters also
map the written names back to the model's keys and shapes.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.loaders import single_file_utils as sfu
from diffusers.loaders.single_file_utils import (
    CHECKPOINT_KEY_NAMES,
    infer_diffusers_model_type,
    load_single_file_checkpoint,
)

from slimdiff.models import load_model
from tests.ldm_checkpoint_mmdit import (
    COMFY_PREFIX,
    flux_converter_for_any_width,
    flux_transformer_state,
    same_weights,
    sd3_transformer_state,
    write_flux_single_file,
    write_sd3_single_file,
)


def _kind(file) -> str:
    return infer_diffusers_model_type(load_single_file_checkpoint(str(file)))


def test_sd3_file_has_stabilitys_layout(sd3_finetune, tmp_path):
    pipe, _ = sd3_finetune
    file = tmp_path / "sd3.safetensors"
    write_sd3_single_file(pipe, file)
    keys = set(load_single_file_checkpoint(str(file)))
    for key in (
        CHECKPOINT_KEY_NAMES["sd3"][1],
        CHECKPOINT_KEY_NAMES["clip_sd3"],
        CHECKPOINT_KEY_NAMES["open_clip_sd3"],
        "text_encoders.clip_g.transformer.text_projection.weight",
        "text_encoders.t5xxl.transformer.shared.weight",
        "text_encoders.t5xxl.transformer.encoder.embed_tokens.weight",
        "model.diffusion_model.joint_blocks.1.x_block.attn.qkv.weight",
        "model.diffusion_model.final_layer.adaLN_modulation.1.weight",
        "first_stage_model.decoder.up.3.block.0.conv1.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
    ):
        assert key in keys, key
    # the last block's context side is pre-only: no output projection or MLP
    assert "model.diffusion_model.joint_blocks.1.context_block.attn.proj.weight" not in keys
    assert "text_encoders.clip_l.transformer.text_projection.weight" not in keys
    prefixes = ("model.diffusion_model.", "first_stage_model.", "text_encoders.")
    assert all(key.startswith(prefixes) for key in keys)
    # a tiny transformer's adaLN is 6 x 64 wide, not SD3's 9216: diffusers falls through
    assert _kind(file) == "v1"


def test_sd3_pipeline_loads_back_exactly(sd3_finetune, tmp_path):
    pipe, base = sd3_finetune
    file = tmp_path / "sd3.safetensors"
    write_sd3_single_file(pipe, file)
    loaded = StableDiffusion3Pipeline.from_single_file(
        str(file), config=str(base), local_files_only=True
    )
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        same_weights(getattr(pipe, name), getattr(loaded, name))


@pytest.mark.parametrize("whole", [True, False], ids=["all-components", "transformer-only"])
def test_sd3_components_load_back_exactly(sd3_finetune, tmp_path, whole):
    pipe, base = sd3_finetune
    file = tmp_path / "sd3.safetensors"
    if whole:
        write_sd3_single_file(pipe, file)
    else:
        write_sd3_single_file(pipe, file, text_encoders=(), vae=False)
        assert all(k.startswith(COMFY_PREFIX) for k in load_single_file_checkpoint(str(file)))
    transformer = SD3Transformer2DModel.from_single_file(
        str(file), config=str(base), subfolder="transformer", local_files_only=True
    )
    same_weights(pipe.transformer, transformer)
    if whole:
        vae = AutoencoderKL.from_single_file(
            str(file), config=str(base), subfolder="vae", local_files_only=True
        )
        same_weights(pipe.vae, vae)


def test_sd3_writer_refuses_what_the_layout_cannot_hold(sd3_finetune, tmp_path):
    pipe, _ = sd3_finetune
    with pytest.raises(ValueError, match="clip_h"):
        write_sd3_single_file(pipe, tmp_path / "x.safetensors", text_encoders=("clip_h",))
    base = load_model("tiny:sd3").pipe  # its CLIP-L projects with random weights
    with pytest.raises(ValueError, match="text_projection"):
        write_sd3_single_file(base, tmp_path / "x.safetensors", text_encoders=("clip_l",))


def _tiny_sd3_transformer(**config) -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        pos_embed_max_size=8,
        **config,
    ).eval()


@pytest.mark.parametrize(
    ("config", "kind"),
    [
        # SD3.5 medium's extras: qk RMS norms and dual-attention (attn2) blocks
        ({"num_layers": 3, "qk_norm": "rms_norm", "dual_attention_layers": (0, 1)}, "v1"),
        # SD3.5 large is told by a 38th joint block, whatever its width
        ({"num_layers": 38, "qk_norm": "rms_norm"}, "sd35_large"),
    ],
    ids=["sd35-medium-like", "sd35-large"],
)
def test_sd35_transformers_load_back_exactly(tmp_path, config, kind):
    transformer = _tiny_sd3_transformer(**config)
    transformer.save_pretrained(tmp_path / "base" / "transformer")
    file = tmp_path / "sd35.safetensors"
    write_sd3_single_file(transformer, file, text_encoders=(), vae=False)
    assert _kind(file) == kind
    loaded = SD3Transformer2DModel.from_single_file(
        str(file), config=str(tmp_path / "base"), subfolder="transformer", local_files_only=True
    )
    same_weights(transformer, loaded)


# the transformer configs of stabilityai/stable-diffusion-3-medium-diffusers, -3.5-medium
# and -3.5-large (sizes only: sample_size 128, patch 2, 16 latent channels, head 64)
_FULL_SIZE = {
    "sd3": {"num_layers": 24, "num_attention_heads": 24, "pos_embed_max_size": 192},
    "sd35_medium": {
        "num_layers": 24,
        "num_attention_heads": 24,
        "pos_embed_max_size": 384,
        "dual_attention_layers": tuple(range(13)),
        "qk_norm": "rms_norm",
    },
    "sd35_large": {
        "num_layers": 38,
        "num_attention_heads": 38,
        "pos_embed_max_size": 192,
        "qk_norm": "rms_norm",
    },
}


@pytest.mark.parametrize("kind", sorted(_FULL_SIZE))
def test_full_size_sd3_names_are_detected_and_converted(kind):
    """Real SD3/SD3.5 widths on the meta device (no memory): the writer's names and shapes
    are what diffusers detects as `kind` and converts back to the model's own keys."""
    with torch.device("meta"):
        config = _FULL_SIZE[kind]
        model = SD3Transformer2DModel(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            attention_head_dim=64,
            joint_attention_dim=4096,
            caption_projection_dim=64 * config["num_attention_heads"],
            pooled_projection_dim=2048,
            **config,
        )
    state = model.state_dict()
    file = {COMFY_PREFIX + k: v for k, v in sd3_transformer_state(state, model.config).items()}
    assert infer_diffusers_model_type(file) == kind
    back = sfu.convert_sd3_transformer_checkpoint_to_diffusers(dict(file))
    assert back.keys() == state.keys()
    assert all(back[k].shape == v.shape for k, v in state.items())


@pytest.mark.parametrize("guidance", [True, False], ids=["flux-dev", "flux-schnell"])
def test_full_size_flux_names_are_detected_and_converted(guidance):
    with torch.device("meta"):
        model = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=guidance,
            axes_dims_rope=(16, 56, 56),
        )
    state = model.state_dict()
    file = flux_transformer_state(state, model.config)
    assert infer_diffusers_model_type(file) == ("flux-dev" if guidance else "flux-schnell")
    back = sfu.convert_flux_transformer_checkpoint_to_diffusers(dict(file))
    assert back.keys() == state.keys()
    assert all(back[k].shape == v.shape for k, v in state.items())


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    pipe = load_model("tiny:flux").pipe
    root = tmp_path_factory.mktemp("flux")
    pipe.save_pretrained(root / "base")
    return pipe, root / "base"


def test_tiny_flux_needs_the_width_patch(flux, tmp_path):
    """diffusers' own converter cannot split a 64-wide single block by FLUX.1's 3072."""
    if flux_converter_for_any_width() is sfu.convert_flux_transformer_checkpoint_to_diffusers:
        pytest.skip("this diffusers' FLUX converter has no hard-coded width")
    pipe, base = flux
    file = tmp_path / "flux.safetensors"
    write_flux_single_file(pipe, file)
    with pytest.raises(RuntimeError, match="split"):
        FluxTransformer2DModel.from_single_file(
            str(file), config=str(base), subfolder="transformer", local_files_only=True
        )


@pytest.mark.parametrize("prefix", ["", COMFY_PREFIX], ids=["bfl", "comfyui"])
def test_flux_transformer_loads_back_exactly(flux, tmp_path, flux_any_width, prefix):
    pipe, base = flux
    file = tmp_path / "flux.safetensors"
    write_flux_single_file(pipe, file, prefix=prefix)
    keys = set(load_single_file_checkpoint(str(file)))
    for key in (
        "img_in.weight",
        "txt_in.weight",
        "time_in.in_layer.weight",
        "vector_in.out_layer.bias",
        "guidance_in.in_layer.bias",
        "double_blocks.1.img_attn.qkv.weight",
        "double_blocks.0.txt_mlp.2.bias",
        "single_blocks.3.linear1.weight",
        "single_blocks.0.norm.key_norm.scale",
        "final_layer.adaLN_modulation.1.weight",
    ):
        assert prefix + key in keys, key
    assert all(key.startswith(prefix) for key in keys)
    assert _kind(file) == "flux-dev"
    loaded = FluxTransformer2DModel.from_single_file(
        str(file), config=str(base), subfolder="transformer", local_files_only=True
    )
    same_weights(pipe.transformer, loaded)


def test_flux_schnell_loads_back_exactly(flux, tmp_path, flux_any_width):
    config = dict(flux[0].transformer.config) | {"guidance_embeds": False}
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel.from_config(config).eval()
    transformer.save_pretrained(tmp_path / "base" / "transformer")
    file = tmp_path / "schnell.safetensors"
    write_flux_single_file(transformer, file)
    assert not any(k.startswith("guidance_in.") for k in load_single_file_checkpoint(str(file)))
    assert _kind(file) == "flux-schnell"
    loaded = FluxTransformer2DModel.from_single_file(
        str(file), config=str(tmp_path / "base"), subfolder="transformer", local_files_only=True
    )
    same_weights(transformer, loaded)
