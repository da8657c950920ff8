"""The SDXL refiner from a bundle reproduces diffusers' StableDiffusionXLImg2ImgPipeline
with requires_aesthetics_score: as image-to-image, and after a base model's
denoising_end as the "ensemble of expert denoisers" (denoising_start on the base's
latents). Final latents within 1e-4 of the denoisers' contribution, images to 40 dB, as in
test_runtime_vs_diffusers.py.
"""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from slimdiff.runtime import Text2ImagePipeline, run_ensemble

from slimdiff.errors import UserError
from slimdiff.models.families import SDXL_REFINER
from tests.integration.test_img2img import _compare, test_image
from tests.integration.test_runtime_vs_diffusers import (
    PROMPT,
    SIZE,
    _assert_close_to_diffusers,
    _psnr,
)

pytestmark = pytest.mark.slow

STEPS = 10  # 0.8 of 10 leading-spaced steps: the base runs 8, the refiner 2
GUIDANCE = 5.0


@pytest.fixture(scope="module")
def refiner(shared_bundle):
    shared = shared_bundle("sdxl-refiner")
    return shared.model, shared.out


def test_the_refiner_loads_exports_and_says_so(refiner):
    model, bundle = refiner
    assert model.arch is SDXL_REFINER and model.arch.family == "sdxl"
    assert [s.name for s in model.text_encoders] == ["text_encoder_2"]
    runtime = Text2ImagePipeline.from_bundle(bundle)
    assert runtime.config.kind.aesthetic_score is True
    assert [r.name for r in runtime.config.text_encoders] == ["text_encoder_2"]
    assert runtime.config.force_zeros_for_empty_prompt is False


@pytest.mark.parametrize(("score", "negative"), [(None, None), (8.0, 1.0)])
def test_refiner_img2img_matches_diffusers(refiner, score, negative):
    model, bundle = refiner
    runtime = Text2ImagePipeline.from_bundle(bundle)
    scores = {"aesthetic_score": score, "negative_aesthetic_score": negative}
    result, ref_image, _ = _compare_scores(model, runtime, scores)
    assert _psnr(result.image, ref_image) >= 40.0


def _compare_scores(model, runtime, scores):
    # diffusers' img2img call takes the scores as keywords: pass them through its __call__
    given = {k: v for k, v in scores.items() if v is not None}
    if not given:
        return _compare(model, "sdxl", runtime, GUIDANCE)
    original = type(model.pipe).__call__

    def with_scores(self, *args, **kwargs):
        return original(self, *args, **{**kwargs, **given})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(model.pipe), "__call__", with_scores)
        return _compare(model, "sdxl", runtime, GUIDANCE, **given)


def test_the_scores_reach_the_time_ids(refiner):
    _, bundle = refiner
    runtime = Text2ImagePipeline.from_bundle(bundle)
    args = {"steps": 4, "guidance": GUIDANCE, "image": test_image(), "strength": 0.5}
    plain = runtime(PROMPT, **args)
    same = runtime(PROMPT, aesthetic_score=6.0, negative_aesthetic_score=2.5, **args)
    other = runtime(PROMPT, aesthetic_score=9.0, **args)
    np.testing.assert_array_equal(plain.latents, same.latents)
    assert np.abs(plain.latents - other.latents).max() > 1e-4
    # the refiner's default strength is diffusers' 0.3: int(4 x 0.3) = 1 step
    assert len(runtime(PROMPT, steps=4, image=test_image()).timings_ms["denoiser_steps"]) == 1


def _diffusers_ensemble(base, ref, noise, scheduler_config, zero=False):
    """diffusers' base (denoising_end) then refiner (denoising_start) on `noise`; the
    refiner's final latents and image, and the base's latents."""
    pipes = (base.pipe, ref.pipe)
    handles = []
    for pipe in pipes:
        pipe.scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(
            scheduler_config
        )
        pipe.set_progress_bar_config(disable=True)
        if zero:
            handles.append(
                pipe.unet.register_forward_hook(
                    lambda _m, _a, out: (torch.zeros_like(out[0]), *out[1:])
                )
            )
    common = {"num_inference_steps": STEPS, "guidance_scale": GUIDANCE}
    handoff = base.pipe(
        PROMPT,
        latents=torch.from_numpy(noise),
        height=SIZE,
        width=SIZE,
        denoising_end=0.8,
        output_type="latent",
        **common,
    ).images
    final = {}

    def keep_last(_pipe, _step, _t, kwargs):
        final["latents"] = kwargs["latents"].numpy().copy()
        return kwargs

    image = ref.pipe(
        PROMPT, image=handoff, denoising_start=0.8, callback_on_step_end=keep_last, **common
    ).images[0]
    for handle in handles:
        handle.remove()
    return final["latents"], np.array(image), handoff.numpy()


@pytest.mark.parametrize("scheduler", [None, "heun", "dpm++2m"])
def test_ensemble_matches_diffusers(shared_bundle, refiner, scheduler):
    """diffusers' base + refiner recipe: the base stops at 0.8 and the refiner continues
    its latents; Heun (two calls per step) exercises the start's second-order rule."""
    base = shared_bundle("sdxl", False)
    ref_model, ref_bundle = refiner
    base_rt = Text2ImagePipeline.from_bundle(base.out, scheduler=scheduler)
    ref_rt = Text2ImagePipeline.from_bundle(ref_bundle, scheduler=scheduler)
    shape = base_rt.conditioning.latent_shape(SIZE, SIZE)
    noise = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    args = (base.model, ref_model, noise)
    ref_latents, ref_image, ref_handoff = _diffusers_ensemble(*args, base_rt.scheduler_config)
    no_model, _, _ = _diffusers_ensemble(*args, base_rt.scheduler_config, zero=True)
    seen = []
    first, second = run_ensemble(
        base_rt,
        ref_rt,
        PROMPT,
        steps=STEPS,
        guidance=GUIDANCE,
        size=(SIZE, SIZE),
        latents=noise,
        on_step=lambda stage, done, total: seen.append((stage, done, total)),
    )
    np.testing.assert_allclose(first.latents, ref_handoff, rtol=0, atol=1e-4)
    assert first.images == [] and second.image.shape == (SIZE, SIZE, 3)
    _assert_close_to_diffusers(second.latents, ref_latents, no_model, f"ensemble {scheduler}")
    assert _psnr(second.image, ref_image) >= 40.0
    base_calls = len(first.timings_ms["denoiser_steps"])
    refiner_calls = len(second.timings_ms["denoiser_steps"])
    assert seen[base_calls - 1] == ("base", base_calls, base_calls)
    assert seen[-1] == ("refiner", refiner_calls, refiner_calls)
    if scheduler is None:  # Euler, leading spacing: 901 ... 201 | 101, 1
        assert (base_calls, refiner_calls) == (8, 2)
    if scheduler == "heun":  # 19 calls; the refiner's count made odd: it takes 3
        assert refiner_calls % 2 == 1


def test_ensemble_refusals(shared_bundle, refiner):
    base = Text2ImagePipeline.from_bundle(shared_bundle("sdxl", False).out)
    ref = Text2ImagePipeline.from_bundle(refiner[1])
    with pytest.raises(UserError, match="not an SDXL refiner"):
        run_ensemble(base, base, PROMPT, steps=2)
    with pytest.raises(UserError, match="itself an SDXL refiner"):
        run_ensemble(ref, ref, PROMPT, steps=2)
    with pytest.raises(UserError, match="strictly between 0 and 1"):
        run_ensemble(base, ref, PROMPT, steps=2, refiner_start=1.0)
    with pytest.raises(UserError, match="inpainting with a refiner"):
        run_ensemble(base, ref, PROMPT, image=test_image(), mask_image=test_image())
    with pytest.raises(UserError, match="refines an image"):
        ref(PROMPT, steps=2)
    with pytest.raises(UserError, match="SDXL refiner only"):
        base(PROMPT, steps=2, aesthetic_score=5.0)
    with pytest.raises(UserError, match="from 0 to 10"):
        ref(PROMPT, steps=2, image=test_image(), aesthetic_score=11.0)
    with pytest.raises(UserError, match="not a finite number"):
        ref(PROMPT, steps=2, image=test_image(), negative_aesthetic_score=float("nan"))
    with pytest.raises(UserError, match="partly denoised latents"):
        ref(PROMPT, steps=2, image=test_image(), denoising_start=0.5)
    with pytest.raises(UserError, match="must be below denoising_end"):
        ref(
            PROMPT,
            steps=2,
            latents=np.zeros((1, 4, 16, 16)),
            denoising_start=0.6,
            denoising_end=0.5,
        )
    with pytest.raises(UserError, match="leaves no step"):  # 2 steps: 501, 1 -> none below 1
        ref(PROMPT, steps=2, latents=np.zeros((1, 4, 16, 16), np.float32), denoising_start=0.999)
    with pytest.raises(UserError, match="latents have shape"):
        ref(PROMPT, steps=2, size=(64, 64), latents=np.zeros((1, 4, 4, 4)), denoising_start=0.5)
