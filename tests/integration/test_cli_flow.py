"""End to end through the CLI on tiny models: compress -> export -> run -> bench."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from slimdiff.cli import main

pytestmark = pytest.mark.slow


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    out = tmp_path_factory.mktemp("flow") / "tiny"
    # Unfused: ORT's UNet fusion (30 s here) is tested on tiny:sd15 in test_export_tiny.
    result = _run("compress", "tiny-sdxl-fp32", "--out", out, "--set", "export.optimize=false")
    assert result.exit_code == 0, result.output
    return out


def test_compress_writes_a_diffusers_artifact_and_a_bundle(compressed):
    from diffusers import StableDiffusionXLPipeline

    assert (compressed / "artifact" / "model_index.json").is_file()
    meta = json.loads((compressed / "artifact" / "slimdiff.json").read_text())
    assert meta["edits"] == [] and meta["recipe"]["name"] == "tiny-sdxl-fp32"
    # Plain diffusers loads the artifact (no slimdiff needed for an empty pass list).
    pipe = StableDiffusionXLPipeline.from_pretrained(compressed / "artifact")
    assert pipe.unet.config.transformer_layers_per_block == [1, 2, 4]
    manifest = json.loads((compressed / "bundle" / "manifest.json").read_text())
    assert manifest["family"] == "sdxl"
    assert set(manifest["components"]) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder"}
    assert manifest["components"]["unet"]["parity"]["rel_err"] <= 1e-4


def test_compress_again_reuses_the_cache(compressed):
    before = (compressed / "bundle" / "manifest.json").stat().st_mtime_ns
    result = _run(
        "compress", "tiny-sdxl-fp32", "--out", compressed, "--set", "export.optimize=false"
    )
    assert result.exit_code == 0, result.output
    assert (compressed / "bundle" / "manifest.json").stat().st_mtime_ns == before


def test_run_writes_the_image(compressed, tmp_path):
    out = tmp_path / "img.png"
    result = _run(
        "run",
        compressed / "bundle",
        "--prompt",
        "a red circle",
        "--size",
        "64x64",
        "--steps",
        "3",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    image = np.asarray(Image.open(out))
    assert image.shape == (64, 64, 3) and image.std() > 0


def test_run_from_given_latents_is_deterministic(compressed, tmp_path):
    noise = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    images = []
    for i in range(2):
        out = tmp_path / f"{i}.png"
        result = _run(
            "run",
            compressed / "bundle",
            "--prompt",
            "a cat",
            "--size",
            "64x64",
            "--steps",
            "2",
            "--latents",
            tmp_path / "noise.npy",
            "--seed",
            str(i),
            "--out",
            out,
        )
        assert result.exit_code == 0, result.output
        images.append(np.asarray(Image.open(out)))
    assert np.array_equal(images[0], images[1])  # the seed is ignored when latents are given


def test_impossible_size_exits_2(compressed, tmp_path):
    result = _run(
        "run",
        compressed / "bundle",
        "--prompt",
        "x",
        "--size",
        "100x60",
        "--out",
        tmp_path / "x.png",
    )
    assert result.exit_code == 2
    assert "multiple of 8" in result.output and len(result.output.strip().splitlines()) == 1


def test_tampered_bundle_exits_2(compressed, tmp_path):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(compressed / "bundle", bundle)
    onnx_file = bundle / "unet" / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-10] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    result = _run("run", bundle, "--prompt", "x", "--out", tmp_path / "x.png")
    assert result.exit_code == 2
    assert "SHA-256" in result.output and len(result.output.strip().splitlines()) == 1


def test_bench_writes_results_for_each_recipe(tmp_path):
    out = tmp_path / "bench"
    result = _run(
        "bench",
        "tiny-sdxl-fp32",
        "tiny-sdxl-fp16",
        "--steps",
        "2",
        "--size",
        "64x64",
        "--repeat",
        "1",
        "--set",
        "bench.prompts=[a red circle, a blue square]",
        "--set",
        "export.optimize=false",  # the fusion is tested in test_export_tiny (sd15)
        # the bundle ships another scheduler than the model's, one that adds noise every
        # step: the torch reference must sample with it too, adding the noise the runtime
        # adds (the fp32 fidelity below says so); both prompts in one reference call
        "--set",
        "export.scheduler=dpm++2m-sde",
        "--set",
        "bench.reference_batch=2",
        "--set",
        "export.timestep_spacing=trailing",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in results["recipes"]}
    assert set(rows) == {"tiny-sdxl-fp32", "tiny-sdxl-fp16"}
    for row in rows.values():
        assert row["params"] > 0 and row["bytes_on_disk"] > 0
        assert row["latency_ms"]["denoiser_step"] > 0 and row["latency_ms"]["end_to_end"] > 0
        assert row["torch_eager_ms_per_step"] > 0 and row["flops_per_step"] > 0
        # Eager and runtime timed in pairs (1 repeat x 2 prompts); the speedup is their median.
        assert len(row["speedup_pairs"]) == 2
        assert row["speedup_vs_eager"] == pytest.approx(float(np.median(row["speedup_pairs"])))
        assert (out / f"grid_{row['name']}.png").is_file()
    # fp32 ONNX through the runtime reproduces the torch reference.
    assert rows["tiny-sdxl-fp32"]["fidelity"]["psnr_db"] >= 40
    assert rows["tiny-sdxl-fp32"]["fidelity"]["latent_rel_err"] < 1e-3
    # fp16 halves the denoiser's bytes and stays close.
    assert rows["tiny-sdxl-fp16"]["bytes_on_disk"] < rows["tiny-sdxl-fp32"]["bytes_on_disk"]
    assert rows["tiny-sdxl-fp16"]["fidelity"]["psnr_db"] >= 25
    assert (out / "latency_vs_fidelity.png").is_file()
    table = (out / "results.md").read_text()
    assert "| tiny-sdxl-fp32 |" in table and "| tiny-sdxl-fp16 |" in table


def test_a_recipe_with_a_controlnet_exports_it_and_run_takes_control_images(tmp_path):
    from slimdiff.models import load_model
    from tests.controlnets import save_tiny_controlnet

    folder = save_tiny_controlnet(load_model("tiny:sd15").denoiser, tmp_path / "cn")
    recipe = tmp_path / "cn.yaml"
    recipe.write_text(
        f"name: tiny-cn\nmodel: tiny:sd15\nexport:\n  optimize: false\n  controlnet: {folder}\n"
    )
    out = tmp_path / "out"
    result = _run("compress", recipe, "--out", out)
    assert result.exit_code == 0, result.output
    bundle = out / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["pipeline"]["controlnet"] == {"count": 1, "conditioning_channels": 3}
    assert manifest["source"]["controlnet"] == str(folder)
    verified = _run("verify", bundle)
    assert "the denoiser with a ControlNet" in verified.output
    assert verified.output.rstrip().endswith("; takes --control-image (1 ControlNet)")

    edges = tmp_path / "edges.png"
    pixels = np.zeros((48, 64, 3), np.uint8)
    pixels[10:30, 20:50] = 255
    Image.fromarray(pixels).save(edges)
    run = ("run", bundle, "--prompt", "a red circle", "--steps", "3")
    steered, plain, off = (tmp_path / f"{n}.png" for n in ("steered", "plain", "off"))
    assert _run(*run, "--control-image", edges, "--out", steered).exit_code == 0
    # without --size, the control image's size (48 x 64), as diffusers' ControlNet pipelines
    assert Image.open(steered).size == (64, 48)
    size = ("--size", "64x48")
    assert _run(*run, *size, "--out", plain).exit_code == 0
    scale0 = ("--control-image", edges, "--control-scale", "0")
    assert _run(*run, *size, *scale0, "--out", off).exit_code == 0
    # scale 0 adds nothing: the image of a run without control
    assert np.array_equal(np.asarray(Image.open(off)), np.asarray(Image.open(plain)))
    assert not np.array_equal(np.asarray(Image.open(steered)), np.asarray(Image.open(plain)))

    refused = _run("bench", recipe, "--out", tmp_path / "bench")
    assert refused.exit_code == 2
    assert "bench does not take export.controlnet" in refused.output
