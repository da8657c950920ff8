"""lora.fuse reads a LoRA file before diffusers does: kohya's per-layer alphas folded into
the weights (exact for every layer), DoRA in kohya layout, other LyCORIS types, damaged
and non-finite files refused in one line, the model left as it was.

LoRA files are made here from random factors for tiny models' layers, in kohya-ss's layout
(lora_unet_* / lora_te*_ keys, lora_down / lora_up, an alpha per layer) or PEFT's.
"""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("peft")
from safetensors.torch import save_file
from slimdiff.compress.lora.fuse import FuseLoraPass

from slimdiff.errors import UserError
from slimdiff.models import load_model
from tests.lora_weights import assert_unchanged, weights

ATTENTION = re.compile(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
ATTN_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _factors(root, names, ranks, seed, dtype=torch.float32) -> dict:
    """{layer: (A, B)}: random LoRA factors for `names` in `root`, rank ranks[i % len]."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, name in enumerate(names):
        layer, rank = root.get_submodule(name), ranks[i % len(ranks)]
        if isinstance(layer, torch.nn.Conv2d):
            a = torch.randn(rank, layer.in_channels, *layer.kernel_size, generator=gen)
            b = torch.randn(layer.out_channels, rank, 1, 1, generator=gen)
        else:
            a = torch.randn(rank, layer.in_features, generator=gen)
            b = torch.randn(layer.out_features, rank, generator=gen)
        out[name] = ((0.1 * a).to(dtype), (0.1 * b).to(dtype))
    return out


def _delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B A for a Linear's or a Conv2d's factors, in float32."""
    a, b = a.float(), b.float()
    return (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:])


@pytest.fixture(scope="module")
def sd15():
    """tiny:sd15 and its weights, shared by the tests that must leave it unchanged."""
    pipe = load_model("tiny:sd15").pipe
    return pipe, weights(pipe)


def _fuse(pipe, file, scale=1.0):
    lora = FuseLoraPass(FuseLoraPass.Config(loras=[{"path": str(file), "scale": scale}]))
    lora.preflight(pipe, None)
    return lora.apply(pipe, None)


def _kohya_name(prefix: str, layer: str) -> str:
    return f"{prefix}_{layer.replace('.', '_')}"


def test_kohya_alphas_are_exact_per_layer(tmp_path):
    """Attention layers with their own ranks and alphas (as kohya's resize_lora writes
    them), resnet convs, text encoder layers, fp16 and fp32 factors, alphas stored as
    fp16, int or 1-element tensors, a layer without alpha (alpha = rank): each fused layer
    is W + scale * (alpha / r) * B A."""
    pipe = load_model("tiny:sd15").pipe
    unet_names = [n for n, _ in pipe.unet.named_modules() if ATTENTION.search(n)]
    unet_names += ["down_blocks.0.resnets.0.conv1", "mid_block.resnets.1.conv2"]
    # all four projections, as kohya writes them: diffusers' text encoder renaming needs
    # out_proj to read q/k/v_proj (a file without it is refused, not fused in part)
    attention = [f"encoder.layers.0.self_attn.{p}_proj" for p in ("q", "k", "v", "out")]
    text_names = [*attention, "encoder.layers.1.mlp.fc1"]
    factors = {
        "unet": _factors(pipe.unet, unet_names, [8, 4, 2, 4, 1], seed=1),
        "text_encoder": _factors(pipe.text_encoder, text_names, [2, 3], seed=2, dtype=torch.half),
    }
    alphas = [
        lambda r: torch.tensor(r / 2),
        lambda r: torch.tensor(1.0, dtype=torch.half),
        lambda r: torch.tensor(8, dtype=torch.int64),
        lambda r: None,
        lambda r: torch.tensor([0.5]),
    ]
    state, expected = {}, {}
    for component, prefix in (("unet", "lora_unet"), ("text_encoder", "lora_te")):
        for i, (layer, (a, b)) in enumerate(factors[component].items()):
            # kohya names CLIP's modules from text_model
            key = _kohya_name(prefix, layer if component == "unet" else f"text_model.{layer}")
            state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = a, b
            alpha = alphas[i % len(alphas)](a.shape[0])
            if alpha is not None:
                state[f"{key}.alpha"] = alpha
            ratio = (float(alpha.reshape(-1)[0]) if alpha is not None else a.shape[0]) / a.shape[0]
            expected[f"{component}.{layer}.weight"] = ratio * _delta(a, b)
    file = tmp_path / "resized.safetensors"
    save_file(state, str(file))
    before = weights(pipe)
    report = _fuse(pipe, file, 0.7)
    assert report.summary["layers_fused"] == {"unet": len(unet_names), "text_encoder": 5}
    after = weights(pipe)
    for key, delta in expected.items():
        torch.testing.assert_close(after[key], before[key] + 0.7 * delta, rtol=0, atol=1e-6)
    changed = {key for key in before if not torch.equal(after[key], before[key])}
    assert changed == set(expected)


def _sgm(name: str, layers_per_block: int) -> str:
    """kohya's SDXL key for a diffusers UNet attention module: the SGM block numbering."""
    block, index, rest = re.match(r"(\w+)_blocks\.(\d+)\.attentions\.(\d+\..*)", name).groups()
    j, rest = rest.split(".", 1)
    if block == "down":
        return f"input_blocks.{1 + (layers_per_block + 1) * int(index) + int(j)}.1.{rest}"
    return f"output_blocks.{(layers_per_block + 1) * int(index) + int(j)}.1.{rest}"


def test_kohya_sdxl_alphas_are_exact_per_layer(tmp_path):
    """SDXL kohya files name UNet blocks the SGM way (input_blocks_4_1_...), which diffusers
    maps by the UNet's layout: each attention layer with its own rank and alpha is exact,
    and so is the second text encoder (lora_te2_)."""
    pipe = load_model("tiny:sdxl").pipe
    names = [n for n, _ in pipe.unet.named_modules() if ATTENTION.search(n) and "mid" not in n]
    unet = _factors(pipe.unet, names, [4, 2, 8], seed=3, dtype=torch.half)
    attention = [f"text_model.encoder.layers.0.self_attn.{p}_proj" for p in ("q", "k", "v", "out")]
    text = _factors(pipe.text_encoder_2, attention, [2, 1], seed=4)
    lpb = pipe.unet.config.layers_per_block
    state, expected = {}, {}
    for i, (layer, (a, b)) in enumerate([*unet.items(), *text.items()]):
        is_unet = i < len(unet)
        key = (
            _kohya_name("lora_unet", _sgm(layer, lpb))
            if is_unet
            else _kohya_name("lora_te2", layer)
        )
        alpha = [1.0, 4.0, 3.0][i % 3]
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = a, b
        state[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.half)
        component = "unet" if is_unet else "text_encoder_2"
        expected[f"{component}.{layer}.weight"] = alpha / a.shape[0] * _delta(a, b)
    file = tmp_path / "sdxl_kohya.safetensors"
    save_file(state, str(file))
    before = weights(pipe)
    _fuse(pipe, file, -0.5)
    after = weights(pipe)
    for key, delta in expected.items():
        torch.testing.assert_close(after[key], before[key] - 0.5 * delta, rtol=0, atol=1e-6)
    assert {key for key in before if not torch.equal(after[key], before[key])} == set(expected)


def _kohya_file(pipe, seed: int = 5) -> dict[str, torch.Tensor]:
    """A small well-formed kohya SD1.5 LoRA: 4 attention layers, alpha 2."""
    names = [n for n, _ in pipe.unet.named_modules() if ATTENTION.search(n)][:4]
    state = {}
    for layer, (a, b) in _factors(pipe.unet, names, [4], seed).items():
        key = _kohya_name("lora_unet", layer)
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = a, b
        state[f"{key}.alpha"] = torch.tensor(2.0)
    return state


Q = _kohya_name("lora_unet", ATTN_Q)
DAMAGED = {
    "nan alpha": (
        lambda s: {**s, f"{Q}.alpha": torch.tensor(float("nan"))},
        f"{Q}.alpha holds NaN",
    ),
    "inf alpha": (
        lambda s: {**s, f"{Q}.alpha": torch.tensor(float("inf"))},
        f"{Q}.alpha holds inf",
    ),
    "two alphas": (lambda s: {**s, f"{Q}.alpha": torch.ones(2)}, f"{Q}.alpha holds 2 numbers"),
    "no lora_up": (
        lambda s: {k: v for k, v in s.items() if k != f"{Q}.lora_up.weight"},
        f"{Q} has lora_down but no lora_up",
    ),
    "ranks differ": (
        lambda s: {**s, f"{Q}.lora_up.weight": s[f"{Q}.lora_up.weight"][:, :2].contiguous()},
        f"{Q}'s lora_down has rank 4, its lora_up 2",
    ),
    "nan weight": (
        lambda s: {
            **s,
            f"{Q}.lora_up.weight": torch.full_like(s[f"{Q}.lora_up.weight"], torch.nan),
        },
        f"{Q}.lora_up.weight holds NaN",
    ),
    "inf weight": (
        lambda s: {
            **s,
            f"{Q}.lora_down.weight": torch.full_like(s[f"{Q}.lora_down.weight"], torch.inf),
        },
        f"{Q}.lora_down.weight holds inf",
    ),
}


def test_damaged_files_are_refused_and_the_model_is_unchanged(tmp_path, sd15):
    pipe, before = sd15
    good = _kohya_file(pipe)
    for case, (damage, message) in DAMAGED.items():
        file = tmp_path / f"{case.replace(' ', '_')}.safetensors"
        save_file(damage(good), str(file))
        with pytest.raises(UserError, match=rf"is damaged: {re.escape(message)}.*export it again"):
            _fuse(pipe, file)
        assert_unchanged(pipe, before)
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty), metadata={"ss_network_module": "networks.lora"})
    with pytest.raises(UserError, match=r"empty\.safetensors holds no tensors"):
        _fuse(pipe, empty)


def _lycoris(kind: str, pipe) -> dict[str, torch.Tensor]:
    """Keys of a LyCORIS `kind` layer (as LyCORIS saves them) next to a plain LoRA."""
    ff = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
    key, layer = _kohya_name("lora_unet", ff), pipe.unet.get_submodule(ff)
    out, size = layer.out_features, layer.in_features
    extra = {
        "LoHa": {f"{key}.hada_w1_a": torch.ones(out, 2), f"{key}.hada_w1_b": torch.ones(2, size)},
        "LoKr": {f"{key}.lokr_w1": torch.ones(2, 2), f"{key}.lokr_w2": torch.ones(out, size)},
        "(IA)^3": {f"{key}.weight": torch.ones(out), f"{key}.on_input": torch.tensor(False)},
        "full (diff)": {f"{key}.diff": torch.ones(out, size), f"{key}.diff_b": torch.ones(out)},
        "OFT/BOFT": {f"{key}.oft_blocks": torch.ones(4, 8, 8)},
        "GLoRA": {f"{key}.a1.weight": torch.ones(2, size), f"{key}.b1.weight": torch.ones(2, size)},
        "Tucker": {
            f"{key}.lora_down.weight": torch.ones(2, size, 1, 1),
            f"{key}.lora_mid.weight": torch.ones(2, 2, 3, 3),
            f"{key}.lora_up.weight": torch.ones(out, 2, 1, 1),
        },
        "norm": {f"{key}.w_norm": torch.ones(out), f"{key}.b_norm": torch.ones(out)},
        "bias": {f"{Q}.lora_up.bias": torch.ones(out)},
    }[kind]
    return {**_kohya_file(pipe), **extra}


@pytest.mark.parametrize(
    ("kind", "named"),
    [
        ("LoHa", r"LyCORIS LoHa layers \(hada_\* keys\)"),
        ("LoKr", r"LyCORIS LoKr layers \(lokr_\* keys\)"),
        ("(IA)^3", r"LyCORIS \(IA\)\^3 layers \(\.on_input keys\)"),
        ("full (diff)", r"LyCORIS full \(diff\) layers \(\.diff keys\)"),
        ("OFT/BOFT", r"LyCORIS OFT/BOFT layers \(oft_\* keys\)"),
        ("GLoRA", r"LyCORIS GLoRA layers"),
        ("Tucker", r"LyCORIS Tucker layers \(lora_mid keys\)"),
        ("norm", r"LyCORIS norm layers \(\.w_norm/\.b_norm keys\)"),
        ("bias", r"LoRA bias layers \(lora_up\.bias"),
    ],
)
def test_lycoris_types_are_named(kind, named, tmp_path, sd15):
    pipe, before = sd15
    file = tmp_path / "lycoris.safetensors"
    save_file(_lycoris(kind, pipe), str(file))
    with pytest.raises(
        UserError, match=rf"holds {named}.*, which diffusers. LoRA loaders do not read"
    ):
        _fuse(pipe, file)
    assert_unchanged(pipe, before)


def test_dora_in_kohya_layout_is_refused_and_peft_dora_is_fused(tmp_path):
    """kohya/LyCORIS DoRA (dora_scale keys) would lose its magnitudes in diffusers: refused.
    PEFT's layout (lora_magnitude_vector) is fused as a DoRA: W' = m / |W + s B A| (W + s B A),
    the norm per output row."""
    pipe = load_model("tiny:sd15").pipe
    before = weights(pipe)
    state = _kohya_file(pipe)
    state[f"{Q}.dora_scale"] = torch.ones(1, pipe.unet.get_submodule(ATTN_Q).in_features)
    kohya = tmp_path / "dora_kohya.safetensors"
    save_file(state, str(kohya))
    with pytest.raises(UserError, match=r"is a DoRA in kohya/LyCORIS layout \(dora_scale keys\)"):
        _fuse(pipe, kohya)
    assert_unchanged(pipe, before)

    names = [ATTN_Q, ATTN_Q.replace("to_q", "to_k")]
    factors = _factors(pipe.unet, names, [4], seed=6)
    magnitudes = {n: torch.rand(pipe.unet.get_submodule(n).out_features) + 0.5 for n in names}
    peft = {}
    for name, (a, b) in factors.items():
        peft[f"unet.{name}.lora_A.weight"], peft[f"unet.{name}.lora_B.weight"] = a, b
        peft[f"unet.{name}.lora_magnitude_vector"] = magnitudes[name]
    file = tmp_path / "dora_peft.safetensors"
    save_file(peft, str(file))
    _fuse(pipe, file, 0.5)
    for name, (a, b) in factors.items():
        merged = before[f"unet.{name}.weight"] + 0.5 * _delta(a, b)
        expected = (magnitudes[name] / merged.norm(dim=1))[:, None] * merged
        fused = pipe.unet.get_submodule(name).weight.detach()
        torch.testing.assert_close(fused, expected, rtol=0, atol=1e-6)
