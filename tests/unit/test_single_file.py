"""Single-file checkpoints (A1111/ComfyUI .safetensors): `slimdiff convert` and load_model.

The checkpoint is tiny:sd15 written in the original (LDM) layout by tests/ldm_checkpoint.py;
no hub file can be fetched here, so the config comes from a folder the test saves.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from slimdiff.cli import main
from slimdiff.errors import UserError
from slimdiff.models import load_model
from slimdiff.models.single_file import load_single_file
from tests.ldm_checkpoint import write_sd15_single_file


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(tiny:sd15, its diffusers folder for the config, its single-file checkpoint)."""
    root = tmp_path_factory.mktemp("single")
    model = load_model("tiny:sd15")
    model.pipe.save_pretrained(root / "base")
    write_sd15_single_file(model.pipe, root / "tuned.safetensors")
    return model, root / "base", root / "tuned.safetensors"


def _same_weights(a, b) -> None:
    for name in ("unet", "vae", "text_encoder"):
        left, right = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert left.keys() == right.keys(), name
        for key, value in left.items():
            assert torch.equal(value, right[key].reshape(value.shape)), (name, key)


def test_convert_writes_a_folder_every_command_takes(checkpoint, tmp_path):
    model, base, file = checkpoint
    keys = load_file(str(file))
    assert any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in keys)
    out = tmp_path / "converted"
    done = CliRunner().invoke(
        main, ["convert", str(file), "--config", str(base), "--out", str(out)]
    )
    assert done.exit_code == 0, done.output
    assert "sd15 (StableDiffusionPipeline)" in done.output
    for weights in ("memory", "lazy"):
        loaded = load_model(str(out), weights=weights)
        assert loaded.arch.family == "sd15"
    _same_weights(model.pipe, load_model(str(out)).pipe)
    # again over its own output: replaced; over a user's folder: refused before the load
    again = CliRunner().invoke(
        main, ["convert", str(file), "--config", str(base), "--out", str(out)]
    )
    assert again.exit_code == 0, again.output
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    refused = CliRunner().invoke(
        main, ["convert", str(file), "--config", str(base), "--out", str(mine)]
    )
    assert refused.exit_code == 2 and (mine / "notes.txt").read_text() == "keep"


def test_load_single_file_with_a_local_config(checkpoint):
    model, base, file = checkpoint
    pipe = load_single_file(file, config=str(base))
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    _same_weights(model.pipe, pipe)


def test_direct_load_without_a_reachable_config_says_convert(checkpoint, monkeypatch):
    _, _, file = checkpoint
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # diffusers' default config is on the hub
    with pytest.raises(UserError, match=r"slimdiff convert FILE --config DIR --out FOLDER"):
        load_model(str(file))


def test_what_is_not_a_whole_model_is_refused(checkpoint, tmp_path):
    _, base, file = checkpoint
    unet_only = {k: v for k, v in load_file(str(file)).items() if k.startswith("first_stage")}
    save_file(unet_only, str(tmp_path / "vae.safetensors"))
    with pytest.raises(UserError, match="not a text-to-image model slimdiff supports"):
        load_single_file(tmp_path / "vae.safetensors", config=str(base))
    (tmp_path / "old.ckpt").write_bytes(b"not read")
    with pytest.raises(UserError, match=r"pickled checkpoint.*--allow-pickle"):
        load_model(str(tmp_path / "old.ckpt"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_model(str(tmp_path / "broken.safetensors"))
