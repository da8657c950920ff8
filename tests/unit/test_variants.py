"""Folders of variant weights only (a download of `*.fp16.*` files) and of fp16 tensors
load as float32 on every route, as the same weights in plain files do; a folder whose
component holds two variants and no plain weights is refused, naming them, instead of
one being taken silently."""

from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner

from slimdiff.cli import main
from slimdiff.errors import UserError
from slimdiff.models import load_model

PARTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    pipe = load_model("tiny:sd15").pipe.to(torch.float16)
    pipe.save_pretrained(root / "fp16-variant", variant="fp16")
    pipe.save_pretrained(root / "fp16-plain")
    return root, {n: getattr(pipe, n).float().state_dict() for n in PARTS}


@pytest.mark.parametrize("name", ["fp16-variant", "fp16-plain"])
@pytest.mark.parametrize("weights", ["memory", "lazy"])
def test_they_load_as_float32_with_their_values(folders, name, weights):
    from slimdiff.models.lazy import materialize

    root, want = folders
    files = [f.name for f in (root / name / "unet").glob("*.safetensors")]
    variant = name == "fp16-variant"
    assert files == [f"diffusion_pytorch_model{'.fp16' if variant else ''}.safetensors"]
    pipe = load_model(str(root / name), weights=weights).pipe
    for part in PARTS:
        module = getattr(pipe, part)
        state = (materialize(module) if weights == "lazy" else module).state_dict()
        floats = [v for v in state.values() if v.is_floating_point()]
        assert {v.dtype for v in floats} == {torch.float32}, part
        assert all(torch.equal(state[k], v) for k, v in want[part].items()), part


def test_a_variant_folder_exports_from_memory(folders, tmp_path):
    root, _ = folders
    out = tmp_path / "b"
    args = ["export", str(root / "fp16-variant"), "--out", str(out), "--weights", "memory"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output


def test_two_variants_without_plain_weights_are_refused(folders, tmp_path):
    root, _ = folders
    folder = tmp_path / "two"
    shutil.copytree(root / "fp16-variant", folder)
    unet = folder / "unet"
    shutil.copy(
        unet / "diffusion_pytorch_model.fp16.safetensors",
        unet / "diffusion_pytorch_model.non_ema.safetensors",
    )
    for weights in ("memory", "lazy"):
        with pytest.raises(UserError, match=r"unet: holds weights of the variants fp16, non_ema"):
            load_model(str(folder), weights=weights)
    (unet / "diffusion_pytorch_model.fp16.safetensors").unlink()  # unet non_ema, others fp16
    with pytest.raises(UserError, match=r"of different variants \(fp16, non_ema\)"):
        load_model(str(folder))
