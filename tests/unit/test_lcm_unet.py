"""LCM-distilled UNets: the guidance scale goes in as `timestep_cond`, with no CFG batch.

A UNet whose config sets time_cond_proj_dim (LCM-SDXL, LCM-SSD-1B, LCM-Dreamshaper) adds
cond_proj(timestep_cond) to its time embedding; called without it, it silently runs as if
unguided. diffusers' SD/SDXL pipelines pass get_guidance_scale_embedding(guidance - 1)
and skip classifier-free guidance; the export, the manifest and the runtime must too.
"""

from __future__ import annotations

import json

import numpy as np
import pydantic
import pytest
import torch
from diffusers import StableDiffusionPipeline
from slimdiff.runtime.manifest import PipelineSpec

from slimdiff.models import get_arch
from slimdiff.models.kinds import extra_inputs, guidance_embedding


@pytest.mark.parametrize("dim", [256, 24, 7])
def test_embedding_matches_diffusers(dim):
    w = np.array([0.0, 1.5, 7.0, 14.0], np.float32)
    # a method that reads no pipeline state: called unbound
    ref = StableDiffusionPipeline.get_guidance_scale_embedding(
        None, torch.from_numpy(w), embedding_dim=dim
    ).numpy()
    ours = guidance_embedding(w, dim)
    assert ours.shape == (4, dim) and ours.dtype == np.float32
    # Ours rounds each float32 step correctly; torch's float32 exp is an ulp off for one
    # frequency of these (the sin and cos columns of it), which at w * 1000 = 1.4e4 rad
    # moves the sinusoid by up to 8e-4. Every other value agrees to float32 rounding.
    off = np.abs(ours - ref) > 1e-5
    assert off.any(axis=0).sum() <= 2, np.flatnonzero(off.any(axis=0))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-3)
    if dim % 2:
        assert (ours[:, -1] == 0).all()


def test_extra_input_is_the_embedding_of_guidance_minus_one():
    feeds = extra_inputs(
        ("timestep_cond",),
        batch=2,
        height=64,
        width=64,
        vae_scale=8,
        packing=1,
        text_len=77,
        guidance=8.0,
        embedding_dim=32,
    )
    expected = guidance_embedding(np.array([7.0, 7.0], np.float32), 32)
    np.testing.assert_array_equal(feeds["timestep_cond"], expected)
    with pytest.raises(ValueError, match="width"):
        extra_inputs(
            ("timestep_cond",), batch=1, height=8, width=8, vae_scale=8, packing=1, text_len=1
        )


@pytest.mark.parametrize(
    ("family", "extra"), [("sd15", ("timestep_cond",)), ("sdxl", ("time_ids", "timestep_cond"))]
)
def test_kind_and_guidance_follow_the_config(family, extra):
    arch = get_arch(family)
    plain = {"time_cond_proj_dim": None, "in_channels": 4, "cross_attention_dim": 32}
    lcm = {**plain, "time_cond_proj_dim": 256}
    assert "timestep_cond" not in arch.kind_for(plain).extra_inputs
    assert arch.kind_for(plain).guidance_embedding_dim is None
    assert arch.uses_cfg_for(plain)
    kind = arch.kind_for(lcm)
    assert kind.extra_inputs == extra and kind.guidance_embedding_dim == 256
    assert kind.embeds_guidance and not arch.uses_cfg_for(lcm)
    assert "timestep_cond" in [s.name for s in arch.present_inputs(lcm)]
    # no field for the plain UNet's manifest: its bytes (and identity) stay as they were
    assert "guidance_embedding_dim" not in arch.kind_for(plain).model_dump()
    assert kind.model_dump()["guidance_embedding_dim"] == 256


@pytest.fixture(scope="module")
def lcm_pipeline_record():
    """The manifest's `pipeline` record of tiny:sd15 with an LCM UNet, as export writes it."""
    from diffusers import UNet2DConditionModel
    from slimdiff.export.bundle import pipeline_constants

    from slimdiff.models import load_model

    model = load_model("tiny:sd15")
    config = {k: v for k, v in model.pipe.unet.config.items() if not k.startswith("_")}
    model.pipe.unet = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": 16})
    return json.loads(pipeline_constants(model).model_dump_json())


def test_pipeline_record(lcm_pipeline_record):
    record = lcm_pipeline_record
    assert record["uses_cfg"] is False
    assert record["kind"]["extra_inputs"] == ["timestep_cond"]
    assert record["kind"]["guidance_embedding_dim"] == 16
    assert PipelineSpec.model_validate_json(json.dumps(record), strict=True).kind.embeds_guidance


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["kind"].pop("guidance_embedding_dim"), "set with the timestep_cond input"),
        (lambda r: r["kind"].update(extra_inputs=[]), "set with the timestep_cond input"),
        (lambda r: r.update(uses_cfg=True), "takes the guidance scale as an input"),
    ],
)
def test_inconsistent_records_are_refused(lcm_pipeline_record, edit, message):
    record = json.loads(json.dumps(lcm_pipeline_record))
    edit(record)
    with pytest.raises(pydantic.ValidationError, match=message):
        PipelineSpec.model_validate_json(json.dumps(record), strict=True)
