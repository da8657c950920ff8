"""toy:shapes: ships in the package, loads offline in seconds, and follows prompts the same
through torch and through its exported ONNX bundle (judged by slimdiff.metrics, in
`slimdiff bench`'s prompt accuracy over the 48 held-out prompts)."""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image

from slimdiff.models import load_model
from slimdiff.models.toy import toy_folder

pytestmark = pytest.mark.slow


def test_loads_offline_in_fp32_with_sdxl_topology(monkeypatch):
    # Offline: no hub access at all (the load time is in README, measured, not asserted).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model("toy:shapes")
    assert not [w for w in caught if "torch_dtype" in str(w.message)]
    modules = (model.pipe.unet, model.pipe.vae, model.pipe.text_encoder, model.pipe.text_encoder_2)
    assert {p.dtype for m in modules for p in m.parameters()} == {torch.float32}
    assert model.arch.family == "sdxl" and model.default_size == (64, 64)
    cfg = model.pipe.unet.config
    assert cfg.down_block_types == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert list(cfg.transformer_layers_per_block) == [1, 2, 4]
    assert cfg.mid_block_type == "UNetMidBlock2DCrossAttn"
    size = sum(p.stat().st_size for p in toy_folder().rglob("*") if p.is_file())
    assert size < 30e6


def test_bench_reports_prompt_accuracy(tmp_path):
    import json

    from click.testing import CliRunner

    from slimdiff.cli import main

    out = tmp_path / "bench"
    args = ["bench", "toy-shapes", "--repeat", "1", "--out", str(out)]
    args += ["--set", "bench.accuracy_images=1", "--set", "export.optimize=false"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    row = json.loads((out / "results.json").read_text())["recipes"][0]
    acc, ref = row["prompt_accuracy"], row["reference_prompt_accuracy"]
    assert (acc["n"], acc["n_single"], acc["n_two"]) == (48, 24, 24)
    # Measured with these seeds: single 100% (24 of 24), two 67% (16 of 24). The issue's
    # bar (single >= 90%) and a two-object floor far above chance catch a regressed model.
    assert acc["single"] >= 0.9 and ref["single"] >= 0.9, (acc, ref)
    assert acc["two"] >= 0.5 and ref["two"] >= 0.5, (acc, ref)
    # The fp32 bundle draws what torch draws: at most one verdict apart.
    assert abs(acc["all"] - ref["all"]) <= 1 / 48 + 1e-9
    # fp32 ONNX against torch on the same noise: the final latents agree to float error.
    assert row["fidelity"]["heldout_latent_rel_err"] < 1e-3
    # ... and the images over the 48 held-out prompts too (uint8 PNGs: identical or 1 LSB).
    assert row["fidelity"]["heldout_psnr_db"] > 40, row["fidelity"]
    table = (out / "results.md").read_text()
    assert "prompt acc." in table and "held-out PSNR (dB)" in table
    # its VAE halves twice: sides in multiples of 4, which `run --size` takes too
    png = tmp_path / "36.png"
    args = ["run", str(out / "recipes" / "toy-shapes" / "bundle"), "--prompt", "a red circle"]
    result = CliRunner().invoke(main, [*args, "--steps", "1", "--size", "36x44", "--out", str(png)])
    assert result.exit_code == 0, result.output
    assert Image.open(png).size == (36, 44)
