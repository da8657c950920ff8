"""A run without `strength` takes the default of the diffusers pipeline that runs the
model the same way (image-to-image, inpainting, with a ControlNet), as the bundle
records it; bundles exported before the record keep the earlier defaults."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import diffusers
import pytest
from slimdiff.export.bundle import pipeline_constants
from slimdiff.runtime.img2img import default_strength

from slimdiff.models import load_model
from slimdiff.models.families import get_arch

# family -> diffusers' (image-to-image, inpaint) pipelines, then its ControlNet ones
PIPELINES = {
    "sd15": (
        ("StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
        ("StableDiffusionControlNetImg2ImgPipeline", "StableDiffusionControlNetInpaintPipeline"),
    ),
    "sdxl": (
        ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"),
        (
            "StableDiffusionXLControlNetImg2ImgPipeline",
            "StableDiffusionXLControlNetInpaintPipeline",
        ),
    ),
    "sd3": (("StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"), None),
    "flux": (("FluxImg2ImgPipeline", "FluxInpaintPipeline"), None),
}


def _defaults(names: tuple[str, str]) -> tuple[float, float]:
    return tuple(  # type: ignore[return-value]
        inspect.signature(getattr(diffusers, n).__call__).parameters["strength"].default
        for n in names
    )


@pytest.mark.parametrize("family", sorted(PIPELINES))
def test_the_families_defaults_are_diffusers_own(family):
    arch = get_arch(family)
    plain, controlled = PIPELINES[family]
    assert arch.default_strength == _defaults(plain)
    if controlled is not None:
        assert (arch.controlnet_strength or arch.default_strength) == _defaults(controlled)


@pytest.mark.parametrize(
    "model, controlnets, expected",
    [
        ("tiny:sd15", 0, (0.8, 1.0)),
        ("tiny:sdxl", 0, (0.3, 0.9999)),
        ("tiny:sdxl", 1, (0.8, 0.9999)),
        ("tiny:sdxl-refiner", 0, (0.3, 0.9999)),
        ("tiny:flux", 0, (0.6, 0.6)),
    ],
)
def test_the_bundle_records_them_and_the_runtime_takes_them(model, controlnets, expected):
    fake = [SimpleNamespace(config={})] * controlnets
    config = pipeline_constants(load_model(model, device="meta"), fake)
    assert (config.default_strength.image, config.default_strength.inpaint) == expected
    assert default_strength(config, inpaint=False) == expected[0]
    assert default_strength(config, inpaint=True) == expected[1]
    assert "default_strength" in config.model_dump(mode="json")


@pytest.mark.parametrize("model, expected", [("tiny:sd15", 0.8), ("tiny:sdxl-refiner", 0.3)])
def test_bundles_without_the_record_keep_the_earlier_defaults(model, expected):
    config = pipeline_constants(load_model(model, device="meta"))
    older = config.model_copy(update={"default_strength": None})
    assert "default_strength" not in older.model_dump(mode="json")
    assert default_strength(older, inpaint=False) == default_strength(older, True) == expected
