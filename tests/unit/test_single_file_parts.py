"""SD3 and FLUX single files that hold part of a pipeline, as they ship: Stability's
sd3_medium_incl_clips (no T5) and sd3_medium (the transformer and VAE... or less), BFL's
flux1-dev.safetensors (the transformer alone, top-level keys or ComfyUI's prefix).
`slimdiff convert FILE --config DIR` takes what the file lacks from DIR's weights, or
runs SD3 without T5 where DIR has none; anything else is refused in one line.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from click.testing import CliRunner

from slimdiff.cli import main
from slimdiff.models import load_model
from tests.ldm_checkpoint_mmdit import (
    COMFY_PREFIX,
    same_weights,
    write_flux_single_file,
    write_sd3_single_file,
)

SD3_MODELS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def _convert(file, config, out) -> None:
    done = CliRunner().invoke(
        main, ["convert", str(file), "--config", str(config), "--out", str(out)]
    )
    assert done.exit_code == 0, done.output


@pytest.mark.parametrize(
    ("parts", "vae"),
    [(("clip_l", "clip_g"), True), ((), True), ((), False)],
    ids=["incl-clips", "transformer-and-vae", "transformer-only"],
)
def test_sd3_takes_what_the_file_lacks_from_the_config(sd3_finetune, tmp_path, parts, vae):
    tuned, base = sd3_finetune
    file = tmp_path / "sd3.safetensors"
    write_sd3_single_file(tuned, file, text_encoders=parts, vae=vae)
    _convert(file, base, tmp_path / "out")
    loaded = load_model(str(tmp_path / "out")).pipe
    in_file = {"transformer", *(["vae"] if vae else [])}
    in_file |= {"text_encoder", "text_encoder_2"} if parts else set()
    original = load_model(str(base)).pipe
    for name in SD3_MODELS:  # the file's weights, else the config folder's
        same_weights(getattr(tuned if name in in_file else original, name), getattr(loaded, name))


def test_sd3_without_t5_anywhere_runs_without_it(sd3_finetune, tmp_path, caplog):
    tuned, base = sd3_finetune
    config = tmp_path / "base"
    shutil.copytree(base, config)
    for weights in (config / "text_encoder_3").glob("*.safetensors"):
        weights.unlink()
    file = tmp_path / "sd3.safetensors"
    write_sd3_single_file(tuned, file, text_encoders=("clip_l", "clip_g"))
    with caplog.at_level(logging.WARNING):
        _convert(file, config, tmp_path / "out")
    assert "holds no text_encoder_3" in caplog.text and "loading sd3 without it" in caplog.text
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    loaded = load_model(str(tmp_path / "out"))
    assert loaded.pipe.text_encoder_3 is None
    for name in SD3_MODELS[:-1]:
        same_weights(getattr(tuned, name), getattr(loaded.pipe, name))


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """(a "fine-tuned" tiny FLUX transformer, the base pipeline, its diffusers folder)."""
    pipe = load_model("tiny:flux").pipe
    root = tmp_path_factory.mktemp("flux") / "base"
    pipe.save_pretrained(root)
    tuned = load_model("tiny:flux").pipe.transformer
    with torch.no_grad():
        for weight in tuned.parameters():
            weight.add_(0.5)
    return tuned, pipe, root


@pytest.mark.usefixtures("flux_any_width")  # diffusers' converter assumes FLUX.1's width
@pytest.mark.parametrize("prefix", ["", COMFY_PREFIX], ids=["bfl", "comfyui"])
def test_a_flux_transformer_file_takes_the_rest_from_the_config(flux, tmp_path, prefix):
    tuned, base_pipe, base = flux
    file = tmp_path / "flux1-tuned.safetensors"
    write_flux_single_file(tuned, file, prefix=prefix)
    _convert(file, base, tmp_path / "out")
    loaded = load_model(str(tmp_path / "out")).pipe
    same_weights(tuned, loaded.transformer)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        same_weights(getattr(base_pipe, name), getattr(loaded, name))


@pytest.mark.usefixtures("flux_any_width")
def test_a_config_without_the_missing_weights_is_one_line(flux, tmp_path):
    tuned, _, base = flux
    config = tmp_path / "configs-only"
    shutil.copytree(base, config)
    for weights in config.rglob("*.safetensors"):
        weights.unlink()
    file = tmp_path / "flux1-tuned.safetensors"
    write_flux_single_file(tuned, file)
    out = tmp_path / "out"
    done = CliRunner().invoke(
        main, ["convert", str(file), "--config", str(config), "--out", str(out)]
    )
    assert done.exit_code == 2 and not out.exists()
    line = done.output.strip().splitlines()[-1]
    assert line.startswith(f"error: {file} holds no text_encoder (CLIPTextModel) and --config")
    assert "pass the base model's whole diffusers folder as --config" in line


@pytest.mark.usefixtures("flux_any_width")
def test_an_fp8_flux_file_loads_as_float32(flux, tmp_path):
    """FLUX files often ship in float8_e4m3fn (ComfyUI's fp8 checkpoints): their values,
    upcast exactly, in a float32 model."""
    from safetensors.torch import load_file, save_file

    tuned, _, base = flux
    file = tmp_path / "flux1-tuned.safetensors"
    write_flux_single_file(tuned, file)
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in load_file(str(file)).items()}
    save_file(fp8, str(file))
    _convert(file, base, tmp_path / "out")
    loaded = load_model(str(tmp_path / "out")).pipe.transformer
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    for key, value in tuned.state_dict().items():
        expected = value.to(torch.float8_e4m3fn).float()
        assert torch.equal(loaded.state_dict()[key], expected), key
