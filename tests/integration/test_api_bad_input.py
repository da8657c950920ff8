"""Bad input to the runtime's Python API: one UserError naming the argument and the fix,
before any graph runs, never a ValueError or TypeError from deep inside (the cases a
review of the API found). Runs on the tiny bundles tests/conftest.py exports once."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image
from slimdiff.runtime import Text2ImagePipeline, get_backend, save_image

from slimdiff.errors import UserError

pytestmark = pytest.mark.slow

PROMPT = "a red circle"
CALL = {"steps": 1, "size": (64, 64), "output": "latent"}


@pytest.fixture(scope="module")
def sd15(tiny_bundle):
    """(bundle path, pipeline) of tiny SD1.5 (with its VAE encoder)."""
    _, bundle = tiny_bundle("sd15")
    return bundle, Text2ImagePipeline.from_bundle(bundle)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", "guidance 'abc': use a number, e.g. 7.5"),
        ("7", "guidance '7': use a number, e.g. 7.5"),  # float() would have taken it
        (True, "guidance True: use a number, e.g. 7.5"),
    ],
)
def test_guidance_must_be_a_number(sd15, value, message):
    with pytest.raises(UserError) as err:
        sd15[1](PROMPT, guidance=value, **CALL)
    assert str(err.value) == message


def test_eta_and_strength_must_be_numbers(sd15):
    pipe = sd15[1]
    with pytest.raises(UserError, match=r"^eta 'x': use a number from 0 to 1$"):
        pipe(PROMPT, eta="x", **CALL)
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(UserError, match=r"^strength 'x': use a number above 0 and at most 1$"):
        pipe(PROMPT, image=image, strength="x", **CALL)


def test_eta_off_tcd_says_only_tcds_gamma_is_ported(sd15):
    ddim = Text2ImagePipeline.from_bundle(sd15[0], scheduler="ddim")
    with pytest.raises(UserError) as err:
        ddim(PROMPT, eta=0.3, **CALL)
    message = str(err.value)
    assert message.startswith("eta 0.3: DDIMScheduler takes no eta here")
    assert "only TCD's gamma is ported as eta, not DDIM's stochastic eta" in message
    assert "--scheduler tcd" in message


def test_ragged_latents_are_a_user_error(sd15):
    with pytest.raises(UserError, match=r"^latents: a ragged nested list; pass an array"):
        sd15[1](PROMPT, latents=[[1.0, 2.0], [3.0]], **CALL)


def test_latents_of_another_size_name_it_width_x_height(sd15):
    pipe = sd15[1]
    shape = pipe.conditioning.latent_shape(64, 128)  # 64 high, 128 wide
    wrong = np.zeros(pipe.conditioning.latent_shape(64, 64), np.float32)
    with pytest.raises(UserError) as err:
        pipe(PROMPT, latents=wrong, steps=1, size=(64, 128), output="latent")
    assert f"size 128x64 (width x height) needs {shape}" in str(err.value)


def test_on_step_that_is_not_callable_is_refused_before_any_step(sd15, monkeypatch):
    pipe = sd15[1]
    monkeypatch.setattr(pipe, "denoiser", None)  # a step would fail on it otherwise
    with pytest.raises(UserError, match=r"^on_step 5: pass a function of \(done, total\)"):
        pipe(PROMPT, on_step=5, **CALL)


def test_expect_sha256_that_is_not_a_string_is_a_user_error(sd15):
    with pytest.raises(UserError) as err:
        Text2ImagePipeline.from_bundle(sd15[0], expect_sha256=123)
    assert str(err.value) == (
        "expect_sha256 must be the 64-hex-digit SHA-256 string `slimdiff export` prints, "
        "not int 123"
    )


def test_a_backend_object_is_taken_as_a_name_is(sd15):
    """get_backend's object, here with its threads set, as a library user sets them."""
    bundle, pipe = sd15
    backend = get_backend("ort-cpu")
    backend.threads = 1
    by_object = Text2ImagePipeline.from_bundle(bundle, backend=backend)
    assert by_object.denoiser is not pipe.denoiser
    np.testing.assert_array_equal(
        by_object(PROMPT, seed=3, **CALL).latents, pipe(PROMPT, seed=3, **CALL).latents
    )


@pytest.mark.parametrize("backend", [None, 3, object()])
def test_a_backend_neither_name_nor_object_is_a_user_error(sd15, backend):
    with pytest.raises(UserError, match=r"pass a backend name such as 'ort-cpu' or a backend"):
        Text2ImagePipeline.from_bundle(sd15[0], backend=backend)


def test_an_image_of_the_wrong_kind_is_described_in_one_short_line(sd15):
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(UserError) as err:
        sd15[1](PROMPT, image=[image, image], **CALL)
    assert str(err.value) == (
        "image must be a file path, a PIL image or an (H, W, 3) uint8 array, not a list of 2"
    )


@pytest.mark.parametrize(
    ("image", "fragments"),
    [
        (np.zeros((8, 8, 4), np.uint8), ["not of shape (8, 8, 4)", "image[..., :3]"]),
        (np.zeros((3, 8, 8), np.uint8), ["not of shape (3, 8, 8)", "image.transpose(1, 2, 0)"]),
        (np.zeros((8, 8, 3), np.float32), ["not a float32 array of shape (8, 8, 3)"]),
        (Image.new("RGB", (8, 8)), ["not a PIL image (RGB)", "np.asarray(image.convert"]),
        (None, ["not None", "output='latent' returns latents only"]),
    ],
)
def test_save_image_names_the_shape_and_what_it_takes(tmp_path, image, fragments):
    out = tmp_path / "x.png"
    with pytest.raises(UserError) as err:
        save_image(image, out)
    message = str(err.value)
    assert message.startswith(f"{out}: an image to save is an (H, W, 3) uint8 array, not")
    assert all(f in message for f in fragments), message
    assert not out.exists()


def _long_prompt_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "is longer than" in r.getMessage()]


def test_a_long_prompt_is_warned_of_once_for_both_sdxl_encoders(tiny_bundle, caplog):
    _, bundle = tiny_bundle("sdxl")
    pipe = Text2ImagePipeline.from_bundle(bundle)
    long = "a red circle on a blue square " * 20  # well over 77 tokens
    with caplog.at_level(logging.WARNING):
        pipe(long, guidance=5.0, **CALL)
    (line,) = _long_prompt_warnings(caplog)
    assert line.startswith(f"prompt {long[:57] + '...'!r} is longer than the 77 tokens CLIP")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pipe([long, long], negative_prompt="blurry " + long, guidance=5.0, **CALL)
    prompt, negative = _long_prompt_warnings(caplog)
    assert prompt.startswith("prompt 'a red circle")
    assert negative.startswith("negative prompt 'blurry a red circle")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pipe("a red circle", negative_prompt="blurry", guidance=5.0, **CALL)
    assert not _long_prompt_warnings(caplog)
