"""Components no bundle runs (SD1.x's safety checker, IP-Adapters' image encoder and
processors) are never loaded, whatever model_index.json says and whatever their folders
hold: missing (a download that left them out), pickled, or damaged."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from slimdiff.cli import main
from slimdiff.models import load_model

UNUSED = {
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """tiny:sd15 as runwayml's SD1.5 repo lists it; the checker's folder holds a pickle
    that is no valid file either, the others are not there."""
    root = tmp_path_factory.mktemp("sd15") / "pipe"
    load_model("tiny:sd15").pipe.save_pretrained(root)
    index = json.loads((root / "model_index.json").read_text())
    index.update(UNUSED, requires_safety_checker=True)
    (root / "model_index.json").write_text(json.dumps(index))
    (root / "safety_checker").mkdir()
    (root / "safety_checker" / "pytorch_model.bin").write_bytes(b"not a pickle")
    return root


@pytest.mark.parametrize("weights", ["memory", "lazy"])
def test_they_are_never_loaded(folder, weights):
    model = load_model(str(folder), weights=weights)
    assert model.arch.family == "sd15"
    for name in UNUSED:
        assert getattr(model.pipe, name, None) is None


def test_the_folder_exports(folder, tmp_path):
    """Streamed (the memory route loads as test_they_are_never_loaded does)."""
    out = tmp_path / "b"
    args = ["export", str(folder), "--out", str(out), "--weights", "stream"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["components"]) == {"text_encoder", "unet", "vae_decoder"}


def test_a_single_file_converts_with_such_a_config_folder(folder, tmp_path):
    """runwayml's layout as --config: the file's model, no checker looked for."""
    from tests.ldm_checkpoint import write_sd15_single_file

    file = tmp_path / "tuned.safetensors"
    write_sd15_single_file(load_model("tiny:sd15").pipe, file)
    out = tmp_path / "out"
    args = ["convert", str(file), "--config", str(folder), "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    pipe = load_model(str(out)).pipe
    assert pipe.safety_checker is None and pipe.feature_extractor is None


def test_entries_the_pipeline_does_not_take_are_ignored(folder, tmp_path):
    """An entry diffusers' pipeline class has no parameter for (a stray "watermarker"),
    its folder absent: ignored, as from_pretrained ignores it."""
    import shutil

    copy = tmp_path / "pipe"
    shutil.copytree(folder, copy)
    index = json.loads((copy / "model_index.json").read_text())
    index["watermarker"] = ["diffusers", "StableDiffusionXLWatermarker"]
    (copy / "model_index.json").write_text(json.dumps(index))
    for weights in ("memory", "lazy"):
        assert load_model(str(copy), weights=weights).arch.family == "sd15"


def test_inspect_takes_allow_pickle(folder, tmp_path):
    """inspect reads a pickled component with --allow-pickle, as export does, and its
    refusal without names that option."""
    import shutil

    import torch
    from safetensors.torch import load_file

    copy = tmp_path / "pipe"
    shutil.copytree(folder, copy)
    vae = copy / "vae"
    state = load_file(vae / "diffusion_pytorch_model.safetensors")
    (vae / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, vae / "diffusion_pytorch_model.bin")
    refused = CliRunner().invoke(main, ["inspect", str(copy)])
    assert refused.exit_code == 2 and "has only pickled weights" in refused.output
    assert "--allow-pickle" in refused.output
    allowed = CliRunner().invoke(main, ["inspect", str(copy), "--allow-pickle"])
    assert allowed.exit_code == 0, allowed.output
