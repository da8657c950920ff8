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
from tests.ldm_checkpoint import write_sd15_single_file, write_sdxl_single_file


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


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("model.bin", r"model.bin is a pickled checkpoint .*--allow-pickle"),
        ("model.py", r"a single-file checkpoint is a .safetensors file .*not .py"),
        ("model.SAFETENSORS", r"by its lowercase suffix; rename it to model.safetensors"),
    ],
)
def test_files_diffusers_would_unpickle_are_refused(checkpoint, tmp_path, name, fragment):
    """diffusers torch.loads any file not named `.safetensors`: only pickles given
    --allow-pickle reach it."""
    _, base, file = checkpoint
    (tmp_path / name).write_bytes(file.read_bytes())
    with pytest.raises(UserError, match=fragment):
        load_single_file(tmp_path / name, config=str(base))


def test_incomplete_files_and_other_architectures_are_refused(checkpoint, tmp_path):
    _, base, file = checkpoint
    state = load_file(str(file))
    cases = [
        ("final_layer_norm", "text_encoder lacks 2 of its weights"),
        ("model.diffusion_model.out.2", "some weights of its model are not in the file"),
    ]
    for dropped, fragment in cases:
        part = tmp_path / "part.safetensors"
        save_file({k: v for k, v in state.items() if dropped not in k}, str(part))
        with pytest.raises(UserError, match=fragment):
            load_single_file(part, config=str(base))
    sdxl = tmp_path / "sdxl"
    load_model("tiny:sdxl").pipe.save_pretrained(sdxl)
    result = CliRunner().invoke(
        main, ["convert", str(file), "--config", str(sdxl), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "weights do not fit the StableDiffusionXLPipeline" in result.output
    assert not (tmp_path / "o").exists()


def _sdxl_with_a_wider_bigg():
    """tiny:sdxl with text_encoder_2 wider than text_encoder, as in SDXL (768 vs 1280):
    diffusers tells the two encoders of a single file apart by their widths."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    pipe = load_model("tiny:sdxl").pipe
    wide = {**pipe.text_encoder_2.config.to_dict(), "hidden_size": 48, "projection_dim": 48}
    torch.manual_seed(0)
    bigg = CLIPTextModelWithProjection(type(pipe.text_encoder_2.config)(**wide))
    unet_config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
    unet_config["cross_attention_dim"] = pipe.text_encoder.config.hidden_size + 48
    unet_config["projection_class_embeddings_input_dim"] = (
        6 * unet_config["addition_time_embed_dim"] + 48
    )
    return StableDiffusionXLPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        text_encoder_2=bigg,
        tokenizer_2=pipe.tokenizer_2,
        unet=UNet2DConditionModel(**unet_config),
        scheduler=pipe.scheduler,
    )


def test_sdxl_single_file_converts_with_both_text_encoders(tmp_path):
    """SDXL fine-tunes' layout: CLIP-L under conditioner.embedders.0, OpenCLIP bigG (q, k, v
    joined) under conditioner.embedders.1; the pipeline class comes from the config folder."""
    pipe = _sdxl_with_a_wider_bigg()
    pipe.save_pretrained(tmp_path / "base")
    write_sdxl_single_file(pipe, tmp_path / "tuned.safetensors")
    keys = load_file(str(tmp_path / "tuned.safetensors"))
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    out = tmp_path / "converted"
    args = ["convert", str(tmp_path / "tuned.safetensors"), "--config", str(tmp_path / "base")]
    done = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert "sdxl (StableDiffusionXLPipeline)" in done.output
    converted = load_model(str(out)).pipe
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        left, right = getattr(pipe, name).state_dict(), getattr(converted, name).state_dict()
        assert left.keys() == right.keys(), name
        for key, value in left.items():
            assert torch.equal(value, right[key].reshape(value.shape)), (name, key)
