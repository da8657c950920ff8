"""Models as other tools leave them: single files whose weights the conversion would drop
(deeper blocks than --config's, a text encoder in a layout diffusers does not read, a file
of another family or width), folders with pickled plain weights or a stray file beside the
real ones, variant-only hub caches and lone component folders, a stale shard index. Each
loads as diffusers loads it, or is refused in one line that names the problem and the fix.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from diffusers import FluxTransformer2DModel, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from slimdiff.cli import main
from slimdiff.errors import UserError
from slimdiff.models import load_model
from slimdiff.models.lazy import materialize
from slimdiff.models.single_file import load_single_file
from tests.ldm_checkpoint import write_sd15_single_file, write_sdxl_single_file
from tests.ldm_checkpoint_mmdit import write_flux_single_file
from tests.unit.test_hub_cache import _as_hub_cache
from tests.unit.test_single_file import _sdxl_with_a_wider_bigg


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """(tiny:sd15's pipeline, its diffusers folder, its single file)."""
    root = tmp_path_factory.mktemp("sd15")
    pipe = load_model("tiny:sd15").pipe
    pipe.save_pretrained(root / "base")
    write_sd15_single_file(pipe, root / "tuned.safetensors")
    return pipe, root / "base", root / "tuned.safetensors"


def _convert(file, config, out):
    return CliRunner().invoke(
        main, ["convert", str(file), "--config", str(config), "--out", str(out)]
    )


def _one_line_error(result, out) -> str:
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert not out.exists()
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: ")
    return lines[-1]


def _equal(module, state) -> bool:
    return all(torch.equal(module.state_dict()[k], v.float()) for k, v in state.items())


# ---------------------------------------------------------- single files: nothing dropped


def test_a_file_with_deeper_unet_blocks_than_the_config_is_refused(sd15, tmp_path):
    pipe, base, _ = sd15
    config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
    torch.manual_seed(4)
    deeper = UNet2DConditionModel(**{**config, "transformer_layers_per_block": 2})
    extra = len(deeper.state_dict().keys() - pipe.unet.state_dict().keys())
    file = tmp_path / "deeper.safetensors"
    write_sd15_single_file(type(pipe)(**{**pipe.components, "unet": deeper}), file)
    out = tmp_path / "out"
    line = _one_line_error(_convert(file, base, out), out)
    assert f"{extra} of its unet weights have no place in the UNet2DConditionModel" in line
    assert "which has no down_blocks.0.attentions.0.transformer_blocks.1." in line
    assert "--config must be a folder of the checkpoint's own architecture" in line


@pytest.mark.usefixtures("flux_any_width")  # diffusers' converter assumes FLUX.1's width
def test_a_flux_file_with_more_blocks_than_the_config_is_refused(tmp_path):
    pipe = load_model("tiny:flux").pipe
    pipe.save_pretrained(tmp_path / "base")
    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    more = {"num_layers": config["num_layers"] + 1}
    bigger = FluxTransformer2DModel(**{**config, **more})
    extra = len(bigger.state_dict().keys() - pipe.transformer.state_dict().keys())
    file = tmp_path / "flux.safetensors"
    write_flux_single_file(bigger, file)
    with pytest.raises(UserError, match=rf"{extra} of its transformer weights have no place"):
        load_single_file(file, config=str(tmp_path / "base"))


def test_a_clip_in_the_old_key_layout_is_not_replaced_by_the_configs(sd15, tmp_path):
    """diffusers does not recognise CLIP keys without `text_model.`: --config's text
    encoder would be loaded in its place, and the file's thrown away."""
    _, base, file = sd15
    old = "cond_stage_model.transformer."
    state = load_file(str(file))
    moved = {k.replace(f"{old}text_model.", old): v for k, v in state.items()}
    clip = [k for k in moved if k.startswith("cond_stage_model.")]
    save_file(moved, str(tmp_path / "old.safetensors"))
    out = tmp_path / "out"
    line = _one_line_error(_convert(tmp_path / "old.safetensors", base, out), out)
    assert f"its {len(clip)} text_encoder weights (first: {old}embeddings." in line
    assert "--config's text_encoder would take their place" in line
    assert "or remove those keys to take --config's" in line


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(an SDXL pipeline diffusers tells the encoders of apart, its folder, its file)."""
    root = tmp_path_factory.mktemp("sdxl")
    pipe = _sdxl_with_a_wider_bigg()
    pipe.save_pretrained(root / "base")
    write_sdxl_single_file(pipe, root / "tuned.safetensors")
    return pipe, root / "base", root / "tuned.safetensors"


def test_an_sdxl_file_with_clip_l_and_no_bigg_keeps_neither_silently(sdxl, tmp_path):
    _, base, file = sdxl
    state = load_file(str(file))
    save_file({k: v for k, v in state.items() if "embedders.1." not in k}, str(tmp_path / "f"))
    (tmp_path / "f").rename(tmp_path / "no-bigg.safetensors")
    with pytest.raises(UserError) as caught:
        load_single_file(tmp_path / "no-bigg.safetensors", config=str(base))
    assert "text_encoder weights (first: conditioner.embedders.0." in str(caught.value)
    assert "\n" not in str(caught.value)


def test_an_unreadable_sdxl_clip_is_not_told_to_convert_while_converting(sdxl, tmp_path):
    _, base, file = sdxl
    inner = "conditioner.embedders.0.transformer."
    state = load_file(str(file))
    save_file(
        {k.replace(f"{inner}text_model.", inner): v for k, v in state.items()},
        str(tmp_path / "old.safetensors"),
    )
    out = tmp_path / "out"
    line = _one_line_error(_convert(tmp_path / "old.safetensors", base, out), out)
    assert "diffusers cannot read its text encoder weights" in line
    assert "slimdiff convert" not in line


def test_values_the_conversion_leaves_out_are_named(sd15, tmp_path):
    """A tensor the converter does not read (ComfyUI's scaled-fp8 marker) is refused."""
    _, base, file = sd15
    state = load_file(str(file))
    save_file({**state, "model.diffusion_model.scaled_fp8": torch.ones(2)}, str(tmp_path / "x"))
    (tmp_path / "x").rename(tmp_path / "scaled.safetensors")
    with pytest.raises(UserError, match=r"leaves 2 of its \d+ values out \(model.diffusion_model"):
        load_single_file(tmp_path / "scaled.safetensors", config=str(base))


def test_keys_outside_the_models_do_not_count(sd15, tmp_path):
    """An EMA copy (model_ema.*) and a noise schedule are no model's weights: diffusers
    converts the plain weights, and so does slimdiff."""
    pipe, base, file = sd15
    state = load_file(str(file))
    ema = {"model_ema.decay": torch.tensor(0.9999), "alphas_cumprod": torch.ones(1000)}
    save_file({**state, **ema}, str(tmp_path / "x"))
    (tmp_path / "x").rename(tmp_path / "ema.safetensors")
    loaded = load_single_file(tmp_path / "ema.safetensors", config=str(base))
    assert _equal(loaded.unet, pipe.unet.state_dict())


def test_a_flux_file_of_another_width_is_one_line(tmp_path):
    """diffusers' FLUX converter splits single blocks at FLUX.1's 3072 (unpatched here)."""
    pipe = load_model("tiny:flux").pipe
    pipe.save_pretrained(tmp_path / "base")
    write_flux_single_file(pipe.transformer, tmp_path / "flux.safetensors")
    out = tmp_path / "out"
    line = _one_line_error(_convert(tmp_path / "flux.safetensors", tmp_path / "base", out), out)
    assert "diffusers' conversion cannot split its weights for the FluxPipeline" in line
    assert "split_with_sizes" in line and "FLUX.1's 3072" in line


def test_a_file_of_another_family_is_told_before_diffusers_tries(sd15, tmp_path):
    _, base, _ = sd15
    write_flux_single_file(load_model("tiny:flux").pipe.transformer, tmp_path / "f.safetensors")
    out = tmp_path / "out"
    line = _one_line_error(_convert(tmp_path / "f.safetensors", base, out), out)
    assert "holds a FluxTransformer2DModel (its keys name double_blocks.*)" in line
    assert "is a StableDiffusionPipeline, whose unet is a UNet2DConditionModel" in line
    assert "from_pretrained" not in line


# ------------------------------------------------------------------- folders' weight files


@pytest.fixture(scope="module")
def pickled_and_fp16(tmp_path_factory):
    """tiny:sd15 saved with pickled plain weights (diffusers' models) and, beside them,
    another model's fp16 variant in safetensors."""
    folder = tmp_path_factory.mktemp("mix") / "pipe"
    plain = load_model("tiny:sd15").pipe
    plain.save_pretrained(folder, safe_serialization=False)
    other = load_model("tiny:sd15").pipe
    with torch.no_grad():
        for weight in other.unet.parameters():
            weight.add_(0.25)
    other.to(torch.float16).save_pretrained(folder, variant="fp16")
    return folder, plain


def test_pickled_plain_weights_beside_a_variant_are_what_loads(pickled_and_fp16):
    folder, plain = pickled_and_fp16
    assert (folder / "unet" / "diffusion_pytorch_model.bin").is_file()
    fix = r"pass it, or remove diffusion_pytorch_model.bin to load the fp16 weights"
    for weights in ("memory", "lazy"):
        with pytest.raises(UserError, match=rf"unet: its plain weights are pickled .*{fix}"):
            load_model(str(folder), weights=weights)
    loaded = load_model(str(folder), allow_pickle=True).pipe  # diffusers: the plain ones
    assert _equal(loaded.unet, plain.unet.state_dict())


def test_a_component_of_plain_and_variant_weights_beside_a_variant_only_one(
    pickled_and_fp16, tmp_path
):
    """diffusers refuses that folder without a variant; memory and lazy loading would
    otherwise read different weights of the UNet."""
    folder = tmp_path / "mixed"
    load_model("tiny:sd15").pipe.save_pretrained(folder)
    for part in ("unet", "text_encoder"):
        shutil.copytree(pickled_and_fp16[0] / part, folder / part, dirs_exist_ok=True)
    (folder / "text_encoder" / "model.safetensors").unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").unlink()
    for weights in ("memory", "lazy"):
        with pytest.raises(UserError) as caught:
            load_model(str(folder), weights=weights)
        message = str(caught.value)
        assert "text_encoder holds only fp16 weights, while unet holds plain and fp16" in message
        assert "(remove unet's plain ones)" in message


def test_a_stray_weights_file_beside_the_real_one_is_not_read(sd15, tmp_path):
    pipe, base, _ = sd15
    folder = tmp_path / "pipe"
    shutil.copytree(base, folder)
    stray = {k: torch.zeros_like(v) for k, v in pipe.unet.state_dict().items()}
    save_file(stray, str(folder / "unet" / "diffusion_pytorch_model_ema.safetensors"))
    for weights in ("memory", "lazy"):
        unet = load_model(str(folder), weights=weights).pipe.unet
        assert _equal(materialize(unet) if weights == "lazy" else unet, pipe.unet.state_dict())


def test_a_stale_shard_index_is_named_with_its_fix(tmp_path):
    pipe = load_model("tiny:sd15").pipe
    pipe.save_pretrained(tmp_path / "pipe", max_shard_size="50KB")
    pipe.save_pretrained(tmp_path / "pipe")  # whole: the old shards go, their index stays
    index = tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    assert index.is_file()
    fix = r"remove \w+\.safetensors\.index\.json if \w+\.safetensors is the model"
    for weights in ("memory", "lazy"):
        with pytest.raises(UserError, match=rf"a stale shard index: .*{fix}"):
            load_model(str(tmp_path / "pipe"), weights=weights)


def test_a_hub_cache_of_fp16_files_only_loads_as_the_folder_does(tmp_path, monkeypatch):
    from huggingface_hub import constants

    pipe = load_model("tiny:sd15").pipe
    pipe.to(torch.float16).save_pretrained(tmp_path / "saved", variant="fp16")
    _as_hub_cache(tmp_path / "saved", tmp_path / "hub")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("org/tiny").pipe
    assert _equal(loaded.unet, pipe.unet.float().state_dict())
    # a cache that lacks a component's weights: no advice to unpickle what is not there
    vae = tmp_path / "hub" / "models--org--tiny" / "snapshots"
    for link in vae.glob("*/vae/*.safetensors"):
        link.unlink()
    with pytest.raises(UserError) as caught:
        load_model("org/tiny")
    assert "--allow-pickle" not in str(caught.value)
    assert "the cache lacks some of its weights" in str(caught.value)


# ------------------------------------------------------------ lone folders, prompt lengths


def test_a_lone_fp16_only_unet_folder_loads_as_its_pipeline_does(tmp_path):
    pipe = load_model("tiny:sd15").pipe
    pipe.unet.to(torch.float16).save_pretrained(tmp_path / "unet", variant="fp16")
    loaded = load_model(str(tmp_path / "unet"))
    assert loaded.pipe is None and _equal(loaded.denoiser, pipe.unet.float().state_dict())


def test_a_lone_sd3_transformer_draws_its_config_size(tmp_path):
    transformer = load_model("tiny:sd3").pipe.transformer
    transformer.save_pretrained(tmp_path / "transformer")
    loaded = load_model(str(tmp_path / "transformer"))
    side = transformer.config.sample_size * 8  # diffusers' VAE scale
    assert loaded.default_size == (side, side) and side <= loaded.max_side
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "transformer")])
    assert result.exit_code == 0, result.output


def test_a_shorter_clip_length_is_not_called_long_context(sd15, tmp_path):
    _, base, _ = sd15
    shutil.copytree(base, tmp_path / "pipe")
    config = tmp_path / "pipe" / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 64}))
    with pytest.raises(UserError) as caught:
        load_model(str(tmp_path / "pipe"))
    message = str(caught.value)
    assert "reads 64-token prompts (model_max_length: shorter than CLIP's)" in message
    assert "Long-CLIP" not in message and "the rest cut" not in message
