"""save_pipeline: a saved pipeline reloads with the same defaulted keys as its source, so
what the exporter and the scheduler switch read from `_use_default_values` survives
compress (artifacts) and convert."""

from __future__ import annotations

import json

import diffusers
import pytest

from slimdiff.models import load_model
from slimdiff.models.saving import save_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _without(folder, component: str, file: str, key: str) -> None:
    path = folder / component / file
    data = json.loads(path.read_text())
    data.pop(key)
    path.write_text(json.dumps(data))


def test_keys_the_source_left_out_stay_out_and_changed_ones_stay_in(tmp_path):
    from slimdiff.export.bundle import component_precisions

    load_model("tiny:sd15").pipe.save_pretrained(tmp_path / "hub")
    # as SD1.5's hub folder: no force_upcast (reads True), PNDM without timestep_spacing
    _without(tmp_path / "hub", "vae", "config.json", "force_upcast")
    _without(tmp_path / "hub", "scheduler", "scheduler_config.json", "timestep_spacing")
    _without(tmp_path / "hub", "unet", "config.json", "upcast_attention")
    model = load_model(str(tmp_path / "hub"))
    assert component_precisions(model, "fp16", None)["vae_decoder"] == "fp16"
    # a pass that sets a defaulted key to another value: it must stay written
    assert "upcast_attention" in model.pipe.unet.config["_use_default_values"]
    model.pipe.unet.register_to_config(upcast_attention=True)
    save_pipeline(model.pipe, tmp_path / "saved")
    vae = json.loads((tmp_path / "saved" / "vae" / "config.json").read_text())
    scheduler = json.loads((tmp_path / "saved" / "scheduler" / "scheduler_config.json").read_text())
    assert "force_upcast" not in vae and "timestep_spacing" not in scheduler
    again = load_model(str(tmp_path / "saved"))
    assert component_precisions(again, "fp16", None)["vae_decoder"] == "fp16"
    assert "timestep_spacing" in again.pipe.scheduler.config["_use_default_values"]
    assert again.pipe.unet.config.upcast_attention is True
    # what plain save_pretrained does, for contrast: the key comes back as set on purpose
    model.pipe.save_pretrained(tmp_path / "plain")
    plain = load_model(str(tmp_path / "plain"))
    assert component_precisions(plain, "fp16", None)["vae_decoder"] == "fp32"


def test_a_saved_pipeline_reloads_with_the_same_configs(tmp_path):
    """Round trip: every config value and the defaulted keys' list as loaded before."""
    pipe = load_model("tiny:sd15").pipe
    save_pipeline(pipe, tmp_path / "a")
    again = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "a")
    for name in ("vae", "unet", "scheduler"):  # diffusers configs
        before, after = dict(getattr(pipe, name).config), dict(getattr(again, name).config)
        for config in (before, after):
            config.pop("_name_or_path", None)
            config["_use_default_values"] = sorted(config.get("_use_default_values", []))
            for key, value in config.items():  # JSON gives lists where code gave tuples
                config[key] = list(value) if isinstance(value, tuple) else value
        assert after == before, name


def test_an_artifact_component_reads_only_its_weights_files(tmp_path):
    """A rebuilt component (edits replayed) reads diffusion_pytorch_model.safetensors, as
    from_pretrained does, not an EMA copy or other .safetensors left beside it."""
    import torch
    from safetensors.torch import save_file

    from slimdiff.artifact import _read_weights
    from slimdiff.errors import UserError

    folder = tmp_path / "unet"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, str(folder / "diffusion_pytorch_model.safetensors"))
    save_file({"w": torch.zeros(2)}, str(folder / "diffusion_pytorch_model_ema.safetensors"))
    assert torch.equal(_read_weights(folder)["w"], torch.ones(2))
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match=r"no \.safetensors weights; compress the model again"):
        _read_weights(folder)
