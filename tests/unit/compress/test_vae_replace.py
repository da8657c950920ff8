"""`vae.replace` (compress/vae/replace.py): a tiny decoder (AutoencoderTiny, TAESD-style)
or an fp16-safe AutoencoderKL in place of the model's VAE, through compress, the artifact,
export and the runtime."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from PIL import Image
from slimdiff.compress.runner import compress_model
from slimdiff.compress.vae.replace import ReplaceVaePass

from slimdiff.app.flow import compress_hash
from slimdiff.errors import UserError
from slimdiff.models import load_model
from slimdiff.models.vae import vae_scale_factor
from slimdiff.recipe import Recipe, load_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_vae(channels: int = 4, blocks: int = 4, seed: int = 0) -> AutoencoderTiny:
    torch.manual_seed(seed)
    width = (8,) * blocks
    return AutoencoderTiny(
        encoder_block_out_channels=width,
        decoder_block_out_channels=width,
        num_encoder_blocks=(1,) * blocks,
        num_decoder_blocks=(1,) * blocks,
        latent_channels=channels,
    ).eval()


@pytest.fixture(scope="module")
def taesd(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae") / "taesd"
    _tiny_vae().save_pretrained(folder)
    return folder


def _pass(path) -> ReplaceVaePass:
    return ReplaceVaePass(ReplaceVaePass.Config(path=str(path)))


def _recipe(path, model: str = "tiny:sd15", **extra) -> Recipe:
    return Recipe.model_validate(
        {"version": 1, "model": model, "passes": [{"pass": "vae.replace", "path": str(path)}]}
        | extra
    )


def test_the_tiny_decoder_replaces_the_vae_and_decodes(taesd):
    pipe = load_model("tiny:sdxl").pipe
    old = sum(p.numel() for p in pipe.vae.parameters())
    p = _pass(taesd)
    p.preflight(pipe, None)
    report = p.apply(pipe, None)
    assert type(pipe.vae) is AutoencoderTiny
    assert pipe.config.vae == ("diffusers", "AutoencoderTiny")  # what save_pretrained writes
    assert report.summary["class"] == "AutoencoderTiny"
    assert report.summary["params_before"] == old > report.summary["params"]
    expected = AutoencoderTiny.from_pretrained(taesd).decoder.state_dict()
    for name, value in pipe.vae.decoder.state_dict().items():
        assert torch.equal(value, expected[name]), name
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", num_inference_steps=1, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_a_pipeline_folder_gives_its_vae(tmp_path):
    folder = tmp_path / "pipe"
    donor = load_model("tiny:sd15").pipe
    donor.vae = _tiny_vae(seed=3)
    donor.save_pretrained(folder)
    pipe = load_model("tiny:sd15").pipe
    _pass(folder).apply(pipe, None)
    assert torch.equal(pipe.vae.decoder.layers[0].weight, donor.vae.decoder.layers[0].weight)


def test_vae_scale_factor_per_class():
    assert vae_scale_factor(_tiny_vae(blocks=4).config) == 8
    assert vae_scale_factor(_tiny_vae(blocks=3).config) == 4
    assert vae_scale_factor(load_model("tiny:sdxl").pipe.vae.config) == 8


def test_bad_folders_are_refused_naming_the_fix(taesd, tmp_path, caplog):
    pipe = load_model("tiny:sd15").pipe

    def refused(path, match):
        with pytest.raises(UserError, match=match):
            _pass(path).preflight(pipe, None)

    refused(tmp_path / "nowhere", "is not a diffusers VAE folder .*relative to the current")
    refused("madebyollin/taesd", "a hub id is not fetched: run `hf download madebyollin/taesd")
    unet = tmp_path / "unet"
    pipe.unet.save_pretrained(unet)
    refused(unet, "holds a UNet2DConditionModel, not a VAE slimdiff exports")
    wide = tmp_path / "wide"
    _tiny_vae(channels=16).save_pretrained(wide)  # an SD3/FLUX tiny decoder
    refused(wide, "decodes 16-channel latents at 8x, but this model's are 4-channel at 8x")
    coarse = tmp_path / "coarse"
    _tiny_vae(blocks=3).save_pretrained(coarse)
    refused(coarse, "at 4x, but this model's are 4-channel at 8x")
    pickled = tmp_path / "pickled"
    _tiny_vae().save_pretrained(pickled, safe_serialization=False)
    refused(pickled, r"only pickled weights \(diffusion_pytorch_model.bin\).*safetensors only")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    refused(broken, "config.json is not readable JSON")
    # another family's AutoencoderKL fits the shapes but not the latent scale: a warning
    other = tmp_path / "other"
    AutoencoderKL.from_config({**pipe.vae.config, "scaling_factor": 0.13025}).save_pretrained(other)
    with caplog.at_level(logging.WARNING):
        _pass(other).preflight(pipe, None)
    assert "scaling_factor 0.13025 vs 0.18215" in caplog.text
    # the model's own VAE config gives no warning
    caplog.clear()
    same = tmp_path / "same"
    pipe.vae.save_pretrained(same)
    with caplog.at_level(logging.WARNING):
        _pass(same).preflight(pipe, None)
    assert "scales latents" not in caplog.text


def test_cache_key_follows_the_folders_files(taesd, tmp_path):
    import shutil

    copy = tmp_path / "taesd"
    shutil.copytree(taesd, copy)
    recipe = _recipe(copy)
    first = compress_hash(recipe, {"m": 1})
    assert compress_hash(recipe, {"m": 1}) == first
    _tiny_vae(seed=9).save_pretrained(copy)  # same path, other weights
    assert compress_hash(recipe, {"m": 1}) != first


def test_a_missing_folder_stops_compress_before_the_model_loads(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from slimdiff.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "version: 1\nmodel: tiny:sd15\npasses:\n  - pass: vae.replace\n    path: nowhere/vae\n"
    )

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("slimdiff.models.load_model", no_load)
    done = CliRunner().invoke(main, ["compress", str(recipe), "--out", str(tmp_path / "o")])
    assert done.exit_code == 2, done.output
    assert "vae.replace: nowhere/vae/config.json is not a file" in done.output
    assert not (tmp_path / "o").exists()


def test_bench_reference_keeps_the_models_own_vae(taesd):
    from slimdiff.app.bench import _reference_passes

    pipe = load_model("tiny:sd15").pipe
    assert _reference_passes(_recipe(taesd), pipe) == []
    assert type(pipe.vae) is AutoencoderKL


def test_compressed_artifact_exports_and_runs_as_diffusers_does(taesd, tmp_path):
    """compress -> artifact (model_index names AutoencoderTiny) -> bundle -> runtime: the
    runtime's image is the diffusers pipeline's with the same VAE and latents."""
    from slimdiff.export import export_bundle
    from slimdiff.runtime import Text2ImagePipeline

    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(
        f"version: 1\nmodel: tiny:sd15\npasses:\n  - pass: vae.replace\n    path: {taesd}\n"
    )
    out = tmp_path / "artifact"
    compressed = compress_model(load_model("tiny:sd15"), load_recipe(str(recipe_file)), out)
    index = json.loads((out / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderTiny"]
    assert type(compressed.pipe.vae) is AutoencoderTiny
    bundle = tmp_path / "bundle"
    manifest = export_bundle(load_model(str(out)), bundle, optimize=False, vae_encoder=True)
    assert manifest.pipeline.vae_scaling_factor == 1.0  # TAESD takes the scaled latents
    runtime = Text2ImagePipeline.from_bundle(tmp_path / "bundle")
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    ours = runtime("a cat", steps=2, size=(64, 64), latents=latents).image
    pipe = compressed.pipe
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        "a cat", num_inference_steps=2, height=64, width=64, latents=torch.from_numpy(latents)
    ).images[0]
    diff = np.abs(np.asarray(ref, np.int16) - ours.astype(np.int16))
    assert diff.max() <= 1 and ours.std() > 1  # the same image, and not a blank one
    # image-to-image through TAESD's encoder, which gives the latents themselves (no
    # posterior to draw from): diffusers' img2img pipeline with the runtime's noise
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as i2i

    source = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    ours = runtime("a cat", steps=4, image=source, strength=0.5, seed=3, output="latent")
    noise = runtime.conditioning.noise(3, 64, 64)
    img2img = i2i.StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(i2i, "randn_tensor", lambda shape, **_: torch.from_numpy(noise))
        ref = img2img(
            "a cat",
            image=Image.fromarray(source),
            strength=0.5,
            num_inference_steps=4,
            output_type="latent",
        ).images
    scale = float(ref.abs().max())
    assert np.abs(ours.latents - ref.numpy()).max() < 1e-4 * scale


def test_an_fp16_safe_vae_exports_in_fp16(tmp_path):
    """SDXL's VAE is marked force_upcast (NaN in fp16), so fp16 bundles keep it in fp32; a
    fixed VAE (sdxl-vae-fp16-fix's config: the flag off) exports in fp16."""
    from slimdiff.export.bundle import component_precisions

    model = load_model("tiny:sdxl")
    assert component_precisions(model, "fp16", None)["vae_decoder"] == "fp32"
    fixed = tmp_path / "fixed"
    AutoencoderKL.from_config({**model.pipe.vae.config, "force_upcast": False}).save_pretrained(
        fixed
    )
    _pass(fixed).apply(model.pipe, None)
    assert component_precisions(model, "fp16", None)["vae_decoder"] == "fp16"


def test_export_vae_option_swaps_the_decoder_of_a_lazily_loaded_model(taesd, tmp_path):
    """`slimdiff export MODEL --vae DIR`: the built-in loads lazily (VAE on the meta
    device); the bundle's decoder holds the tiny VAE's weights and runs."""
    import onnx
    from click.testing import CliRunner
    from slimdiff.runtime import Text2ImagePipeline

    from slimdiff.cli import main

    out = tmp_path / "bundle"
    args = ["export", "tiny:sd15", "--out", str(out), "--no-optimize", "--vae", str(taesd)]
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0, done.output
    graph = onnx.load(str(out / "vae_decoder" / "model.onnx"), load_external_data=False).graph
    weights = sum(int(np.prod(t.dims)) for t in graph.initializer)
    decoder = AutoencoderTiny.from_pretrained(taesd).decoder
    assert abs(weights / sum(p.numel() for p in decoder.parameters()) - 1) < 0.01
    image = Text2ImagePipeline.from_bundle(out)("a cat", steps=1, size=(64, 64)).image
    assert image.shape == (64, 64, 3)
    bad = CliRunner().invoke(
        main, [*args[:-1], str(tmp_path / "none"), "--out", str(tmp_path / "b")]
    )
    assert bad.exit_code == 2 and "is not a diffusers VAE folder" in bad.output
    assert not (tmp_path / "b").exists()


def _single_file(vae, path, prefix: str = "") -> None:
    """`vae` written as one .safetensors file in the original (LDM) key layout, as A1111
    and ComfyUI users keep VAEs (tests/ldm_checkpoint.py's inverse converter)."""
    from safetensors.torch import save_file

    from tests.ldm_checkpoint import _vae

    state = _vae(vae.state_dict(), vae.config)
    save_file(
        {prefix + k.removeprefix("first_stage_model."): v.contiguous() for k, v in state.items()},
        str(path),
    )


@pytest.mark.parametrize("prefix", ["", "first_stage_model."])
def test_a_single_file_vae_loads_into_the_models_architecture(tmp_path, prefix):
    donor = load_model("tiny:sd15").pipe.vae
    torch.manual_seed(5)
    for p in donor.parameters():  # other weights than the model's own
        p.data.normal_(0, 0.05)
    file = tmp_path / "vae-ft-mse.safetensors"
    _single_file(donor, file, prefix)
    pipe = load_model("tiny:sd15").pipe
    scaling = pipe.vae.config.scaling_factor
    report = _pass(file).apply(pipe, None)
    assert report.summary["format"] == "single file" and type(pipe.vae) is AutoencoderKL
    for name, value in donor.state_dict().items():
        assert torch.equal(pipe.vae.state_dict()[name], value), name
    assert pipe.vae.config.scaling_factor == scaling  # the model's own config
    assert _recipe(file).passes[0].config.input_files() == (str(file),)


def test_bad_single_files_are_refused(tmp_path):
    pipe = load_model("tiny:sd15").pipe

    def refused(path, match, target=pipe):
        with pytest.raises(UserError, match=match):
            p = _pass(path)
            p.preflight(target, None)
            p.apply(target, None)

    pickled = tmp_path / "vae.ckpt"
    pickled.write_bytes(b"not loaded")
    refused(pickled, r"vae.ckpt is a pickled file; pickled VAE files")
    picture = tmp_path / "vae.png"
    picture.write_bytes(b"\x89PNG")
    refused(picture, r"vae.png is not a VAE: pass a .safetensors file or a diffusers VAE folder")
    from safetensors.torch import save_file

    lora = tmp_path / "lora.safetensors"
    save_file({"unet.down.lora_A.weight": torch.zeros(2, 2)}, str(lora))
    refused(lora, "holds no VAE decoder")
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x00" * 16)
    refused(damaged, "is not a readable safetensors file")
    flux_vae = tmp_path / "flux-vae.safetensors"  # 16 latent channels: another family's
    _single_file(load_model("tiny:flux").pipe.vae, flux_vae)
    refused(flux_vae, "could not load .*is it a VAE for this model family")
    tiny = load_model("tiny:sd15").pipe
    tiny.vae = _tiny_vae()
    ok_file = tmp_path / "ok.safetensors"
    _single_file(load_model("tiny:sd15").pipe.vae, ok_file)
    refused(ok_file, "this model's VAE is AutoencoderTiny", target=tiny)
