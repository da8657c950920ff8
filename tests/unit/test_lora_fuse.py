"""`lora.fuse`: LoRA files merged into the weights, as diffusers + PEFT fuse them.

The LoRA files are made here: PEFT adapters with random weights on tiny:sdxl's UNet and
first text encoder, saved by diffusers' save_lora_weights (the layout diffusers and most
trainers write). alpha = r, so each fused layer must equal W + scale * B @ A exactly.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
import diffusers
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from slimdiff.compress.base import build_passes
from slimdiff.compress.lora.fuse import FuseLoraPass

from slimdiff.app.flow import compress_hash
from slimdiff.errors import UserError
from slimdiff.models import load_model
from slimdiff.recipe import Recipe

UNET_LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
TEXT_LAYER = "encoder.layers.0.self_attn.k_proj"


def _write_lora(path, seed: int, rank: int = 4, text: bool = True) -> None:
    """A random LoRA for tiny:sdxl (alpha = rank: diffusers' file has no alphas then)."""
    torch.manual_seed(seed)
    pipe = load_model("tiny:sdxl").pipe
    unet = LoraConfig(
        r=rank,
        lora_alpha=rank,
        init_lora_weights=False,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
    )
    inject_adapter_in_model(unet, pipe.unet)
    layers = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet)}
    if text:
        te = LoraConfig(
            r=2,
            lora_alpha=2,
            init_lora_weights=False,
            target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
        )
        inject_adapter_in_model(te, pipe.text_encoder)
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(pipe.text_encoder)
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        str(path.parent), weight_name=path.name, **layers
    )


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    _write_lora(root / "style.safetensors", seed=1)
    _write_lora(root / "fast.safetensors", seed=2, rank=2, text=False)
    return root


def _delta(file, prefix: str, layer: str) -> torch.Tensor:
    sd = load_file(str(file))
    key = f"{prefix}.{layer}"
    return sd[f"{key}.lora_B.weight"] @ sd[f"{key}.lora_A.weight"]


def _pass(*loras) -> FuseLoraPass:
    return FuseLoraPass(FuseLoraPass.Config(loras=[{"path": str(p), "scale": s} for p, s in loras]))


def test_fused_weights_are_w_plus_scaled_delta(loras):
    pipe = load_model("tiny:sdxl").pipe
    unet_w = pipe.unet.get_submodule(UNET_LAYER).weight.detach().clone()
    text_w = pipe.text_encoder.get_submodule(TEXT_LAYER).weight.detach().clone()
    style, fast = loras / "style.safetensors", loras / "fast.safetensors"
    report = _pass((style, 0.5), (fast, -1.25)).apply(pipe, None)
    expected = (
        unet_w + 0.5 * _delta(style, "unet", UNET_LAYER) - 1.25 * _delta(fast, "unet", UNET_LAYER)
    )
    fused = pipe.unet.get_submodule(UNET_LAYER)
    assert type(fused) is torch.nn.Linear  # the adapter layers are gone
    torch.testing.assert_close(fused.weight.detach(), expected, rtol=0, atol=1e-6)
    text = pipe.text_encoder.get_submodule(TEXT_LAYER).weight.detach()
    expected_text = text_w + 0.5 * _delta(style, "text_encoder", TEXT_LAYER)
    torch.testing.assert_close(text, expected_text, rtol=0, atol=1e-6)
    # 4 attention projections per attention block of the UNet; 4 per CLIP layer
    n_attn = sum(
        name.endswith("attn1") or name.endswith("attn2") for name, _ in pipe.unet.named_modules()
    )
    assert report.summary["layers_fused"]["unet"] == 4 * n_attn
    layers = pipe.text_encoder.config.num_hidden_layers
    assert report.summary["layers_fused"]["text_encoder"] == 4 * layers
    assert "text_encoder_2" not in report.summary["layers_fused"]
    assert report.summary["loras"] == [
        {"path": str(style), "scale": 0.5},
        {"path": str(fast), "scale": -1.25},
    ]
    assert not any("lora" in name for name, _ in pipe.unet.named_parameters())


def test_bad_files_are_refused_naming_the_fix(loras, tmp_path):
    pipe = load_model("tiny:sdxl").pipe
    before = pipe.unet.get_submodule(UNET_LAYER).weight.detach().clone()
    with pytest.raises(UserError, match=r"is not a file \(paths are relative"):
        _pass((tmp_path / "missing.safetensors", 1.0)).apply(pipe, None)
    pickled = tmp_path / "lora.bin"
    pickled.write_bytes(b"\x80\x04")
    with pytest.raises(UserError, match="pickled LoRA files"):
        _pass((pickled, 1.0)).apply(pipe, None)
    other = tmp_path / "other.safetensors"  # a whole LoRA layer, but none of this model
    layer = {"lora_unet_foo.lora_down.weight": torch.zeros(2, 3)}
    save_file({**layer, "lora_unet_foo.lora_up.weight": torch.zeros(3, 2)}, str(other))
    with pytest.raises(UserError, match=r"no layer of .* matches .* is it a LoRA for this model"):
        _pass((other, 1.0)).apply(pipe, None)
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_foo.hada_w1_a": torch.zeros(2, 3)}, str(loha))
    with pytest.raises(UserError, match=r"holds LyCORIS LoHa layers \(hada_\* keys\)"):
        _pass((loha, 1.0)).apply(pipe, None)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        _pass((damaged, 1.0)).apply(pipe, None)
    sd3 = load_model("tiny:sd3").pipe
    with pytest.raises(UserError, match="is it a LoRA for this model family"):
        _pass((loras / "style.safetensors", 1.0)).apply(sd3, None)
    # nothing was left half-applied
    torch.testing.assert_close(pipe.unet.get_submodule(UNET_LAYER).weight, before)
    assert type(pipe.unet.get_submodule(UNET_LAYER)) is torch.nn.Linear


def test_recipe_validation():
    recipe = {"version": 1, "model": "tiny:sdxl"}
    with pytest.raises(UserError, match="loras"):
        Recipe.model_validate({**recipe, "passes": [{"pass": "lora.fuse", "loras": []}]})
    bad_scale = {"pass": "lora.fuse", "loras": [{"path": "a.safetensors", "scale": 20}]}
    with pytest.raises(UserError, match="scale"):
        Recipe.model_validate({**recipe, "passes": [bad_scale]})
    ok = {"pass": "lora.fuse", "loras": [{"path": "a.safetensors"}]}
    parsed = Recipe.model_validate(
        {**recipe, "passes": [ok, {"pass": "blocks.remove", "preset": "ssd-1b"}]}
    )
    assert [p.name for p in build_passes(parsed)] == ["lora.fuse", "blocks.remove"]
    assert parsed.passes[0].config.loras[0].scale == 1.0


def test_cache_key_follows_the_file_contents(loras, tmp_path):
    lora = tmp_path / "l.safetensors"
    lora.write_bytes((loras / "style.safetensors").read_bytes())
    recipe = Recipe.model_validate(
        {
            "version": 1,
            "model": "tiny:sdxl",
            "passes": [{"pass": "lora.fuse", "loras": [{"path": str(lora)}]}],
        }
    )
    first = compress_hash(recipe, {"m": 1})
    assert compress_hash(recipe, {"m": 1}) == first
    lora.write_bytes((loras / "fast.safetensors").read_bytes())  # same path, new contents
    assert compress_hash(recipe, {"m": 1}) != first
    lora.unlink()
    with pytest.raises(UserError, match=r"lora\.fuse: cannot read"):
        compress_hash(recipe, {"m": 1})
    plain = Recipe.model_validate({"version": 1, "model": "tiny:sdxl"})
    assert compress_hash(plain, {"m": 1}) == compress_hash(plain, {"m": 1})


def test_compress_writes_the_fused_weights(loras, tmp_path):
    """The runner applies lora.fuse before the passes after it; the artifact reloads with
    the LoRA in its weights, and its report names the files."""
    import json

    from slimdiff.compress.runner import compress_model

    from slimdiff.recipe import load_recipe

    style = loras / "style.safetensors"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "version: 1\nmodel: tiny:sdxl\npasses:\n"
        f"  - pass: lora.fuse\n    loras:\n      - path: {style}\n        scale: 0.75\n"
    )
    out = tmp_path / "artifact"
    compressed = compress_model(load_model("tiny:sdxl"), load_recipe(str(recipe)), out)
    base = load_model("tiny:sdxl").pipe.unet.get_submodule(UNET_LAYER).weight.detach()
    expected = base + 0.75 * _delta(style, "unet", UNET_LAYER)
    fused = compressed.pipe.unet.get_submodule(UNET_LAYER).weight.detach()
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-6)
    report = json.loads((out / "report.json").read_text())
    entry = next(r for r in report["passes"] if r["name"] == "lora.fuse")
    assert entry["summary"]["loras"] == [{"path": str(style), "scale": 0.75}]


def test_bench_reference_gets_the_lora_but_not_compression(loras):
    """bench's reference is the model the recipe starts from: LoRA fused, not compressed."""
    from slimdiff.app.bench import _reference_passes

    style = loras / "style.safetensors"
    recipe = Recipe.model_validate(
        {
            "version": 1,
            "model": "tiny:sdxl",
            "passes": [
                {"pass": "lora.fuse", "loras": [{"path": str(style)}]},
                {"pass": "blocks.remove", "preset": "ssd-1b"},
            ],
        }
    )
    pipe = load_model("tiny:sdxl").pipe
    blocks = sum(1 for _ in pipe.unet.modules())
    before = pipe.unet.get_submodule(UNET_LAYER).weight.detach().clone()
    assert _reference_passes(recipe, pipe) == ["lora.fuse"]
    after = pipe.unet.get_submodule(UNET_LAYER).weight.detach()
    torch.testing.assert_close(after, before + _delta(style, "unet", UNET_LAYER), rtol=0, atol=1e-6)
    assert sum(1 for _ in pipe.unet.modules()) == blocks  # no block was removed


def test_kohya_layout_with_alpha(loras, tmp_path):
    """kohya-ss's layout (lora_unet_*/lora_te1_* keys, lora_down/lora_up, an alpha per
    layer), which most community SDXL LoRAs use: diffusers converts it; alpha / r scales."""
    sd = load_file(str(loras / "style.safetensors"))
    kohya = {}
    for key, value in sd.items():
        module, _, kind = key.rpartition(".lora_")
        component, _, path = module.partition(".")
        prefix = {"unet": "lora_unet", "text_encoder": "lora_te1"}[component]
        if component == "text_encoder":
            path = f"text_model.{path}"  # kohya names CLIP's modules from text_model
        name = f"{prefix}_{path.replace('.', '_')}"
        kohya[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value
        if kind.startswith("A"):
            kohya[f"{name}.alpha"] = torch.tensor(float(2 * value.shape[0]))  # alpha = 2 r
    file = tmp_path / "kohya.safetensors"
    save_file(kohya, str(file))
    pipe = load_model("tiny:sdxl").pipe
    from slimdiff.compress.lora.fuse import lora_components

    assert lora_components(pipe, [str(file)]) == ["text_encoder", "unet"]  # keys converted
    before = pipe.unet.get_submodule(UNET_LAYER).weight.detach().clone()
    text_before = pipe.text_encoder.get_submodule(TEXT_LAYER).weight.detach().clone()
    report = _pass((file, 0.5)).apply(pipe, None)
    delta = _delta(loras / "style.safetensors", "unet", UNET_LAYER)
    after = pipe.unet.get_submodule(UNET_LAYER).weight.detach()
    torch.testing.assert_close(after, before + 0.5 * 2 * delta, rtol=0, atol=1e-6)
    text_delta = _delta(loras / "style.safetensors", "text_encoder", TEXT_LAYER)
    text_after = pipe.text_encoder.get_submodule(TEXT_LAYER).weight.detach()
    torch.testing.assert_close(text_after, text_before + text_delta, rtol=0, atol=1e-6)
    assert set(report.summary["layers_fused"]) == {"unet", "text_encoder"}


def test_a_missing_lora_stops_compress_before_the_model_loads(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from slimdiff.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "version: 1\nmodel: tiny:sdxl\npasses:\n"
        "  - pass: lora.fuse\n    loras:\n      - {path: nowhere/l.safetensors}\n"
    )

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("slimdiff.models.load_model", no_load)
    done = CliRunner().invoke(main, ["compress", str(recipe), "--out", str(tmp_path / "o")])
    assert done.exit_code == 2
    assert "lora.fuse: nowhere/l.safetensors is not a file" in done.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("family", ["sd15", "sdxl-refiner", "sd3", "flux"])
def test_other_families(family, tmp_path, capfd):
    """SD1.5's and the SDXL refiner's UNets, SD3's and FLUX's transformers: each family's
    diffusers LoRA loader."""
    torch.manual_seed(0)
    pipe = load_model(f"tiny:{family}").pipe
    name = "unet" if family in ("sd15", "sdxl-refiner") else "transformer"
    config = LoraConfig(
        r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v"]
    )
    inject_adapter_in_model(config, getattr(pipe, name))
    layers = get_peft_model_state_dict(getattr(pipe, name))
    type(pipe).save_lora_weights(str(tmp_path), **{f"{name}_lora_layers": layers})
    file = tmp_path / "pytorch_lora_weights.safetensors"
    fresh = load_model(f"tiny:{family}").pipe
    denoiser = getattr(fresh, name)
    layer = next(n for n, _ in denoiser.named_modules() if n.endswith("to_q"))
    before = denoiser.get_submodule(layer).weight.detach().clone()
    capfd.readouterr()
    report = _pass((file, 0.5)).apply(fresh, None)
    assert "No LoRA keys" not in capfd.readouterr().err  # diffusers' per-component notice
    expected = before + 0.5 * _delta(file, name, layer)
    torch.testing.assert_close(denoiser.get_submodule(layer).weight.detach(), expected)
    attention = sum(n.endswith("to_q") for n, _ in denoiser.named_modules())
    assert report.summary["layers_fused"] == {name: 3 * attention}


UP_LAYER = "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def test_scales_per_component_and_per_unet_block(loras):
    """diffusers' set_adapters weights: per component, and per UNet stage and block."""
    style = loras / "style.safetensors"
    pipe = load_model("tiny:sdxl").pipe
    before = {
        name: module.get_submodule(layer).weight.detach().clone()
        for name, module, layer in (
            ("down", pipe.unet, UNET_LAYER),
            ("up", pipe.unet, UP_LAYER),
            ("text", pipe.text_encoder, TEXT_LAYER),
        )
    }
    scale = {"text_encoder": 0.0, "unet": {"down": 0.0, "mid": 1.0, "up": 0.75}}
    report = _pass((style, scale)).apply(pipe, None)
    after = {
        "down": pipe.unet.get_submodule(UNET_LAYER).weight.detach(),
        "up": pipe.unet.get_submodule(UP_LAYER).weight.detach(),
        "text": pipe.text_encoder.get_submodule(TEXT_LAYER).weight.detach(),
    }
    torch.testing.assert_close(after["down"], before["down"], rtol=0, atol=1e-6)
    torch.testing.assert_close(after["text"], before["text"], rtol=0, atol=1e-6)
    expected_up = before["up"] + 0.75 * _delta(style, "unet", UP_LAYER)
    torch.testing.assert_close(after["up"], expected_up, rtol=0, atol=1e-6)
    assert report.summary["loras"][0]["scale"] == scale  # as given, not diffusers' expansion


def test_bad_scales_are_refused(loras):
    style = str(loras / "style.safetensors")
    with pytest.raises(Exception, match="sideways"):
        FuseLoraPass.Config(loras=[{"path": style, "scale": {"unet": {"sideways": 1.0}}}])
    with pytest.raises(Exception, match="9"):
        FuseLoraPass.Config(loras=[{"path": style, "scale": {"unet": 9.0}}])
    cases = [
        ({"transformer": 0.5}, "does not have; its components: .*unet"),
        ({"text_encoder": {"down": 1.0}}, "per-block scales .* apply to a UNet"),
        ({"unet": {"up": {"block_7": 1.0}}}, "up block_7; this UNet.s up blocks are block_0, "),
    ]
    for scale, message in cases:
        pipe = load_model("tiny:sdxl").pipe
        p = _pass((style, scale))
        with pytest.raises(UserError, match=message):
            p.preflight(pipe, None)
            p.apply(pipe, None)
        assert not any("lora" in name for name, _ in pipe.unet.named_parameters())


def test_a_scale_list_of_the_wrong_length_is_one_line(loras):
    """One scale per layer of a block (or one for all): a list of another length is refused
    before anything loads, by preflight and by apply alike."""
    pipe = load_model("tiny:sdxl").pipe
    p = _pass((loras / "style.safetensors", {"unet": {"down": {"block_1": [1.0, 0.5, 0.2]}}}))
    message = r"style.safetensors: down block_1 takes one scale or 2 \(one per layer\), got 3"
    with pytest.raises(UserError, match=message):
        p.preflight(pipe, None)
    with pytest.raises(UserError, match=message):
        p.apply(pipe, None)
    assert not any("lora" in name for name, _ in pipe.unet.named_parameters())


def test_export_lora_fuses_into_the_bundle(loras, tmp_path):
    """`slimdiff export --lora PATH:SCALE` (repeatable): the bundle's UNet graph computes
    the fused UNet, not the base one."""
    import numpy as np
    import onnxruntime as ort
    from click.testing import CliRunner
    from slimdiff.export.components import denoiser_component

    from slimdiff.cli import main
    from slimdiff.models.inputs import Sizes, denoiser_inputs

    style, fast = loras / "style.safetensors", loras / "fast.safetensors"
    out = tmp_path / "bundle"
    args = ["export", "tiny:sdxl", "--out", str(out), "--no-optimize"]
    result = CliRunner().invoke(main, [*args, "--lora", f"{style}:0.5", "--lora", str(fast)])
    assert result.exit_code == 0, result.output
    assert "fused 2 LoRA(s): text_encoder 12, unet 272 layers" in result.output
    base = load_model("tiny:sdxl")
    fused = load_model("tiny:sdxl")
    _pass((style, 0.5), (fast, 1.0)).apply(fused.pipe, None)
    feeds = denoiser_inputs(base.arch, base.denoiser, Sizes(2, 8, 8, 77, True, seed=3))
    session = ort.InferenceSession(str(out / "unet" / "model.onnx"))
    graph = session.run(None, {i.name: feeds[i.name].numpy() for i in session.get_inputs()})[0]
    with torch.no_grad():
        want, before = (
            (c := denoiser_component(m.arch, m.denoiser)).module(*(feeds[n] for n in c.input_names))
            for m in (fused, base)
        )
    scale = float(want.abs().max())
    assert np.abs(graph - want.numpy()).max() < 1e-4 * scale
    assert np.abs(graph - before.numpy()).max() > 1e-2 * scale


def test_export_lora_refusals(loras, tmp_path):
    from click.testing import CliRunner

    from slimdiff.cli import main

    out = tmp_path / "bundle"
    style = loras / "style.safetensors"
    cases = [
        (["--lora", f"{style}:9"], "the scale must be from -8 to 8"),
        (["--lora", str(tmp_path / "missing.safetensors")], "is not a file"),
        (["--lora", str(style), "--weights", "stream"], "--weights stream never loads"),
    ]
    for extra, fragment in cases:
        result = CliRunner().invoke(main, ["export", "tiny:sdxl", "--out", str(out), *extra])
        assert result.exit_code == 2 and fragment in result.output, result.output
        assert not out.exists()


def test_export_lora_fetches_only_the_components_the_loras_adapt(loras):
    """A lazily loaded model (how export loads one) fetches the weights of what the LoRA
    files adapt, read from their keys (kohya's too); the rest stays lazy."""
    from slimdiff.app.export_cli import fetch_for_loras
    from slimdiff.models.lazy import is_lazy
    from slimdiff.models.loading import load_for_export

    model = load_for_export("tiny:sdxl")
    assert is_lazy(model.pipe.unet) and is_lazy(model.pipe.text_encoder)
    fetch_for_loras(model, [{"path": str(loras / "fast.safetensors")}])  # UNet only
    assert not is_lazy(model.pipe.unet)
    assert is_lazy(model.pipe.text_encoder) and is_lazy(model.pipe.text_encoder_2)
    fetch_for_loras(model, [{"path": str(loras / "style.safetensors")}])  # + text_encoder
    assert not is_lazy(model.pipe.text_encoder) and is_lazy(model.pipe.text_encoder_2)
