"""The compress-then-export flow caches by what the model is, not by its name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slimdiff.app.flow import compress_and_export
from slimdiff.models import load_model
from slimdiff.recipe import validate_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_retrained_folder_at_the_same_path_is_compressed_again(tmp_path):
    folder = tmp_path / "model"
    load_model("tiny:sd3").pipe.save_pretrained(folder, safe_serialization=True)
    recipe = validate_recipe({"model": str(folder), "export": {"optimize": False}})
    first = compress_and_export(recipe, tmp_path / "out")
    assert first.reused == []
    again = compress_and_export(recipe, tmp_path / "out")
    assert again.reused == ["compress", "export:onnx"]
    retrained = load_model(str(folder))
    with torch.no_grad():
        retrained.pipe.transformer.proj_out.bias.add_(1e-3)
    retrained.pipe.save_pretrained(folder, safe_serialization=True)  # same path, new weights
    third = compress_and_export(recipe, tmp_path / "out")
    assert third.reused == []
    artifact = load_model(str(third.artifact)).pipe.transformer.proj_out.bias
    torch.testing.assert_close(artifact, retrained.pipe.transformer.proj_out.bias, rtol=0, atol=0)


def test_export_keys_added_later_keep_earlier_recipes_hashes(tmp_path):
    """A recipe that leaves scheduler, sigmas, timestep_spacing, vae_encoder and controlnet
    unset hashes as it did before those keys existed (its cached bundle is reused);
    setting one makes another bundle. A ControlNet is hashed by its files, not its path.
    The versions of slimdiff, onnxruntime (which writes the optimized graphs) and torch (which
    traces them) count."""
    import json

    import onnxruntime
    import torch

    from slimdiff.app.flow import _hash, export_hash

    recipe = validate_recipe({"model": "tiny:sd15"})
    before = {
        k: v
        for k, v in recipe.export.model_dump(mode="json").items()
        if k not in ("scheduler", "sigmas", "timestep_spacing", "vae_encoder", "controlnet")
    }
    import slimdiff

    versions = {
        "slimdiff": slimdiff.__version__,
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
    }
    key = {"compress": "c", "target": "onnx", **versions, **before}
    assert export_hash("c", recipe, "onnx") == _hash(key)
    folders = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
        folders.append(str(folder))
    hashes = {export_hash("c", recipe, "onnx")}
    changes = [
        ("vae_encoder", True),
        ("sigmas", "karras"),
        ("scheduler", "euler"),
        ("timestep_spacing", "trailing"),
    ]
    for key, value in [*changes, ("controlnet", folders[0])]:
        changed = validate_recipe({"model": "tiny:sd15", "export": {key: value}})
        hashes.add(export_hash("c", changed, "onnx"))
    assert len(hashes) == 6  # each change, and none
    # the same files elsewhere: the same bundle; other weights: another
    same = validate_recipe({"model": "tiny:sd15", "export": {"controlnet": folders[1]}})
    assert export_hash("c", same, "onnx") in hashes
    # two ControlNets: another bundle than either alone
    both = validate_recipe({"model": "tiny:sd15", "export": {"controlnet": folders}})
    assert export_hash("c", both, "onnx") not in hashes
    (Path(folders[1]) / "diffusion_pytorch_model.safetensors").write_bytes(b"retrained")
    assert export_hash("c", same, "onnx") not in hashes


def test_a_recipe_asks_for_the_vae_encoder(tmp_path):
    import json

    recipe = validate_recipe(
        {"model": "tiny:sd15", "export": {"optimize": False, "vae_encoder": True}}
    )
    result = compress_and_export(recipe, tmp_path / "out")
    manifest = json.loads((result.bundles["onnx"] / "manifest.json").read_text())
    assert list(manifest["components"]) == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]


def test_a_recipe_with_another_familys_controlnet_is_refused_before_compressing(tmp_path):
    """The ControlNet's config against the model's UNet, before any pass runs: nothing
    written, no folder left."""
    from diffusers import ControlNetModel

    from slimdiff.errors import UserError

    sdxl = load_model("tiny:sdxl")
    folder = tmp_path / "cn"
    ControlNetModel.from_unet(sdxl.denoiser).save_config(folder)  # its config is enough
    recipe = validate_recipe({"model": "tiny:sd15", "export": {"controlnet": str(folder)}})
    with pytest.raises(UserError, match="it is a ControlNet for another model"):
        compress_and_export(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [5, "", " ", [5], [["a"]], True, {"a": 1}, ["a"] * 5])
def test_export_controlnet_takes_paths(value):
    from slimdiff.errors import UserError

    with pytest.raises(UserError, match=r"export\.controlnet"):
        validate_recipe({"model": "tiny:sd15", "export": {"controlnet": value}})


def test_a_bad_prompts_file_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """calibration.prompts saved as UTF-16: compress and bench stop before loading the model
    (calibration used to read it after the load and the teacher's set-up), naming the key.
    A recipe whose passes do not calibrate never reads it, so it is not refused."""
    from click.testing import CliRunner

    import slimdiff.models
    from slimdiff.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a cat\na dog\n".encode("utf-16"))
    quest = {"pass": "quant.quest", "weights": "int8", "method": "minmax"}
    calibration = {"prompts": str(prompts), "num_prompts": 2, "steps": 2}

    def no_loading(*_args, **_kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(slimdiff.models, "load_model", no_loading)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: tiny:sd15\ncalibration: {calibration}\npasses: [{quest}]\n".replace("'", '"')
    )
    for command in ("compress", "bench"):
        result = CliRunner().invoke(main, [command, str(recipe), "--out", str(tmp_path / "o")])
        assert result.exit_code == 2, result.output
        assert f"calibration.prompts: {prompts}: saved as UTF-16" in result.output, command
    plain = validate_recipe({"model": "tiny:sd15", "calibration": calibration})
    from slimdiff.app.flow import check_input_files

    check_input_files(plain)  # no pass calibrates: nothing reads the file
