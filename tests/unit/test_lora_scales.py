"""lora.fuse's per-block scales reach every adapted layer of a UNet block (resnets and
samplers too, in blocks with or without attention layers); a LoRA with layers outside the
blocks is refused with them; weights fusing would make inf are refused before any changes.
"""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("peft")
from safetensors.torch import load_file, save_file
from slimdiff.compress.lora.fuse import FuseLoraPass

from slimdiff.errors import UserError
from slimdiff.models import load_model
from tests.lora_weights import assert_unchanged, weights

ADAPTABLE = (torch.nn.Linear, torch.nn.Conv2d)


def _fuse(pipe, file, scale):
    lora = FuseLoraPass(FuseLoraPass.Config(loras=[{"path": str(file), "scale": scale}]))
    lora.preflight(pipe, None)
    return lora.apply(pipe, None)


def _lora(pipe, names: list[str], path, magnitude: float = 0.1) -> dict[str, torch.Tensor]:
    """A PEFT-layout UNet LoRA on `names` (Linear or Conv2d), saved to `path`: {name: B A}."""
    gen = torch.Generator().manual_seed(0)
    state, deltas = {}, {}
    for name in names:
        layer = pipe.unet.get_submodule(name)
        if isinstance(layer, torch.nn.Conv2d):
            a = torch.randn(2, layer.in_channels, *layer.kernel_size, generator=gen)
            b = torch.randn(layer.out_channels, 2, 1, 1, generator=gen)
        else:
            a = torch.randn(2, layer.in_features, generator=gen)
            b = torch.randn(layer.out_features, 2, generator=gen)
        a, b = magnitude * a, magnitude * b
        state[f"unet.{name}.lora_A.weight"], state[f"unet.{name}.lora_B.weight"] = a, b
        deltas[name] = (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:])
    save_file(state, str(path))
    return deltas


def _block_layers(unet, prefix: str) -> list[str]:
    return [n for n, m in unet.named_modules() if n.startswith(prefix) and isinstance(m, ADAPTABLE)]


def test_every_layer_of_a_block_takes_its_scale(tmp_path):
    """tiny:sd15: down_blocks.3 and up_blocks.0 have no attention layers (diffusers would
    leave them at 1); down block 0's resnets and downsampler, the mid block's resnets, and
    one scale per layer of up block 1 (its upsampler takes the last)."""
    pipe = load_model("tiny:sd15").pipe
    unet = pipe.unet
    names = [
        *_block_layers(unet, "down_blocks.0."),
        *_block_layers(unet, "down_blocks.1.resnets.0."),
        *_block_layers(unet, "down_blocks.3."),
        *_block_layers(unet, "mid_block."),
        *_block_layers(unet, "up_blocks.0."),
        *_block_layers(unet, "up_blocks.1."),
    ]
    file = tmp_path / "locon.safetensors"
    deltas = _lora(pipe, names, file)
    scale = {
        "unet": {
            "down": {"block_0": 0.5, "block_3": 0.25},  # block 1 left out: 1
            "mid": 0.0,
            "up": {"block_0": 2.0, "block_1": [0.1, 0.2, 0.3]},
        }
    }

    def expected_scale(name: str) -> float:
        if name.startswith("up_blocks.1."):
            match = re.match(r"up_blocks\.1\.(attentions|resnets)\.(\d)", name)
            return [0.1, 0.2, 0.3][int(match[2]) if match else -1]
        prefixes = {"down_blocks.0.": 0.5, "down_blocks.1.": 1.0, "down_blocks.3.": 0.25}
        prefixes |= {"mid_block.": 0.0, "up_blocks.0.": 2.0}
        return next(s for p, s in prefixes.items() if name.startswith(p))

    before = weights(pipe)
    _fuse(pipe, file, scale)
    after = weights(pipe)
    for name, delta in deltas.items():
        key = f"unet.{name}.weight"
        want = before[key] + expected_scale(name) * delta
        torch.testing.assert_close(after[key], want, rtol=0, atol=1e-6, msg=name)
    assert any("upsamplers" in n for n in deltas) and any("resnets" in n for n in deltas)


def test_sdxl_stage_scales_reach_blocks_without_attention(tmp_path):
    """SDXL's down_blocks.0 and up_blocks.2 have no attention layers: scale 0 for every
    stage leaves the whole UNet as it was; text encoders left out of the dict keep 1."""
    pipe = load_model("tiny:sdxl").pipe
    names = [n for n in _block_layers(pipe.unet, "") if re.search(r"conv1$|attn1\.to_q$", n)]
    file = tmp_path / "sdxl.safetensors"
    _lora(pipe, names, file)
    before = weights(pipe)
    _fuse(pipe, file, {"unet": {"down": 0.0, "mid": 0.0, "up": 0.0}})
    assert_unchanged(pipe, before)
    assert any(n.startswith("down_blocks.0.resnets") for n in names)


def test_layers_outside_the_blocks_are_refused_with_block_scales(tmp_path):
    """conv_in and time_embedding belong to no block: per-block scales are refused for a
    LoRA on them (diffusers raises IndexError), nothing stays loaded; one number fuses all."""
    pipe = load_model("tiny:sd15").pipe
    names = ["conv_in", "time_embedding.linear_1", "down_blocks.0.resnets.0.conv1"]
    file = tmp_path / "timeemb.safetensors"
    deltas = _lora(pipe, names, file)
    before = weights(pipe)
    message = (
        r"timeemb\.safetensors: per-block scales cover the UNet's down, mid and up blocks, "
        r"but this LoRA also adapts conv_in, time_embedding\.linear_1, outside them; give "
        r"unet one number"
    )
    with pytest.raises(UserError, match=message):
        _fuse(pipe, file, {"unet": {"down": 0.5}})
    assert_unchanged(pipe, before)
    _fuse(pipe, file, {"unet": 0.5})
    after = weights(pipe)
    for name, delta in deltas.items():
        key = f"unet.{name}.weight"
        torch.testing.assert_close(after[key], before[key] + 0.5 * delta, rtol=0, atol=1e-6)


def test_block_names_and_list_lengths_are_checked(tmp_path):
    pipe = load_model("tiny:sd15").pipe
    file = tmp_path / "l.safetensors"
    _lora(pipe, ["down_blocks.0.resnets.0.conv1"], file)
    cases = [
        ({"unet": {"down": {"block_4": 1.0}}}, "down block_4; this UNet's down blocks are block_0"),
        ({"unet": {"up": {"block_0": [1.0, 0.5]}}}, r"up block_0 takes one scale or 3 \(one per"),
        ({"unet": {"mid": {"block_0": 1.0}}}, "the UNet's mid block takes one number"),
        ({"transformer": 1.0}, "does not have; its components: text_encoder, unet"),
    ]
    before = weights(pipe)
    for scale, message in cases:
        with pytest.raises(UserError, match=message):
            _fuse(pipe, file, scale)
        assert_unchanged(pipe, before)


def test_weights_fusing_makes_inf_are_refused_before_any_changes(tmp_path):
    """Finite factors whose product overflows float32: refused on the layer it overflows,
    and the layer fused before it in PEFT's order is unchanged too."""
    pipe = load_model("tiny:sd15").pipe
    names = [n for n in _block_layers(pipe.unet, "") if n.endswith("attn1.to_q")][:2]
    file = tmp_path / "huge.safetensors"
    _lora(pipe, names, file)
    state = load_file(str(file))
    last = f"unet.{names[-1]}"
    state[f"{last}.lora_A.weight"].fill_(1e20)
    state[f"{last}.lora_B.weight"].fill_(1e20)
    save_file(state, str(file))
    before = weights(pipe)
    message = rf"fusing \S+huge\.safetensors makes unet\.{re.escape(names[-1])} NaN or inf"
    with pytest.raises(UserError, match=message):
        _fuse(pipe, file, 1.0)
    assert_unchanged(pipe, before)
