"""A pipeline held by a long-lived service: a cancelled or failed low-memory call leaves
nothing loaded; arguments that would fail mid-call (an on_step of the wrong shape, latents
out of scale, an image with no pixels) are refused up front in one line; a bundle folder
deleted under the pipeline is named missing."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from slimdiff.runtime.call_checks import MAX_LATENT
from slimdiff.runtime.image import load_image, prepare_image, prepare_mask
from slimdiff.runtime.manifest import BundleError
from slimdiff.runtime.pipeline import Text2ImagePipeline

from slimdiff.errors import UserError

CALL = {"size": (64, 64), "steps": 3, "guidance": 6.0, "seed": 3}
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def bundle(shared_bundle) -> Path:
    return shared_bundle("sd15", optimize=False).out  # read only: tests edit copies


@pytest.fixture(scope="module")
def resident(bundle) -> Text2ImagePipeline:
    return Text2ImagePipeline.from_bundle(bundle)


def _loaded(pipe: Text2ImagePipeline) -> list[str]:
    sessions = {
        "text_encoder": pipe.conditioning.encoders[0].session,
        "unet": pipe.denoiser,
        "vae_decoder": pipe.vae_decoder,
        "vae_encoder": pipe.vae_encoder,
    }
    return [name for name, session in sessions.items() if session.loaded]


class _Cancel(Exception):
    pass


@pytest.mark.parametrize("raised", [_Cancel, KeyboardInterrupt])
def test_a_low_memory_call_cancelled_mid_steps_leaves_nothing_loaded(bundle, resident, raised):
    pipe = Text2ImagePipeline.from_bundle(bundle, low_memory=True)

    def cancel(done: int, total: int) -> None:
        assert _loaded(pipe) == ["unet"]  # the text encoder went before the UNet came
        if done == 2:
            raise raised("the client went away")

    with pytest.raises(raised, match="the client went away"):
        pipe(PROMPT, on_step=cancel, **CALL)
    assert _loaded(pipe) == []
    # the next call loads each component once, alone, and draws what a clean pipeline draws
    loads = pipe.denoiser.loads
    seen = []
    result = pipe(PROMPT, on_step=lambda done, total: seen.append(_loaded(pipe)), **CALL)
    assert seen == [["unet"]] * 3 and _loaded(pipe) == []
    assert pipe.denoiser.loads == loads + 1
    clean = resident(PROMPT, **CALL)
    np.testing.assert_array_equal(result.latents, clean.latents)
    np.testing.assert_array_equal(result.image, clean.image)


def test_a_low_memory_image_to_image_call_that_fails_leaves_nothing_loaded(bundle):
    pipe = Text2ImagePipeline.from_bundle(bundle, low_memory=True)
    image = np.full((64, 64, 3), 200, np.uint8)

    def fail(done: int, total: int) -> None:
        raise RuntimeError("a bug in the progress bar")

    with pytest.raises(RuntimeError, match="a bug in the progress bar"):
        pipe(PROMPT, image=image, strength=0.7, on_step=fail, **CALL)
    assert _loaded(pipe) == []
    assert pipe.vae_encoder.loads == 1


@pytest.mark.parametrize(
    "on_step, why",
    [
        (lambda: None, "too many positional arguments"),
        (lambda done: None, "too many positional arguments"),
        (lambda stage, done, total: None, "missing a required argument: 'total'"),
    ],
)
def test_an_on_step_of_the_wrong_signature_is_refused_before_anything_runs(resident, on_step, why):
    with pytest.raises(UserError) as err:
        resident(PROMPT, on_step=on_step, **CALL)
    assert str(err.value) == (
        f"on_step <lambda> cannot be called as on_step(done, total) ({why}); pass a function "
        "of two arguments, e.g. lambda done, total: ..."
    )


def test_on_steps_that_take_done_and_total_are_accepted(resident):
    class Bar:
        def __init__(self) -> None:
            self.seen: list[tuple[int, int]] = []

        def __call__(self, done: int, total: int, *, label: str = "") -> None:
            self.seen.append((done, total))

    bar, star = Bar(), []
    resident(PROMPT, on_step=bar, output="latent", **CALL)
    resident(PROMPT, on_step=lambda *a: star.append(a), output="latent", **CALL)
    assert bar.seen == star == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize("scale", [1e38, 1e5])
def test_latents_far_above_unit_scale_are_refused_up_front(resident, scale):
    latents = np.full((1, 4, 8, 8), scale, np.float32)
    with pytest.raises(UserError) as err:
        resident(PROMPT, latents=latents, **CALL)
    assert str(err.value) == (
        f"latents reach {scale:.3g} in magnitude, far above their scale (a seeded draw's "
        f"standard deviation is 1); pass latents within +-{MAX_LATENT:g}, e.g. noise of unit "
        "scale or a run's output='latent' latents"
    )


def test_latents_of_large_but_finite_scale_still_run(resident):
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32) * 100
    result = resident(PROMPT, latents=latents, output="latent", **CALL)
    assert result.latents.shape == (1, 4, 8, 8) and np.isfinite(result.latents).all()


@pytest.mark.parametrize("shape", [(0, 0, 3), (0, 64, 3), (64, 0, 3), (0, 64)])
def test_an_image_array_with_no_pixels_is_refused(shape):
    with pytest.raises(UserError) as err:
        load_image(np.zeros(shape, np.uint8), "mask")
    assert str(err.value) == (
        f"mask of {shape[1]}x{shape[0]} pixels is empty; pass an image at least 1x1 pixel"
    )


def test_empty_images_are_refused_from_pil_and_files_and_when_prepared(tmp_path):
    empty = Image.new("RGB", (0, 64))
    with pytest.raises(UserError, match=r"^image of 0x64 pixels is empty; pass an image"):
        load_image(empty)
    for prepare in (prepare_image, prepare_mask):
        with pytest.raises(UserError, match=r"of 0x64 pixels is empty"):
            prepare(empty, (64, 64))
    path = tmp_path / "empty.tiff"
    try:
        Image.new("L", (5, 0)).save(path)
    except (ValueError, OSError, SystemError):
        return  # this Pillow cannot write one; the arrays and PIL images above are checked
    with pytest.raises(UserError, match=r"empty\.tiff"):
        load_image(path)


def test_an_empty_image_is_refused_by_a_call_that_gives_a_size(resident):
    with pytest.raises(UserError, match=r"^image of 64x0 pixels is empty"):
        resident(PROMPT, image=np.zeros((0, 64, 3), np.uint8), **CALL)
    mask = Image.new("L", (0, 0))
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(UserError, match=r"^mask of 0x0 pixels is empty"):
        resident(PROMPT, image=image, mask_image=mask, **CALL)


def test_a_bundle_folder_deleted_under_a_pipeline_is_named_missing(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    pipe = Text2ImagePipeline.from_bundle(copy, low_memory=True)
    shutil.rmtree(copy)
    with pytest.raises(BundleError) as err:
        pipe(PROMPT, output="latent", **CALL)
    assert str(err.value) == (
        f"{copy.resolve()}: text_encoder/model.onnx is missing (deleted or moved since the "
        "bundle was opened and verified); put the bundle folder back, or open the bundle "
        "where it is now (a new pipeline, or run the command again)"
    )
    assert _loaded(pipe) == []
