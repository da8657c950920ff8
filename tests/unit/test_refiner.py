"""The SDXL refiner's runtime pieces (runtime/refiner.py, KindSpec.aesthetic_score) and how
a refiner is told apart (slimdiff/models/families.py), without a model."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from slimdiff.runtime import schedulers  # noqa: E402
from slimdiff.runtime.refiner import (  # noqa: E402
    check_aesthetic,
    check_fraction,
    end_index,
    start_index,
)

from slimdiff.errors import UserError  # noqa: E402
from slimdiff.models.builtin import parse_builtin  # noqa: E402
from slimdiff.models.families import (  # noqa: E402
    SDXL,
    SDXL_REFINER,
    arch_of_class,
    arch_of_denoiser,
    arch_of_pipeline,
    is_refiner_unet,
    text_to_image_class,
)
from slimdiff.models.kinds import KindSpec, extra_inputs  # noqa: E402
from tests.unit.test_schedulers import (  # noqa: E402
    DPM_CASES,
    EULER_CASES,
    HEUN_CASES,
    KDPM2_CASES,
)

# The published UNet configs' relevant keys (stabilityai/stable-diffusion-xl-*-1.0).
BASE_UNET = {
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "cross_attention_dim": 2048,
}
REFINER_UNET = {
    **BASE_UNET,
    "projection_class_embeddings_input_dim": 2560,
    "cross_attention_dim": 1280,
}

CASES = [
    pytest.param(cls, config, steps, id=f"{cls}-{name}")
    for cls, cases in (
        ("EulerDiscreteScheduler", EULER_CASES),
        ("HeunDiscreteScheduler", HEUN_CASES),
        ("KDPM2DiscreteScheduler", KDPM2_CASES),
        ("DPMSolverMultistepScheduler", DPM_CASES),
    )
    for name, (config, steps) in list(cases.items())[:2]
]
FRACTIONS = (0.5, 0.8, 0.93)


@pytest.mark.parametrize(("cls_name", "config", "steps"), CASES)
@pytest.mark.parametrize("fraction", FRACTIONS)
def test_the_hand_off_cuts_where_diffusers_does(cls_name, config, steps, fraction):
    """start_index against diffusers' own get_timesteps(denoising_start) (second-order
    rule included), end_index against its denoising_end filter, on the same schedules."""
    ref = getattr(diffusers, cls_name).from_config(config)
    ours = schedulers.scheduler_from_config(dict(ref.config, _class_name=cls_name))
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    # KDPM2's interpolated timesteps agree to float32 rounding
    np.testing.assert_allclose(np.asarray(ours.timesteps), ref.timesteps.numpy(), rtol=1e-6)
    train = ref.config.num_train_timesteps
    holder = SimpleNamespace(scheduler=ref)
    img2img = diffusers.StableDiffusionXLImg2ImgPipeline
    ref_steps, count = img2img.get_timesteps(holder, steps, 0.3, "cpu", denoising_start=fraction)
    begin = start_index(ours, fraction, train)
    assert begin == len(ref.timesteps) - count
    np.testing.assert_allclose(np.asarray(ours.timesteps)[begin:], ref_steps.numpy(), rtol=1e-6)
    cutoff = round(train - fraction * train)
    kept = [t for t in ref.timesteps.tolist() if t >= cutoff]
    assert end_index(ours, 0, fraction, train) == len(kept)
    # the base stops where the refiner starts, up to the second-order rule's extra call
    assert begin <= len(kept) <= begin + 1


def test_fractions_that_leave_nothing_are_refused():
    ours = schedulers.scheduler_from_config(
        {"_class_name": "EulerDiscreteScheduler", **EULER_CASES["sdxl-leading"][0]}
    )
    ours.set_timesteps(4)  # 751, 501, 251, 1
    with pytest.raises(UserError, match="leaves no step"):
        start_index(ours, 0.9995, 1000)  # cutoff 0 (rounded): nothing below it
    with pytest.raises(UserError, match="stops before the first step"):
        end_index(ours, 0, 0.2, 1000)  # cutoff 800: 751 is below it
    assert end_index(ours, 1, 0.5, 1000) == 2  # from 501: only 501 is at or above 500
    for bad in (0, 1, -0.5, 1.5):
        with pytest.raises(UserError, match="strictly between 0 and 1"):
            check_fraction(bad, "denoising_end")
    with pytest.raises(UserError, match="not a number"):
        check_fraction("x", "denoising_start")
    assert check_fraction(None, "denoising_start") is None


def test_aesthetic_scores():
    refiner = SimpleNamespace(kind=SDXL_REFINER.kind)
    base = SimpleNamespace(kind=SDXL.kind)
    assert check_aesthetic(refiner, None, None) == (2.5, 6.0)  # diffusers' defaults
    assert check_aesthetic(refiner, 7, 1) == (1.0, 7.0)
    assert check_aesthetic(base, None, None) is None
    with pytest.raises(UserError, match="SDXL refiner only"):
        check_aesthetic(base, 6.0, None)
    for bad, error in ((10.5, "from 0 to 10"), (-1, "from 0 to 10"), (float("inf"), "finite")):
        with pytest.raises(UserError, match=error):
            check_aesthetic(refiner, bad, None)
    for bad in (True, "6"):  # not numbers, though Python converts them
        with pytest.raises(UserError, match=r"aesthetic score .* is not a number"):
            check_aesthetic(refiner, bad, None)
    with pytest.raises(UserError, match=r"^negative aesthetic score nan"):
        check_aesthetic(refiner, None, float("nan"))


def test_the_refiner_time_ids():
    """(height, width, 0, 0, score) per row, as _get_add_time_ids with
    requires_aesthetics_score; SDXL's six ids otherwise."""
    args = {"batch": 4, "height": 96, "width": 64, "vae_scale": 8, "packing": 1, "text_len": 77}
    ids = extra_inputs(("time_ids",), **args, aesthetic=np.array([2.5, 2.5, 6, 6]))["time_ids"]
    expected = [[96, 64, 0, 0, 2.5]] * 2 + [[96, 64, 0, 0, 6.0]] * 2
    np.testing.assert_array_equal(ids, np.array(expected, np.float32))
    six = extra_inputs(("time_ids",), **args)["time_ids"]
    assert six.shape == (4, 6) and six[0].tolist() == [96, 64, 0, 0, 96, 64]


def test_the_kind_record():
    kind = SDXL_REFINER.kind_for(REFINER_UNET)
    assert kind.aesthetic_score is True
    assert "aesthetic_score" in kind.model_dump()
    # written only when set: SDXL base's manifests are unchanged
    assert "aesthetic_score" not in SDXL.kind_for(BASE_UNET).model_dump()
    assert KindSpec.model_validate(kind.model_dump()) == kind
    with pytest.raises(ValueError):
        KindSpec.model_validate({**kind.model_dump(), "aesthetic_score": False})


def test_telling_the_refiner_apart():
    assert is_refiner_unet(REFINER_UNET) and not is_refiner_unet(BASE_UNET)
    assert not is_refiner_unet({"addition_embed_type": None})
    assert SDXL_REFINER.config_axis("P", REFINER_UNET) == 1280
    assert SDXL.config_axis("P", BASE_UNET) == 1280
    shapes = {s.name: s.shape for s in SDXL_REFINER.denoiser_inputs}
    assert shapes["time_ids"] == ("B", 5) and shapes["text_embeds"] == ("B", "P")
    assert arch_of_denoiser("UNet2DConditionModel", REFINER_UNET) is SDXL_REFINER
    assert arch_of_denoiser("UNet2DConditionModel", BASE_UNET) is SDXL
    refiner_index = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline",
        "requires_aesthetics_score": True,
    }
    name = text_to_image_class(refiner_index["_class_name"], refiner_index)
    assert name == "StableDiffusionXLImg2ImgPipeline" and arch_of_class(name) is SDXL_REFINER
    # an SDXL saved by its img2img pipeline loads as SDXL's own
    plain = {"_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": False}
    assert text_to_image_class(plain["_class_name"], plain) == "StableDiffusionXLPipeline"
    assert text_to_image_class("StableDiffusionXLImg2ImgPipeline") == "StableDiffusionXLPipeline"


def test_a_refiner_layout_with_a_first_encoder_is_refused():
    class StableDiffusionXLImg2ImgPipeline:  # the class name is what arch_of_pipeline reads
        def __init__(self, text_encoder):
            self.config = {"requires_aesthetics_score": True}
            self.text_encoder = text_encoder

    with pytest.raises(UserError, match="text_encoder null"):
        arch_of_pipeline(StableDiffusionXLImg2ImgPipeline(object()))
    assert arch_of_pipeline(StableDiffusionXLImg2ImgPipeline(None)) is SDXL_REFINER


def test_the_builtin_names():
    assert parse_builtin("tiny:sdxl-refiner") == ("tiny", "sdxl-refiner")
    with pytest.raises(UserError, match="sdxl-refiner"):
        parse_builtin("tiny:refiner")
