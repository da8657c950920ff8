"""SDXL's size and crop conditioning (original_size, crops_coords_top_left, target_size and
their negatives) from a bundle reproduces diffusers' pipelines, each with its own
defaults: text-to-image, image-to-image and the refiner (runtime/size_conditioning.py).
Final latents within 1e-4 of the denoiser's contribution, images to 40 dB, as in
test_runtime_vs_diffusers.py; each case also differs from the run without the values, so
the values reach the UNet.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import pytest
from click.testing import CliRunner
from slimdiff.runtime import Text2ImagePipeline, run_ensemble
from slimdiff.runtime.image import load_image

from slimdiff.cli import main
from slimdiff.errors import UserError
from tests.integration.test_img2img import _compare, test_image
from tests.integration.test_runtime_vs_diffusers import (
    PROMPT,
    SIZE,
    STEPS,
    _assert_close_to_diffusers,
    _diffusers,
    _psnr,
)

pytestmark = pytest.mark.slow

GUIDANCE = 5.0
LOW_RES = {"negative_original_size": (32, 32), "negative_target_size": (SIZE, SIZE)}
TEXT_CASES = {
    "sizes and crop": {"original_size": (512, 384), "crops_coords_top_left": (16, 8)},
    "target": {"target_size": (128, 96)},
    "both negatives": LOW_RES,
    "negative crop": {**LOW_RES, "negative_crops_coords_top_left": (24, 0)},
    # diffusers' text-to-image pipeline takes a crop for the negative rows from the prompt's
    # rows unless both negative sizes are given
    "crop, no negatives": {"crops_coords_top_left": (40, 40)},
}


@pytest.fixture(scope="module")
def sdxl(tiny_bundle):
    model, bundle = tiny_bundle("sdxl")
    model.pipe.set_progress_bar_config(disable=True)
    return model, Text2ImagePipeline.from_bundle(bundle)


def _text_run(model, runtime, sizing: dict, guidance: float = GUIDANCE):
    shape = runtime.conditioning.latent_shape(SIZE, SIZE)
    latents = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    ref_image, ref_latents = _diffusers(model.pipe, latents, guidance, None, **sizing)
    _, no_model = _diffusers(model.pipe, latents, guidance, None, zero=True, **sizing)
    call = {"steps": STEPS, "guidance": guidance, "size": (SIZE, SIZE), "latents": latents}
    return (
        runtime(PROMPT, **call, **sizing),
        runtime(PROMPT, **call),
        ref_image,
        ref_latents,
        no_model,
    )


@pytest.mark.parametrize("case", list(TEXT_CASES))
def test_text_to_image_matches_diffusers(sdxl, case):
    result, plain, ref_image, ref_latents, no_model = _text_run(*sdxl, TEXT_CASES[case])
    _assert_close_to_diffusers(result.latents, ref_latents, no_model, case)
    assert _psnr(result.image, ref_image) >= 40.0
    assert np.abs(result.latents - plain.latents).max() > 1e-4  # the values reach the UNet


def test_without_cfg_the_negatives_change_nothing(sdxl):
    result, plain, _, ref_latents, no_model = _text_run(*sdxl, LOW_RES, guidance=1.0)
    _assert_close_to_diffusers(result.latents, ref_latents, no_model, "no CFG")
    np.testing.assert_array_equal(result.latents, plain.latents)


def test_several_images_keep_the_negatives_on_the_negative_rows(sdxl):
    """The first of two images is the one-image call's (diffusers' text-to-image pipeline
    pairs the rows wrongly past one image: runtime/size_conditioning.py)."""
    _, runtime = sdxl
    call = {"steps": STEPS, "guidance": GUIDANCE, "size": (SIZE, SIZE), "seed": 5}
    two = runtime([PROMPT, "a green square"], images=2, **call, **LOW_RES)
    one = runtime(PROMPT, **call, **LOW_RES)
    np.testing.assert_allclose(two.latents[:1], one.latents, rtol=0, atol=1e-4)
    # a difference the tolerance would see: the negatives' own effect
    assert np.abs(runtime(PROMPT, **call).latents - one.latents).max() > 1e-3


def test_one_negative_size_is_ignored_as_diffusers_ignores_it(sdxl, caplog):
    model, runtime = sdxl
    with caplog.at_level(logging.WARNING, logger="slimdiff.runtime.size_conditioning"):
        result, plain, _, ref_latents, no_model = _text_run(
            model, runtime, {"negative_original_size": (32, 32)}
        )
    _assert_close_to_diffusers(result.latents, ref_latents, no_model, "one negative")
    np.testing.assert_array_equal(result.latents, plain.latents)
    assert "negative_original_size: not used by SDXL text-to-image" in caplog.text


def _image_run(model, runtime, sizing: dict, **call):
    """runtime and diffusers' img2img pipeline (test_img2img._compare), both given `sizing`."""
    return _compare(model, "sdxl", runtime, GUIDANCE, given=sizing, **call)


IMAGE_CASES = {
    "sizes and crop": {"original_size": (256, 256), "crops_coords_top_left": (8, 8)},
    # one negative size is enough here: the other defaults to the prompt's
    "one negative": {"negative_original_size": (32, 32)},
    "both negatives": LOW_RES,
}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_image_to_image_matches_diffusers(sdxl, case):
    model, runtime = sdxl
    result, ref_image, _ = _image_run(model, runtime, IMAGE_CASES[case])
    assert _psnr(result.image, ref_image) >= 40.0
    args = {"steps": 5, "guidance": GUIDANCE, "seed": 3, "image": test_image(), "strength": 0.5}
    plain = runtime(PROMPT, **args)
    assert np.abs(result.latents - plain.latents).max() > 1e-4


def test_image_to_image_ignores_a_negative_crop_as_diffusers(sdxl, caplog):
    model, runtime = sdxl
    sizing = {**LOW_RES, "negative_crops_coords_top_left": (24, 24)}
    with caplog.at_level(logging.WARNING, logger="slimdiff.runtime.size_conditioning"):
        result, _, _ = _image_run(model, runtime, sizing)
    args = {"steps": 5, "guidance": GUIDANCE, "seed": 3, "image": test_image(), "strength": 0.5}
    np.testing.assert_array_equal(result.latents, runtime(PROMPT, **args, **LOW_RES).latents)
    assert "negative_crops_coords_top_left: not used by SDXL image-to-image" in caplog.text


@pytest.fixture(scope="module")
def refiner(shared_bundle):
    shared = shared_bundle("sdxl-refiner")
    shared.model.pipe.set_progress_bar_config(disable=True)
    return shared.model, Text2ImagePipeline.from_bundle(shared.out)


def test_the_refiner_matches_diffusers(refiner, caplog):
    """Five ids: the negative crop is its own here (default (0, 0)); target sizes unused."""
    model, runtime = refiner
    sizing = {
        "original_size": (256, 192),
        "crops_coords_top_left": (16, 16),
        "negative_original_size": (32, 32),
        "negative_crops_coords_top_left": (4, 0),
        "target_size": (96, 96),
    }
    with caplog.at_level(logging.WARNING, logger="slimdiff.runtime.size_conditioning"):
        result, ref_image, _ = _image_run(model, runtime, sizing, strength=0.5)
    assert _psnr(result.image, ref_image) >= 40.0
    assert "target_size: not used by the SDXL refiner" in caplog.text


def test_the_ensemble_gives_the_refiner_all_but_the_target_sizes(sdxl, refiner, monkeypatch):
    _, base = sdxl
    _, ref = refiner
    calls = {}
    original = Text2ImagePipeline.__call__

    @functools.wraps(original)  # run_ensemble reads the call's signature
    def recording(self, *args, **kwargs):
        calls[id(self)] = kwargs
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Text2ImagePipeline, "__call__", recording)
    sizing = {**LOW_RES, "original_size": (512, 512), "crops_coords_top_left": (8, 0)}
    sizing["target_size"] = (SIZE, SIZE)
    _, second = run_ensemble(base, ref, PROMPT, steps=4, size=(SIZE, SIZE), **sizing)
    assert second.image.shape == (SIZE, SIZE, 3)
    assert {k: calls[id(base)][k] for k in sizing} == sizing
    given = {k: calls[id(ref)].get(k) for k in sizing}
    assert given == {**sizing, "target_size": None, "negative_target_size": None}


def test_other_families_are_refused_size_conditioning(tiny_bundle):
    _, bundle = tiny_bundle("sd15")
    runtime = Text2ImagePipeline.from_bundle(bundle)
    with pytest.raises(UserError, match=r"^original_size: size and crop conditioning is SDXL's"):
        runtime(PROMPT, steps=1, size=(SIZE, SIZE), original_size=(512, 512))


def test_cli_takes_the_sizes_as_size_does(sdxl, tiny_bundle, tmp_path):
    """WIDTHxHEIGHT as --size, TOP,LEFT for crops; the PNG is the API's image."""
    _, bundle = tiny_bundle("sdxl")
    _, runtime = sdxl
    out = tmp_path / "a.png"
    args = ["run", str(bundle), "--prompt", PROMPT, "--steps", "2", "--size", f"{SIZE}x{SIZE}"]
    sizes = ["--original-size", "384x512", "--crops-coords-top-left", "16,8"]
    sizes += ["--negative-original-size", "32x32", "--negative-target-size", f"{SIZE}x{SIZE}"]
    result = CliRunner().invoke(main, [*args, *sizes, "--out", str(out)])
    assert result.exit_code == 0, result.output
    expected = runtime(
        PROMPT,
        steps=2,
        size=(SIZE, SIZE),
        original_size=(512, 384),  # (height, width)
        crops_coords_top_left=(16, 8),
        **LOW_RES,
    ).image
    np.testing.assert_array_equal(load_image(out), expected)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--original-size", "512"], "'512' is not WIDTHxHEIGHT; use e.g. 512x512"),
        (["--target-size", "0x512"], "each value must be 1 to 16384"),
        (["--crops-coords-top-left", "8x8"], "'8x8' is not TOP,LEFT"),
        (["--crops-coords-top-left", "-8,0"], "'-8,0' is not TOP,LEFT"),
    ],
)
def test_cli_bad_sizes_are_one_line(tiny_bundle, tmp_path, args, message):
    _, bundle = tiny_bundle("sdxl")
    cmd = ["run", str(bundle), "--prompt", "x", *args, "--out", str(tmp_path / "a.png")]
    result = CliRunner().invoke(main, cmd)
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output and not (tmp_path / "a.png").exists()


def test_verify_says_an_sdxl_bundle_takes_them(tiny_bundle):
    _, bundle = tiny_bundle("sdxl")  # exported with its VAE encoder
    result = CliRunner().invoke(main, ["verify", str(bundle)])
    assert result.exit_code == 0, result.output
    usage = result.output.strip().splitlines()[-1]
    assert usage.startswith("runs: default 128x128, 30 steps, guidance 5, Euler")
    assert usage.endswith(
        "; takes --image, --mask (image-to-image at strength 0.3, inpainting at strength "
        "0.9999), --original-size and SDXL's other size conditioning"
    )


def test_cli_on_another_family_exits_2(tiny_bundle, tmp_path):
    _, bundle = tiny_bundle("sd15")
    cmd = ["run", str(bundle), "--prompt", "x", "--steps", "1", "--original-size", "512x512"]
    result = CliRunner().invoke(main, [*cmd, "--out", str(tmp_path / "a.png")])
    assert result.exit_code == 2
    assert "size and crop conditioning is SDXL's" in result.output
    assert "leave them out (run: --original-size)" in result.output
