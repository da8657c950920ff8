"""SD3's transformer holds positions for pos_embed_max_size patches a side: a larger size
is refused in one line by inspect, by export's shape range and by the runtime (the bundle
records the limit), instead of diffusers' ValueError or onnxruntime's failure mid-run."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from slimdiff.export.bundle import pipeline_constants
from slimdiff.export.profiles import size_range
from slimdiff.runtime import Text2ImagePipeline

from slimdiff.cli import main
from slimdiff.errors import UserError
from slimdiff.models import load_model


@pytest.mark.parametrize(
    ("model", "side"), [("tiny:sd3", 512), ("random:sd3", 3072), ("tiny:sdxl", None)]
)
def test_the_limit_comes_from_the_config(model, side):
    loaded = load_model(model, device="meta")
    assert loaded.max_side == side
    record = pipeline_constants(loaded).model_dump(mode="json")
    assert record.get("max_side") == side


def test_export_ranges_stay_inside_it():
    model = load_model("tiny:sd3", device="meta")
    with pytest.raises(UserError, match=r"max size 1024x640: .* sides up to 512 px"):
        size_range(model, max_size=(640, 1024))
    assert max(size_range(model).max_size) <= 512
    assert size_range(model, max_size=(512, 512)).max_size == (512, 512)


def test_inspect_and_the_runtime_refuse_beyond_it(tiny_bundle):
    result = CliRunner().invoke(main, ["inspect", "random:sd3", "--size", "4096x4096"])
    assert result.exit_code == 2
    assert "sides up to 3072 px (pos_embed_max_size); use at most 3072x3072" in result.output
    _, bundle = tiny_bundle("sd3")
    pipe = Text2ImagePipeline.from_bundle(bundle)
    assert pipe.config.max_side == 512
    with pytest.raises(UserError, match=r"size 1024x512: each side must be 16 to 512 pixels"):
        pipe("a cat", size=(512, 1024), steps=1)


@pytest.mark.parametrize(("family", "applies"), [("sd15", False), ("sdxl", False), ("sd3", True)])
def test_the_vae_shift_is_recorded_where_the_familys_pipeline_decodes_with_it(family, applies):
    """SD3/FLUX pipelines decode latents / scaling + shift_factor; SD1.5/SDXL pipelines
    ignore a shift_factor in the VAE config (a FLUX-style VAE swapped in), so must a run."""
    model = load_model(f"tiny:{family}")
    model.pipe.vae.register_to_config(shift_factor=0.1159)
    shift = pipeline_constants(model).vae_shift_factor
    assert shift == (pytest.approx(0.1159) if applies else None)
