"""lora.fuse accounts for every layer of a LoRA file: a file whose layers only partly match
the model is refused on each family's loader path (diffusers would fuse the part that
matches and drop the rest), and what diffusers' loaders raise or log becomes one line.
"""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("peft")
from click.testing import CliRunner
from safetensors.torch import save_file
from slimdiff.compress.lora.fuse import FuseLoraPass, lora_components

from slimdiff.cli import main
from slimdiff.errors import UserError
from slimdiff.models import load_model
from tests.lora_weights import assert_unchanged, weights


def _fuse(pipe, file, scale=1.0):
    lora = FuseLoraPass(FuseLoraPass.Config(loras=[{"path": str(file), "scale": scale}]))
    lora.preflight(pipe, None)
    return lora.apply(pipe, None)


def _factors(layer: torch.nn.Linear, rank: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, layer.in_features, generator=gen) * 0.1
    return a, torch.randn(layer.out_features, rank, generator=gen) * 0.1


def _peft(pipe, component: str, names: list[str], extra: dict | None = None) -> dict:
    """PEFT-layout LoRA keys for `names` of `component`, plus `extra` {name: (in, out)}
    layers the model may lack."""
    state = {}
    module = getattr(pipe, component)
    for i, name in enumerate(names):
        a, b = _factors(module.get_submodule(name), seed=i)
        state[f"{component}.{name}.lora_A.weight"], state[f"{component}.{name}.lora_B.weight"] = (
            a,
            b,
        )
    for name, (size_in, size_out) in (extra or {}).items():
        state[f"{component}.{name}.lora_A.weight"] = torch.zeros(2, size_in)
        state[f"{component}.{name}.lora_B.weight"] = torch.zeros(size_out, 2)
    return state


def _kohya(pipe, names: list[str], extra: list[str], size: int) -> dict:
    """kohya-layout keys for UNet layers `names`, and for `extra` layers (size x size)."""
    state = {}
    for i, name in enumerate(names + extra):
        key = "lora_unet_" + name.replace(".", "_")
        if name in names:
            a, b = _factors(pipe.unet.get_submodule(name), seed=i)
        else:
            a, b = torch.zeros(2, size), torch.zeros(size, 2)
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = a, b
        state[f"{key}.alpha"] = torch.tensor(1.0)
    return state


def _attn1(pipe) -> list[str]:
    return [
        n for n, _ in pipe.unet.named_modules() if re.search(r"attn1\.(to_[qkv]|to_out\.0)$", n)
    ]


def _sd15_on_sdxl(tmp_path):
    """SD1.5's self-attention LoRA on SDXL: the channel counts agree where both models have
    the layer, and SDXL lacks half of them."""
    sd15 = load_model("tiny:sd15").pipe
    return "sdxl", _peft(sd15, "unet", _attn1(sd15)), 32, 64


def _kohya_extra_on_sd15(tmp_path):
    """kohya SD1.5 LoRA naming two blocks the model does not have."""
    pipe = load_model("tiny:sd15").pipe
    extra = [
        "down_blocks.3.attentions.0.transformer_blocks.0.attn1.to_q",
        "mid_block.attentions.0.transformer_blocks.1.attn1.to_q",
    ]
    return "sd15", _kohya(pipe, _attn1(pipe), extra, 64), 64, 66


def _flux_on_sd3(tmp_path):
    """SD3's transformer has no single-stream blocks: a FLUX LoRA's match only in part."""
    flux = load_model("tiny:flux").pipe
    names = [n for n, _ in flux.transformer.named_modules() if n.endswith(("to_q", "to_k"))]
    return "sd3", _peft(flux, "transformer", names), 4, 12


def _kohya_flux_beyond_the_blocks(tmp_path):
    """A FLUX kohya LoRA for a transformer deeper than this one (double block 9)."""
    pipe = load_model("tiny:flux").pipe
    layer = pipe.transformer.get_submodule("transformer_blocks.0.attn.to_out.0")
    state = {}
    for block in (0, 9):
        key = f"lora_unet_double_blocks_{block}_img_attn_proj"
        a, b = _factors(layer, seed=block)
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = a, b
    return "flux", state, 1, 2


@pytest.mark.parametrize(
    "case", [_sd15_on_sdxl, _kohya_extra_on_sd15, _flux_on_sd3, _kohya_flux_beyond_the_blocks]
)
def test_a_lora_that_matches_in_part_is_refused(case, tmp_path):
    family, state, matched, total = case(tmp_path)
    file = tmp_path / "partial.safetensors"
    save_file(state, str(file))
    pipe = load_model(f"tiny:{family}").pipe
    before = weights(pipe)
    message = (
        rf"only {matched} of the {total} layers of \S+partial\.safetensors match this "
        r"\w+Pipeline \(not in it: (unet|transformer)\.[^)]+\); is it a LoRA for another "
        r"model, or for this one before compression"
    )
    with pytest.raises(UserError, match=message):
        _fuse(pipe, file)
    assert_unchanged(pipe, before)


def test_a_partial_lora_is_one_line_from_export(tmp_path, capfd):
    """`export --lora` of an SD1.5 LoRA into SDXL: exit 2, one line, no diffusers logs."""
    sd15 = load_model("tiny:sd15").pipe
    file = tmp_path / "sd15.safetensors"
    save_file(_peft(sd15, "unet", _attn1(sd15)), str(file))
    capfd.readouterr()
    out = tmp_path / "bundle"
    result = CliRunner().invoke(
        main, ["export", "tiny:sdxl", "--out", str(out), "--lora", str(file)]
    )
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "only 32 of the 64 layers" in lines[0], result.output
    assert capfd.readouterr().err.strip() == ""
    assert not out.exists()


def test_a_size_mismatch_is_one_line_naming_the_layer_and_shapes(tmp_path, capfd):
    """diffusers logs the whole state-dict error (one line per mismatched tensor) before it
    raises: silenced, and the line says which layer and which shapes."""
    pipe = load_model("tiny:sd15").pipe
    names = [n for n, _ in pipe.unet.named_modules() if n.endswith("attn2.to_k")]
    state = _peft(pipe, "unet", names)
    width = pipe.unet.get_submodule(names[0]).in_features
    for name in names:
        state[f"unet.{name}.lora_A.weight"] = torch.zeros(2, 2 * width)
    file = tmp_path / "wide.safetensors"
    save_file(state, str(file))
    before = weights(pipe)
    capfd.readouterr()
    message = (
        rf"does not load into this StableDiffusionPipeline \({re.escape(names[0])}: the file's "
        rf"lora_A is 2x{2 * width}, the model's 2x{width}; {len(names) - 1} more size mismatches\)"
    )
    with pytest.raises(UserError, match=message):
        _fuse(pipe, file)
    captured = capfd.readouterr()
    assert "size mismatch" not in captured.err + captured.out
    assert_unchanged(pipe, before)


def test_library_exceptions_from_the_converters_are_one_line(tmp_path):
    """diffusers' FLUX kohya converter asserts FLUX.1's sizes (single blocks' linear1), and
    refuses keys of another family with a list: one line each, nothing loaded; fetching
    the components for such a file does not fail either (the fuse says what is wrong)."""
    pipe = load_model("tiny:flux").pipe
    inner = pipe.transformer.get_submodule("single_transformer_blocks.0.attn.to_q").in_features
    key = "lora_unet_single_blocks_0_linear1"
    linear1 = {f"{key}.lora_down.weight": torch.zeros(4, inner)}
    linear1[f"{key}.lora_up.weight"] = torch.zeros(7 * inner, 4)  # q, k, v and a 4x MLP
    sd15 = load_model("tiny:sd15").pipe
    sd15_kohya = _kohya(sd15, _attn1(sd15)[:1], [], 0)
    cases = [
        (
            linear1,
            r"diffusers cannot read \S+ for this FluxPipeline \(AssertionError in "
            r"_convert_to_ai_toolkit_cat \(lora_conversion_utils\.py\)\); is it a LoRA for this "
            r"model family\?",
        ),
        (
            sd15_kohya,
            r"diffusers cannot read \S+ for this FluxPipeline \(Incompatible keys "
            r"detected: lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        ),
    ]
    before = weights(pipe)
    everything = [n for n, m in pipe.components.items() if hasattr(m, "parameters") and n != "vae"]
    for state, message in cases:
        file = tmp_path / "flux_kohya.safetensors"
        save_file(state, str(file))
        assert lora_components(pipe, [str(file)]) == everything
        with pytest.raises(UserError, match=message):
            _fuse(pipe, file)
        assert_unchanged(pipe, before)


def test_sdxl_kohya_file_mixing_block_names_is_refused(tmp_path):
    """diffusers' SDXL loader drops a kohya file's SGM-named layers (input_blocks_*) when
    others use diffusers' names (down_blocks_*), without a word."""
    pipe = load_model("tiny:sdxl").pipe
    layer = pipe.unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    state = {}
    for i, key in enumerate(
        [
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k",
        ]
    ):
        a, b = _factors(layer, seed=i)
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = a, b
    file = tmp_path / "mixed.safetensors"
    save_file(state, str(file))
    before = weights(pipe)
    with pytest.raises(
        UserError, match=r"StableDiffusionXLPipeline loader keeps 1 of the 2 layers"
    ):
        _fuse(pipe, file)
    assert_unchanged(pipe, before)
