"""Single-file ControlNets (slimdiff/models/controlnet_file.py): both layouts read into the
ControlNet they were written from, configured after the model's UNet; files that are no
ControlNet, or one for another UNet, refused in one line."""

from __future__ import annotations

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from slimdiff.errors import UserError
from slimdiff.models.controlnet import check_controlnet, controlnet_folder, load_controlnet
from tests.controlnets import save_tiny_controlnet, write_original_controlnet

# A two-level SD1.5-like UNet (and an SDXL-like one with added time conditioning), small
# enough to build in milliseconds.
_SD15 = {
    "sample_size": 8,
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 8,
    "attention_head_dim": 2,
    "norm_num_groups": 4,
}
_SDXL = {
    **_SD15,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 4,
    "projection_class_embeddings_input_dim": 8 + 6 * 4,
    "transformer_layers_per_block": (1, 2),
}


@pytest.fixture(params=["sd15", "sdxl"])
def unet_and_folder(request, tmp_path):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(_SD15 if request.param == "sd15" else _SDXL))
    return unet, save_tiny_controlnet(unet, tmp_path / "cn")


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("prefix", ["control_model.", ""])
def test_an_original_layout_file_reads_as_the_controlnet_it_was_written_from(
    unet_and_folder, tmp_path, prefix
):
    unet, folder = unet_and_folder
    ref = ControlNetModel.from_pretrained(folder)
    path = write_original_controlnet(ref, tmp_path / "control_v11p.safetensors", prefix)
    assert controlnet_folder(str(path)) == path
    got = load_controlnet(str(path), unet)
    assert _same(got, ref)
    assert tuple(got.config.conditioning_embedding_out_channels) == (4, 8, 16, 32)
    assert got.config.addition_embed_type == ref.config.addition_embed_type
    assert not any(p.requires_grad for p in got.parameters())
    check_controlnet(got, unet, 8, str(path))  # fits the UNet it was made for


def test_a_diffusers_layout_file_without_its_config_reads_too(unet_and_folder, tmp_path):
    unet, folder = unet_and_folder
    ref = ControlNetModel.from_pretrained(folder)
    # an fp16 copy, as ComfyUI users download them: read back as float32
    state = {
        k: v.half() for k, v in load_file(folder / "diffusion_pytorch_model.safetensors").items()
    }
    path = tmp_path / "controlnet-fp16.safetensors"
    save_file(state, path)
    got = load_controlnet(str(path), unet)
    assert all(p.dtype == torch.float32 for p in got.parameters())
    for (name, a), b in zip(got.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b.half().float()), name


def test_files_that_are_no_controlnet_or_for_another_unet_are_refused(unet_and_folder, tmp_path):
    unet, folder = unet_and_folder
    ref = ControlNetModel.from_pretrained(folder)
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.lora_down.weight": torch.zeros(2, 2)}, lora)
    with pytest.raises(UserError, match="holds no ControlNet"):
        load_controlnet(str(lora), unet)
    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match=r"not a readable \.safetensors file"):
        load_controlnet(str(garbage), unet)
    pickled = tmp_path / "control_sd15_canny.pth"
    pickled.write_bytes(b"never unpickled")
    with pytest.raises(UserError, match=r"pickled file .* use its \.safetensors version"):
        load_controlnet(str(pickled), unet)
    text = tmp_path / "notes.txt"
    text.write_text("x")
    with pytest.raises(UserError, match=r"a ControlNet file is a \.safetensors file"):
        controlnet_folder(str(text))
    # a ControlNet of a UNet with two ResNets per down block, on one with one: what a
    # block-removed model meets with its uncompressed model's ControlNet
    deeper = UNet2DConditionModel(**{**dict(unet.config), "layers_per_block": 2})
    other = write_original_controlnet(
        ControlNetModel.from_unet(deeper, conditioning_embedding_out_channels=(4, 8, 16, 32)),
        tmp_path / "deeper.safetensors",
    )
    with pytest.raises(UserError, match="does not fit a ControlNet of this model's UNet"):
        load_controlnet(str(other), unet)
    # the other family's (SD1.5's on SDXL or the reverse)
    config = _SD15 if unet.config.addition_embed_type else _SDXL
    foreign = UNet2DConditionModel(**config)
    with pytest.raises(UserError, match="does not fit"):
        load_controlnet(str(write_original_controlnet(ref, tmp_path / "ref.safetensors")), foreign)
