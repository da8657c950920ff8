"""A denoiser alone in diffusers' key layout, in one file (SDXL-Lightning's UNet file, a
FLUX transformer's state dict): `slimdiff convert FILE --config DIR` gives DIR's pipeline
with the file's denoiser (slimdiff/models/denoiser_file.py)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from slimdiff.cli import main
from slimdiff.errors import UserError
from slimdiff.models import load_model
from slimdiff.models.single_file import load_single_file
from tests.ldm_checkpoint_mmdit import same_weights


@pytest.fixture(scope="module", params=["sdxl", "flux"])
def base(request, tmp_path_factory):
    """(the base pipeline, its folder, a "distilled" denoiser: every weight moved)."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    pipe = load_model(f"tiny:{family}").pipe
    pipe.save_pretrained(root / "base")
    tuned = load_model(f"tiny:{family}").denoiser
    with torch.no_grad():
        for weight in tuned.parameters():
            weight.add_(0.5)
    return pipe, root / "base", tuned


@pytest.mark.parametrize("prefix", ["", "unet."], ids=["plain", "prefixed"])
def test_a_denoiser_file_takes_the_rest_from_the_config(base, tmp_path, prefix):
    pipe, folder, tuned = base
    name = "unet" if hasattr(pipe, "unet") else "transformer"
    prefix = prefix and f"{name}."
    file = tmp_path / "distilled.safetensors"
    # saved in fp16, as such files usually are: loaded into the float32 model
    save_file({prefix + k: v.half() for k, v in tuned.state_dict().items()}, str(file))
    out = tmp_path / "out"
    args = ["convert", str(file), "--config", str(folder), "--out", str(out)]
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0, done.output
    loaded = load_model(str(out)).pipe
    denoiser = getattr(loaded, name)
    for key, value in tuned.state_dict().items():
        assert torch.equal(denoiser.state_dict()[key], value.half().float()), key
    assert denoiser.dtype == torch.float32
    for other in ("vae", "text_encoder", "text_encoder_2"):
        same_weights(getattr(pipe, other), getattr(loaded, other))


def test_another_size_and_other_components_are_refused(tmp_path):
    pipe = load_model("tiny:sd15").pipe
    folder = tmp_path / "base"
    pipe.save_pretrained(folder)
    config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
    widths = tuple(2 * c for c in config["block_out_channels"])
    wider = UNet2DConditionModel(**{**config, "block_out_channels": widths})
    file = tmp_path / "wider.safetensors"
    save_file(wider.state_dict(), str(file))
    with pytest.raises(UserError, match=r"a UNet2DConditionModel of another size than --config"):
        load_single_file(file, config=str(folder))
    vae = tmp_path / "vae.safetensors"
    save_file(pipe.vae.state_dict(), str(vae))
    with pytest.raises(UserError, match=r"not a text-to-image model slimdiff supports"):
        load_single_file(vae, config=str(folder))
