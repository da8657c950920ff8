"""A folder whose parts are not its family's (another family's denoiser, SDXL's second
text encoder without its projection, a UNet taking other inputs) is refused in one line
when it loads, lazily or not, before any export or trace fails on it."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from slimdiff.cli import main
from slimdiff.errors import UserError
from slimdiff.models import load_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    for family in ("sd15", "sdxl"):
        load_model(f"tiny:{family}").pipe.save_pretrained(root / family)
    return root


def _edit_json(file, **changes):
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def _sdxl_unet_in_sd15(root):
    shutil.rmtree(root / "sd15" / "unet")
    shutil.copytree(root / "sdxl" / "unet", root / "sd15" / "unet")
    return root / "sd15"


def _unprojected_text_encoder_2(root):
    _edit_json(root / "sdxl" / "model_index.json", text_encoder_2=["transformers", "CLIPTextModel"])
    _edit_json(root / "sdxl" / "text_encoder_2" / "config.json", architectures=["CLIPTextModel"])
    return root / "sdxl"


def _five_channel_unet(root):
    """Config and weights alike: diffusers loads it."""
    unet = root / "sd15" / "unet"
    _edit_json(unet / "config.json", in_channels=5)
    file = unet / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    weight = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([weight, weight[:, :1]], dim=1)
    save_file(state, file)
    return root / "sd15"


def _class_conditioned_unet(root):
    """An SD2.1-unCLIP / x4-upscaler style UNet (a class embedding), weights and all."""
    from diffusers import UNet2DConditionModel

    unet = root / "sd15" / "unet"
    config = {k: v for k, v in UNet2DConditionModel.load_config(unet).items() if k[0] != "_"}
    UNet2DConditionModel(**{**config, "num_class_embeds": 10}).save_pretrained(unet)
    return root / "sd15"


def _wider_text_encoder(root):
    """A text encoder 48 wide before a UNet whose cross-attention takes 32."""
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = root / "sd15" / "text_encoder"
    config = CLIPTextConfig.from_pretrained(folder)
    config.hidden_size, config.intermediate_size = 48, 96
    CLIPTextModel(config).save_pretrained(folder)
    return root / "sd15"


def _long_clip(root):
    """Long-CLIP: 248 positions, and a tokenizer that pads prompts to them."""
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = root / "sd15" / "text_encoder"
    config = CLIPTextConfig.from_pretrained(folder)
    config.max_position_embeddings = 248
    CLIPTextModel(config).save_pretrained(folder)
    _edit_json(root / "sd15" / "tokenizer" / "tokenizer_config.json", model_max_length=248)
    return root / "sd15"


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (_sdxl_unet_in_sd15, "its unet is a sdxl UNet2DConditionModel (by its config), not the"),
        (_long_clip, "its tokenizer reads 248-token prompts (model_max_length: a long-context"),
        (
            _class_conditioned_unet,
            "its unet (UNet2DConditionModel) is class-conditioned (class_embed_type / "
            "num_class_embeds: unCLIP, upscalers), which slimdiff does not run",
        ),
        (
            _wider_text_encoder,
            "its text encoders give states 48 wide (text_encoder 48), but its unet takes text "
            "32 wide",
        ),
        (_unprojected_text_encoder_2, "its text_encoder_2 is a CLIPTextModel, which cannot give"),
        (_five_channel_unet, "its unet takes 5 input channels, and a sd15 pipeline with this"),
    ],
)
def test_parts_of_another_kind_are_refused(saved, tmp_path, make, fragment):
    shutil.copytree(saved, tmp_path / "m")
    folder = make(tmp_path / "m")
    for weights in ("memory", "lazy"):
        with pytest.raises(UserError, match=re.escape(fragment)):
            load_model(str(folder), weights=weights)
    result = CliRunner().invoke(main, ["inspect", str(folder)])
    assert result.exit_code == 2 and fragment in result.output


def test_the_families_own_parts_pass(saved):
    for family in ("sd15", "sdxl"):
        assert load_model(str(saved / family), weights="lazy").arch.family == family


def test_a_lone_class_conditioned_unet_says_what_it_is(tmp_path):
    from diffusers import UNet2DConditionModel

    unet = load_model("tiny:sd15").pipe.unet
    config = {k: v for k, v in unet.config.items() if k[0] != "_"}
    UNet2DConditionModel(**{**config, "class_embed_type": "timestep"}).save_pretrained(tmp_path)
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: {tmp_path}: this UNet2DConditionModel is class-conditioned (class_embed_type "
        "/ num_class_embeds: unCLIP, upscalers), which slimdiff does not run"
    )
