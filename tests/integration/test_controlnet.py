"""ControlNet bundles (`export --controlnet`) reproduce diffusers' ControlNet pipelines.

Each family's tiny model gets a tiny ControlNet made from its own UNet
(tests/controlnets.py: ControlNetModel.from_unet, every weight nudged by noise, since
from_unet zero-initialises the zero convolutions and a ControlNet whose residuals are all 0
would steer nothing, so no test could tell it from none). One bundle per family is exported
with it, once per module.

The runtime and diffusers' StableDiffusion(XL)ControlNet(Img2Img|Inpaint)Pipeline, built
from the same components and the same ControlNet, start from the same latents (or, from an
image, get the runtime's draws through their randn_tensor, as tests/integration/
test_img2img.py gives them); the final latents must agree to 1e-4 of the denoiser's
contribution and the images to 40 dB, as in test_runtime_vs_diffusers.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from slimdiff.runtime import Text2ImagePipeline
from slimdiff.runtime.img2img import MASKED_STREAM, POSTERIOR_STREAM
from slimdiff.runtime.manifest import BundleError, ControlNetRecord, parse_manifest

from slimdiff.errors import UserError
from slimdiff.models.kinds import unpack_latents
from tests.controlnets import save_tiny_controlnet
from tests.integration.test_img2img import test_image, test_mask
from tests.integration.test_runtime_vs_diffusers import (
    PROMPT,
    SIZE,
    _assert_close_to_diffusers,
    _psnr,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

STEPS = 5
GUIDANCE = 5.0
SEED = 3
STRENGTH = 0.5
# the tiny models' VAEs map 8 pixels to a latent pixel: four conditioning convs (3 halvings)
EMBEDDING = (4, 8, 16, 32)
# a scale and a window that keeps steps 1 and 2 of 5 (i / 5 >= 0.2 and (i + 1) / 5 <= 0.7)
WINDOW = {"control_scale": 0.6, "control_start": 0.2, "control_end": 0.7}
PIPELINES = {
    "sd15": "StableDiffusionControlNetPipeline",
    "sdxl": "StableDiffusionXLControlNetPipeline",
}


def control_image(height: int = SIZE, width: int = SIZE) -> np.ndarray:
    """An edge map, as a Canny ControlNet takes one: white lines on black, (H, W, 3) uint8."""
    y, x = np.mgrid[0:height, 0:width]
    ring = np.abs(np.hypot(x - 0.6 * width, y - 0.4 * height) - 0.25 * min(height, width)) < 1.5
    lines = (np.abs(x - 0.2 * width) < 1) | (np.abs(y - 0.8 * height) < 1) | ((x + 2 * y) % 23 < 2)
    edges = ((ring | lines) * 255).astype(np.uint8)
    return np.repeat(edges[..., np.newaxis], 3, axis=-1)


class Controlled(NamedTuple):
    model: Any  # the LoadedModel
    controlnet: Any  # the ControlNetModel saved at `folder`
    folder: Path
    bundle: Path
    manifest: Any


@pytest.fixture(scope="module")
def controlled(tmp_path_factory):
    """`controlled(family)`: tiny:<family> exported with a tiny ControlNet, once per module
    (SD1.5 with the VAE encoder, for image-to-image and inpainting; SDXL unfused, as the
    runtime tests' SDXL: ORT's UNet fusion takes a minute on it)."""
    from slimdiff.export import export_bundle

    from slimdiff.models import load_model

    cache: dict[str, Controlled] = {}

    def get(family: str) -> Controlled:
        if family not in cache:
            model = load_model(f"tiny:{family}")
            root = tmp_path_factory.mktemp(f"controlnet-{family}")
            save_tiny_controlnet(model.denoiser, root / "controlnet")
            # diffusers' pipelines get what the bundle was exported from: the saved folder
            controlnet = diffusers.ControlNetModel.from_pretrained(root / "controlnet")
            manifest = export_bundle(
                model,
                root / "bundle",
                optimize=family != "sdxl",
                vae_encoder=family == "sd15",
                controlnet=str(root / "controlnet"),
            )
            cache[family] = Controlled(
                model, controlnet, root / "controlnet", root / "bundle", manifest
            )
        return cache[family]

    return get


def _pipe(c: Controlled, name: str, runtime: Text2ImagePipeline):
    """diffusers' pipeline `name` from the model's components and the ControlNet, with the
    bundle's scheduler."""
    pipe = getattr(diffusers, name)(**c.model.pipe.components, controlnet=c.controlnet)
    config = runtime.scheduler_config
    pipe.scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers(pipe, zero: bool = False, draws=None, **call) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' image and final latents; `zero`: the UNet's output zeroed (the scheduler's
    arithmetic alone, test_runtime_vs_diffusers.py); `draws`: (noise, posterior, ...),
    the runtime's draws of an image-to-image run, through the pipeline's and the VAE's
    randn_tensor (test_img2img.py)."""
    import importlib

    from diffusers.models.autoencoders import vae as vae_module

    final = {}
    handle = pipe.unet.register_forward_hook(
        lambda _m, _a, out: (torch.zeros_like(out[0]), *out[1:]) if zero else None
    )

    def keep_last(_pipe, _step, _t, kwargs):
        final["latents"] = kwargs["latents"].numpy().copy()
        return kwargs

    try:
        with pytest.MonkeyPatch.context() as patch:
            if draws is not None:
                noise, *posteriors = draws
                module = importlib.import_module(type(pipe).__module__)
                patch.setattr(module, "randn_tensor", lambda shape, **_: torch.from_numpy(noise))
                # the VAE posterior's draws in order: the image's, then (an inpainting UNet)
                # the masked image's; the ControlNet inpaint pipeline also encodes the
                # masked image for a 4-channel UNet, which never reads it (the last again)
                calls = iter(range(8))
                patch.setattr(
                    vae_module,
                    "randn_tensor",
                    lambda shape, **_: torch.from_numpy(
                        posteriors[min(next(calls), len(posteriors) - 1)]
                    ),
                )
            call = {"guidance_scale": GUIDANCE, "height": SIZE, "width": SIZE, **call}
            images = pipe(
                PROMPT, num_inference_steps=STEPS, callback_on_step_end=keep_last, **call
            ).images
    finally:
        handle.remove()
    return np.array(images[0]), final["latents"]


def _initial_latents(runtime: Text2ImagePipeline) -> np.ndarray:
    shape = runtime.conditioning.latent_shape(SIZE, SIZE)
    return np.random.default_rng(1).standard_normal(shape).astype(np.float32)


def _diffusers_control(kwargs: dict) -> dict:
    """The runtime's ControlNet arguments as diffusers names them."""
    names = {
        "control_scale": "controlnet_conditioning_scale",
        "control_start": "control_guidance_start",
        "control_end": "control_guidance_end",
    }
    return {names[k]: v for k, v in kwargs.items()}


def _rel(a: np.ndarray, b: np.ndarray, scale: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(scale))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_controlnet_matches_diffusers(controlled, family):
    c = controlled(family)
    runtime = Text2ImagePipeline.from_bundle(c.bundle)
    pipe = _pipe(c, PIPELINES[family], runtime)
    latents = _initial_latents(runtime)
    control = control_image()
    # the run without control: the UNet alone (scale 0), as reference for "it steers"
    plain = runtime(PROMPT, steps=STEPS, guidance=GUIDANCE, latents=latents, size=(SIZE, SIZE))
    outcomes = []
    for kwargs in ({}, WINDOW):
        call = {"image": Image.fromarray(control), "latents": torch.from_numpy(latents)}
        call.update(_diffusers_control(kwargs))
        ref_image, ref_latents = _diffusers(pipe, **call)
        _, no_model = _diffusers(pipe, zero=True, **call)
        result = runtime(
            PROMPT,
            steps=STEPS,
            guidance=GUIDANCE,
            latents=latents,
            control_image=control,
            **kwargs,
        )
        assert result.latents.shape == ref_latents.shape
        assert len(result.timings_ms["denoiser_steps"]) == STEPS
        label = f"{family} {kwargs or 'default'}"
        _assert_close_to_diffusers(result.latents, ref_latents, no_model, label)
        psnr = _psnr(result.image, ref_image)
        assert psnr >= 40.0, f"{label}: PSNR {psnr:.1f} dB"
        # the control image steers: far more than the agreement with diffusers
        contribution = ref_latents - no_model
        assert _rel(result.latents, plain.latents, contribution) > 0.01, label
        outcomes.append(result.latents)
    # the window and the scale change the run as well
    assert _rel(outcomes[1], outcomes[0], outcomes[0] - plain.latents) > 0.05


def test_controlnet_without_guidance_and_two_images_matches_diffusers(controlled):
    """Guidance 1 (no CFG): one control image row per image, not two."""
    c = controlled("sd15")
    runtime = Text2ImagePipeline.from_bundle(c.bundle)
    pipe = _pipe(c, PIPELINES["sd15"], runtime)
    shape = (2, *runtime.conditioning.latent_shape(SIZE, SIZE)[1:])
    latents = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    call = {"image": Image.fromarray(control_image()), "latents": torch.from_numpy(latents)}
    call.update(num_images_per_prompt=2, guidance_scale=1.0)
    ref_image, ref_latents = _diffusers(pipe, **call)
    _, no_model = _diffusers(pipe, zero=True, **call)
    args = {"steps": STEPS, "guidance": 1.0, "latents": latents, "images": 2}
    result = runtime(PROMPT, control_image=control_image(), **args)
    assert result.latents.shape == ref_latents.shape == shape
    _assert_close_to_diffusers(result.latents, ref_latents, no_model, "sd15 no CFG")
    assert _psnr(result.images[0], ref_image) >= 40.0
    plain = runtime(PROMPT, size=(SIZE, SIZE), **args)
    assert _rel(result.latents, plain.latents, ref_latents - no_model) > 0.01


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_without_a_control_image_the_controlnet_adds_nothing(controlled, family):
    """A ControlNet bundle without a control image feeds scale 0: what the same bundle
    draws at scale 0 (or with a window that keeps no step) with one, and what diffusers'
    plain pipeline draws."""
    c = controlled(family)
    runtime = Text2ImagePipeline.from_bundle(c.bundle)
    latents = _initial_latents(runtime)
    args = {"steps": STEPS, "guidance": GUIDANCE, "latents": latents}
    without = runtime(PROMPT, size=(SIZE, SIZE), **args)
    control = control_image()
    at_zero = runtime(PROMPT, control_image=control, control_scale=0.0, **args)
    np.testing.assert_allclose(without.latents, at_zero.latents, rtol=0, atol=1e-6)
    # 5 steps, window 0.5..0.6: no step i has i / 5 >= 0.5 and (i + 1) / 5 <= 0.6
    outside = runtime(PROMPT, control_image=control, control_start=0.5, control_end=0.6, **args)
    np.testing.assert_allclose(without.latents, outside.latents, rtol=0, atol=1e-6)

    plain = c.model.pipe
    plain.set_progress_bar_config(disable=True)
    call = {"latents": torch.from_numpy(latents)}
    ref_image, ref_latents = _diffusers(plain, **call)
    _, no_model = _diffusers(plain, zero=True, **call)
    _assert_close_to_diffusers(without.latents, ref_latents, no_model, f"{family} no control")
    assert _psnr(without.image, ref_image) >= 40.0


def _image_draws(runtime: Text2ImagePipeline) -> tuple[np.ndarray, np.ndarray]:
    """The runtime's two draws of an image-to-image run with SEED (test_img2img.py)."""
    cond = runtime.conditioning
    h = w = SIZE // cond.vae_scale
    noise = unpack_latents(cond.noise(SEED, SIZE, SIZE), cond.kind.latent_packing, h, w)
    shape = (1, cond.channels, h, w)
    rng = np.random.default_rng([POSTERIOR_STREAM, SEED])
    return noise, rng.standard_normal(shape, dtype=np.float32)


@pytest.mark.parametrize(
    ("name", "mask", "scale"),
    [
        # diffusers' default scales for these pipelines (0.8, 0.5), passed to both
        ("StableDiffusionControlNetImg2ImgPipeline", None, 0.8),
        ("StableDiffusionControlNetInpaintPipeline", test_mask(), 0.5),
    ],
    ids=["img2img", "inpaint"],
)
def test_controlnet_from_an_image_matches_diffusers(controlled, name, mask, scale):
    c = controlled("sd15")
    runtime = Text2ImagePipeline.from_bundle(c.bundle)
    assert runtime.vae_encoder is not None
    pipe = _pipe(c, name, runtime)
    control = control_image()
    call = {
        "image": Image.fromarray(test_image()),
        "control_image": Image.fromarray(control),
        "strength": STRENGTH,
        "controlnet_conditioning_scale": scale,
        "draws": _image_draws(runtime),
    }
    if mask is not None:
        call["mask_image"] = Image.fromarray(mask)
    ref_image, ref_latents = _diffusers(pipe, **call)
    _, no_model = _diffusers(pipe, zero=True, **call)
    args = {"steps": STEPS, "guidance": GUIDANCE, "seed": SEED, "image": test_image()}
    args.update(strength=STRENGTH, mask_image=mask)
    result = runtime(PROMPT, control_image=control, control_scale=scale, **args)
    # strength 0.5 of 5 steps: int(2.5) = 2 steps run
    assert len(result.timings_ms["denoiser_steps"]) == 2
    _assert_close_to_diffusers(result.latents, ref_latents, no_model, name)
    assert _psnr(result.image, ref_image) >= 40.0
    uncontrolled = runtime(PROMPT, **args)
    assert _rel(result.latents, uncontrolled.latents, ref_latents - no_model) > 0.01


def test_the_control_image_sizes_the_run(controlled):
    """Without `size`, the control image's size cut down to the size multiple, as diffusers'
    ControlNet pipelines take it; `size` resizes it."""
    runtime = Text2ImagePipeline.from_bundle(controlled("sd15").bundle)
    m = runtime.conditioning.size_multiple()
    args = {"steps": 1, "output": "latent"}
    cut = runtime(PROMPT, control_image=control_image(SIZE + m + 3, SIZE + 5), **args)
    assert cut.latents.shape == runtime.conditioning.latent_shape(SIZE + m, SIZE)
    resized = runtime(PROMPT, control_image=control_image(), size=(SIZE, SIZE + m), **args)
    assert resized.latents.shape == runtime.conditioning.latent_shape(SIZE, SIZE + m)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_the_manifest_records_the_controlnet(controlled, family):
    c = controlled(family)
    for manifest in (c.manifest, Text2ImagePipeline.from_bundle(c.bundle).manifest):
        assert manifest.pipeline.controlnet == ControlNetRecord(count=1, conditioning_channels=3)
        assert manifest.source["controlnet"] == str(c.folder)
        assert manifest.source["model"] == f"tiny:{family}"
        unet = manifest.components["unet"]
        inputs = {spec["name"]: spec for spec in unet.inputs}
        assert inputs["controlnet_cond"]["shape"] == [1, "B", 3, "8H", "8W"]
        assert inputs["controlnet_cond"]["dtype"] == "float32"
        assert inputs["conditioning_scale"]["shape"] == [1]
        for point, shapes in unet.profile.items():
            batch, _, h, w = shapes["sample"]
            assert shapes["controlnet_cond"] == [1, batch, 3, 8 * h, 8 * w], point
            assert shapes["conditioning_scale"] == [1], point
        # the exporter's parity check ran the graph with the ControlNet's inputs
        assert unet.parity["passed"] and "controlnet_cond" in unet.parity["inputs"]
    on_disk = json.loads((c.bundle / "manifest.json").read_text())
    assert on_disk["pipeline"]["controlnet"] == {"count": 1, "conditioning_channels": 3}


def test_a_plain_bundle_writes_no_controlnet(tiny_bundle):
    _, bundle = tiny_bundle("sd15")
    on_disk = json.loads((bundle / "manifest.json").read_text())
    assert "controlnet" not in on_disk["pipeline"]
    assert "controlnet" not in on_disk["source"]
    runtime = Text2ImagePipeline.from_bundle(bundle)
    assert runtime.config.controlnet is None
    names = {spec["name"] for spec in runtime.manifest.components["unet"].inputs}
    assert not names & {"controlnet_cond", "conditioning_scale"}
    with pytest.raises(UserError, match=r"this bundle has no ControlNet.*--controlnet"):
        runtime(PROMPT, steps=1, control_image=control_image())


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"control_scale": -1}, "control scale -1: use a value from 0 to 10"),
        ({"control_scale": float("nan")}, "control scale nan: use a value from 0 to 10"),
        ({"control_scale": 11}, "control scale 11: use a value from 0 to 10"),
        ({"control_scale": float("inf")}, "control scale inf"),
        ({"control_start": 0.5, "control_end": 0.5}, r"control window 0.5..0.5: use 0 <= start"),
        ({"control_start": 0.7, "control_end": 0.2}, r"control window 0.7..0.2: use 0 <= start"),
        ({"control_start": -0.1}, r"control window -0.1..1.0: use 0 <= start"),
        ({"control_end": 1.5}, r"control window 0.0..1.5: use 0 <= start"),
        ({"control_scale": "x"}, r"control scale 'x': use a number"),
        ({"control_scale": None}, r"control scale None: use a number"),
        ({"control_start": True}, r"control start True: use a number"),
    ],
)
def test_bad_control_arguments(controlled, kwargs, error):
    runtime = Text2ImagePipeline.from_bundle(controlled("sd15").bundle)
    with pytest.raises(UserError, match=error):
        runtime(PROMPT, steps=1, control_image=control_image(), **kwargs)
    with pytest.raises(UserError, match=error):  # checked without a control image too
        runtime(PROMPT, steps=1, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "what"),
    [
        ({"control_scale": 0.5}, "scale"),
        ({"control_start": 0.2}, "start"),
        ({"control_end": 0.8}, "end"),
        ({"control_guess": True}, "guess mode"),
    ],
)
def test_control_settings_without_a_control_image_are_refused(
    controlled, tiny_bundle, kwargs, what
):
    """Without a control image the ControlNet adds nothing: a scale, window or guess mode
    given with none would be dropped in silence, so it is refused (as `run` refuses
    --control-scale without --control-image); the defaults stay accepted."""
    runtime = Text2ImagePipeline.from_bundle(controlled("sd15").bundle)
    with pytest.raises(UserError, match=rf"control {what} needs a control image"):
        runtime(PROMPT, steps=1, **kwargs)
    defaults = {
        "control_scale": 1.0,
        "control_start": 0.0,
        "control_end": 1,
        "control_guess": False,
    }
    assert runtime(PROMPT, steps=1, output="latent", **defaults).latents.shape[0] == 1
    if what != "guess mode":  # a bundle without a ControlNet: guess mode says so already
        plain = Text2ImagePipeline.from_bundle(tiny_bundle("sd15")[1])
        with pytest.raises(UserError, match=rf"control {what} steers a ControlNet; this bundle"):
            plain(PROMPT, steps=1, **kwargs)


def test_export_refuses_streamed_weights(controlled, tmp_path):
    from slimdiff.export import export_bundle

    c = controlled("sd15")
    out = tmp_path / "bundle"
    with pytest.raises(UserError, match="--weights stream never loads"):
        export_bundle(c.model, out, controlnet=str(c.folder), weights="stream")
    assert not out.exists()


def test_a_controlnet_for_the_full_unet_is_refused_for_a_compressed_one(controlled, tmp_path):
    """Block removal drops ResNets from the down path: the full UNet's ControlNet gives
    more residuals than the compressed UNet has skips, and is refused before any export;
    a ControlNet made from the compressed UNet fits it."""
    from slimdiff.export import export_bundle

    from slimdiff.models.controlnet import check_controlnet
    from slimdiff.models.loading import LoadedModel

    c = controlled("sd15")
    full = c.model.denoiser
    assert full.config.layers_per_block == 2
    check_controlnet(c.controlnet, full, 8, "full")  # fits the UNet it was made for
    torch.manual_seed(0)
    small = diffusers.UNet2DConditionModel.from_config(full.config, layers_per_block=1)
    pipe = type(c.model.pipe)(**{**c.model.pipe.components, "unet": small})
    compressed = LoadedModel(c.model.arch, "compressed", pipe=pipe)
    out = tmp_path / "bundle"
    error = r"gives 12 down residuals of widths \[32, 32, 32, 32, (64, ){7}64\], but this "
    error += r"UNet's down path has 8 skips of widths \[32, 32, 32, 64, 64, 64, 64, 64\]"
    with pytest.raises(UserError, match=error):
        export_bundle(compressed, out, controlnet=str(c.folder))
    assert not out.exists()
    with pytest.raises(UserError, match="block removal drops ResNets"):
        check_controlnet(c.controlnet, small, 8, "full")
    fitted = diffusers.ControlNetModel.from_unet(
        small, conditioning_embedding_out_channels=EMBEDDING
    )
    assert check_controlnet(fitted, small, 8, "fitted") is None


def _drop_input(name: str):
    def edit(_pipeline, unet, _inputs):
        unet["inputs"] = [spec for spec in unet["inputs"] if spec["name"] != name]

    return edit


FEEDS = "is not what a unet pipeline feeds"
# (id, edit(pipeline record, unet entry, its inputs by name), message)
TAMPERINGS = [
    (
        "scale-shape",
        lambda p, u, i: i["conditioning_scale"].update(shape=[2]),
        r"unet\.inputs\.conditioning_scale': must have shape \[1\]",
    ),
    (
        "one-channel",
        lambda p, u, i: i["controlnet_cond"]["shape"].__setitem__(2, 1),
        r"unet\.inputs\.controlnet_cond': channels are not 3",
    ),
    (
        "rank-3",
        lambda p, u, i: i["controlnet_cond"].update(shape=["B", 3, "8H", "8W"]),
        r"unet\.inputs\.controlnet_cond': has rank 4, the pipeline needs 5",
    ),
    (
        "count-2",
        lambda p, u, i: p["controlnet"].update(count=2),
        r"controlnet_cond': must stack pipeline\.controlnet\.count \(2\) images first",
    ),
    (
        "int-image",
        lambda p, u, i: i["controlnet_cond"].update(dtype="int64"),
        r"unet\.inputs\.controlnet_cond': has dtype int64",
    ),
    (
        "no-scale",
        _drop_input("conditioning_scale"),
        rf"control_guess, control_rows, controlnet_cond, encoder_hidden_states, sample, "
        rf"timestep {FEEDS} \(conditioning_scale",
    ),
    (
        "no-image",
        _drop_input("controlnet_cond"),
        rf"conditioning_scale, control_guess, control_rows, encoder_hidden_states, sample, "
        rf"timestep {FEEDS}",
    ),
    (
        "no-record",
        lambda p, u, i: p.pop("controlnet"),
        rf"control_rows, controlnet_cond, encoder_hidden_states, sample, timestep {FEEDS} "
        r"\(encoder_hidden_states, sample, timestep\)",
    ),
    (
        "channels-1",
        lambda p, u, i: p["controlnet"].update(conditioning_channels=1),
        r"pipeline\.controlnet\.conditioning_channels': Input should be 3",
    ),
]


@pytest.mark.parametrize(
    ("edit", "error"), [t[1:] for t in TAMPERINGS], ids=[t[0] for t in TAMPERINGS]
)
def test_the_control_inputs_are_checked(controlled, edit, error):
    """A ControlNet bundle's manifest, edited: each edit is refused naming the field (the
    unet's shape profile dropped: it is checked on its own, here the cross-field checks
    speak)."""
    where = controlled("sd15").bundle / "manifest.json"
    data = json.loads(where.read_text())
    unet = data["components"]["unet"]
    unet.pop("profile")
    assert parse_manifest(json.dumps(data).encode(), where).pipeline.controlnet is not None
    edit(data["pipeline"], unet, {spec["name"]: spec for spec in unet["inputs"]})
    with pytest.raises(BundleError, match=error):
        parse_manifest(json.dumps(data).encode(), where)


def test_the_control_profile_is_checked(controlled):
    """The profile must fit the declared control inputs as it fits the others."""
    where = controlled("sd15").bundle / "manifest.json"
    data = json.loads(where.read_text())
    data["components"]["unet"]["profile"]["max"]["conditioning_scale"] = [2]
    with pytest.raises(BundleError, match=r"profile shape \[2\] of conditioning_scale"):
        parse_manifest(json.dumps(data).encode(), where)


@pytest.fixture(scope="module")
def two_controlnets(controlled, tmp_path_factory):
    """tiny:sd15 exported with two ControlNets: the module's and another (another seed)."""
    from slimdiff.export import export_bundle

    c = controlled("sd15")
    root = tmp_path_factory.mktemp("two-controlnets")
    second = save_tiny_controlnet(c.model.denoiser, root / "second", seed=1)
    bundle = root / "bundle"
    export_bundle(c.model, bundle, optimize=False, controlnet=[str(c.folder), str(second)])
    return c, diffusers.ControlNetModel.from_pretrained(second), second, bundle


def test_two_controlnets_match_diffusers_multicontrolnet(two_controlnets):
    """Two ControlNets, each its own image, scale and window, against diffusers' pipeline
    with a list of ControlNets (MultiControlNetModel: the residuals summed)."""
    c, second, second_folder, bundle = two_controlnets
    runtime = Text2ImagePipeline.from_bundle(bundle)
    assert runtime.config.controlnet == ControlNetRecord(count=2, conditioning_channels=3)
    assert runtime.manifest.source["controlnet_2"] == str(second_folder)
    inputs = {spec["name"]: spec for spec in runtime.manifest.components["unet"].inputs}
    assert inputs["controlnet_cond"]["shape"] == [2, "B", 3, "8H", "8W"]
    assert inputs["conditioning_scale"]["shape"] == [2]
    pipe = getattr(diffusers, PIPELINES["sd15"])(
        **c.model.pipe.components, controlnet=[c.controlnet, second]
    )
    config = runtime.scheduler_config
    pipe.scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    pipe.set_progress_bar_config(disable=True)
    latents = _initial_latents(runtime)
    edges, other = control_image(), control_image()[::-1].copy()  # flipped: another image
    settings = {"control_scale": [0.7, 1.2], "control_start": [0.0, 0.2], "control_end": [1.0, 0.8]}
    call = {
        "image": [Image.fromarray(edges), Image.fromarray(other)],
        "latents": torch.from_numpy(latents),
        **_diffusers_control(settings),
    }
    ref_image, ref_latents = _diffusers(pipe, **call)
    _, no_model = _diffusers(pipe, zero=True, **call)
    args = {"steps": STEPS, "guidance": GUIDANCE, "latents": latents}
    result = runtime(PROMPT, control_image=[edges, other], **settings, **args)
    _assert_close_to_diffusers(result.latents, ref_latents, no_model, "two ControlNets")
    assert _psnr(result.image, ref_image) >= 40.0
    # the second ControlNet counts: with it at scale 0 the run is another one
    one = runtime(PROMPT, control_image=[edges, other], control_scale=[0.7, 0.0], **args)
    assert _rel(one.latents, result.latents, ref_latents - no_model) > 0.01
    # one scale for all: both at it
    both = runtime(PROMPT, control_image=[edges, other], control_scale=0.7, **args)
    same = runtime(PROMPT, control_image=[edges, other], control_scale=[0.7, 0.7], **args)
    np.testing.assert_array_equal(both.latents, same.latents)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"control_image": "one"}, r"1 control image\(s\) for this bundle's 2 ControlNet\(s\)"),
        ({"control_image": "three"}, r"3 control image\(s\) for this bundle's 2 ControlNet\(s\)"),
        ({"control_scale": [1.0, 1.0, 1.0]}, r"3 control scales for 2 ControlNet\(s\)"),
        ({"control_end": [1.0]}, r"1 control ends for 2 ControlNet\(s\)"),
        ({"control_start": [0.0, 0.9], "control_end": [1.0, 0.5]}, r"control window 0.9..0.5"),
    ],
)
def test_two_controlnets_refuse_other_counts(two_controlnets, kwargs, error):
    *_, bundle = two_controlnets
    runtime = Text2ImagePipeline.from_bundle(bundle)
    images = {"one": [control_image()], "three": [control_image()] * 3}
    kwargs = {
        **kwargs,
        "control_image": images.get(kwargs.get("control_image"), [control_image()] * 2),
    }
    with pytest.raises(UserError, match=error):
        runtime(PROMPT, steps=1, **kwargs)


def test_run_takes_a_control_image_per_controlnet(two_controlnets, tmp_path):
    """`run --control-image A --control-image B --control-scale S`: one image each, one
    scale for both, as the API's lists."""
    from click.testing import CliRunner

    from slimdiff.cli import main

    *_, bundle = two_controlnets
    paths = []
    for name, pixels in (("a", control_image()), ("b", control_image()[::-1].copy())):
        Image.fromarray(pixels).save(tmp_path / f"{name}.png")
        paths.append(tmp_path / f"{name}.png")
    out = tmp_path / "x.png"
    run = ["run", str(bundle), "--prompt", PROMPT, "--steps", "2", "--out", str(out)]
    images = ["--control-image", str(paths[0]), "--control-image", str(paths[1])]
    done = CliRunner().invoke(main, [*run, *images, "--control-scale", "0.5"])
    assert done.exit_code == 0, done.output
    runtime = Text2ImagePipeline.from_bundle(bundle)
    expected = runtime(PROMPT, steps=2, control_image=paths, control_scale=[0.5, 0.5]).image
    assert np.array_equal(np.asarray(Image.open(out)), expected)
    refused = CliRunner().invoke(main, [*run, *images[:2]])
    assert refused.exit_code == 2
    assert "1 control image(s) for this bundle's 2 ControlNet(s)" in refused.output


def test_an_inpainting_unet_with_a_controlnet_matches_diffusers(tmp_path):
    """An inpainting-trained UNet (9 channels) steered by a ControlNet of its latents (4):
    the ControlNet gets the latents alone, the UNet them with the mask and the masked
    image's latents, as diffusers' StableDiffusionControlNetInpaintPipeline feeds them."""
    from slimdiff.export import export_bundle

    from slimdiff.models import load_model

    base = load_model("tiny:sd15").pipe
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel.from_config(base.unet.config, in_channels=9)
    folder = tmp_path / "model"
    diffusers.StableDiffusionInpaintPipeline(**{**base.components, "unet": unet}).save_pretrained(
        folder
    )
    steer = save_tiny_controlnet(base.unet, tmp_path / "controlnet")  # the 4-channel UNet's
    model = load_model(str(folder))
    export_bundle(model, tmp_path / "bundle", optimize=False, controlnet=str(steer))
    runtime = Text2ImagePipeline.from_bundle(tmp_path / "bundle")
    assert runtime.config.kind.inpainting and runtime.config.controlnet.count == 1
    pipe = diffusers.StableDiffusionControlNetInpaintPipeline(
        **model.pipe.components, controlnet=diffusers.ControlNetModel.from_pretrained(steer)
    )
    config = runtime.scheduler_config
    pipe.scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    pipe.set_progress_bar_config(disable=True)
    noise, posterior = _image_draws(runtime)
    shape = posterior.shape
    masked = np.random.default_rng([MASKED_STREAM, SEED]).standard_normal(shape, dtype=np.float32)
    control, mask = control_image(), test_mask()
    call = {
        "image": Image.fromarray(test_image()),
        "mask_image": Image.fromarray(mask),
        "control_image": Image.fromarray(control),
        "strength": STRENGTH,
        "controlnet_conditioning_scale": 1.0,
        "draws": (noise, posterior, masked),
    }
    ref_image, ref_latents = _diffusers(pipe, **call)
    _, no_model = _diffusers(pipe, zero=True, **call)
    args = {"steps": STEPS, "guidance": GUIDANCE, "seed": SEED, "image": test_image()}
    args.update(strength=STRENGTH, mask_image=mask)
    result = runtime(PROMPT, control_image=control, **args)
    _assert_close_to_diffusers(result.latents, ref_latents, no_model, "9-channel + ControlNet")
    assert _psnr(result.image, ref_image) >= 40.0
    uncontrolled = runtime(PROMPT, **args)
    assert _rel(result.latents, uncontrolled.latents, ref_latents - no_model) > 0.01


# An AOTInductor compile: 111 s on a quiet 2-core host, 2-3x that on a loaded one.
@pytest.mark.timeout(900)
def test_the_aoti_export_keeps_the_control_image_sides_tied_to_the_latents(controlled):
    """`--target aoti`: torch.export with the control image's sides as derived dims (8 x
    the latent sides): the program runs other sizes than it was traced at, as the eager
    module computes them. (Compiling the package takes minutes here; the program is what
    the compiler gets.)"""
    from slimdiff.export.aoti import axis_ranges, export_program
    from slimdiff.export.components import plan_components
    from slimdiff.export.dummy_inputs import Sizes

    c = controlled("sd15")
    component = next(
        p for p in plan_components(c.model, controlnets=[c.controlnet]) if p.name == "unet"
    )
    ranges = axis_ranges(component)
    assert ranges["8H"] == {"min": 8, "max": 8 * ranges["H"]["max"], "multiple": 8}
    assert ranges["8W"] == {"min": 8, "max": 8 * ranges["W"]["max"], "multiple": 8}
    program, axes = export_program(component)
    assert axes == ranges
    # other batch and sides than the trace's (18 x 18); square, as the exported UNet
    # program's own guards (also the plain UNet's) ask of its unlifted module
    feeds = component.make_inputs(Sizes(3, 10, 10, 77, full_text=True, seed=1))
    args = [feeds[n] for n in component.input_names]
    with torch.inference_mode():
        got = program.module()(*args)[0]
        expected = component.module(*args)
    expected = expected[0] if isinstance(expected, tuple) else expected
    assert got.shape == expected.shape == feeds["sample"].shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("family", "guidance"), [("sd15", GUIDANCE), ("sdxl", GUIDANCE), ("sd15", 1.0)]
)
def test_guess_mode_matches_diffusers(controlled, family, guidance):
    """diffusers' guess_mode: residuals scaled by logspace(-1, 0), and under CFG the
    ControlNet on the prompt's half only (zeros for the negative's); without CFG only the
    scaling. The bundle's graph takes it as row weights and a switch."""
    c = controlled(family)
    runtime = Text2ImagePipeline.from_bundle(c.bundle)
    pipe = _pipe(c, PIPELINES[family], runtime)
    latents = _initial_latents(runtime)
    control = control_image()
    call = {"image": Image.fromarray(control), "latents": torch.from_numpy(latents)}
    call.update(guess_mode=True, guidance_scale=guidance)
    ref_image, ref_latents = _diffusers(pipe, **call)
    _, no_model = _diffusers(pipe, zero=True, **call)
    args = {"steps": STEPS, "guidance": guidance, "latents": latents, "control_image": control}
    guessed = runtime(PROMPT, control_guess=True, **args)
    label = f"{family} guess mode, guidance {guidance}"
    _assert_close_to_diffusers(guessed.latents, ref_latents, no_model, label)
    assert _psnr(guessed.image, ref_image) >= 40.0
    plain = runtime(PROMPT, **args)  # the same bundle without guess mode
    assert _rel(guessed.latents, plain.latents, ref_latents - no_model) > 0.01, label


def test_a_pooling_controlnet_runs_in_guess_mode_always(controlled, tmp_path):
    """A ControlNet whose config pools its conditions (global_pool_conditions, as the
    shuffle ControlNet's): taken, recorded in the manifest, and run in guess mode whether
    asked or not, as diffusers' pipelines force it."""
    from slimdiff.export import export_bundle

    c = controlled("sd15")
    folder = tmp_path / "shuffle"
    shutil.copytree(c.folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "global_pool_conditions": True}))
    manifest = export_bundle(c.model, tmp_path / "b", optimize=False, controlnet=str(folder))
    record = manifest.pipeline.controlnet
    assert record.global_pool_conditions is True
    assert "global_pool_conditions" not in c.manifest.pipeline.controlnet.model_dump()
    runtime = Text2ImagePipeline.from_bundle(tmp_path / "b")
    controlnet = diffusers.ControlNetModel.from_pretrained(folder)
    pipe = _pipe(c._replace(controlnet=controlnet), PIPELINES["sd15"], runtime)
    latents = _initial_latents(runtime)
    call = {"image": Image.fromarray(control_image()), "latents": torch.from_numpy(latents)}
    ref_image, ref_latents = _diffusers(pipe, **call)  # guess mode forced by its config
    _, no_model = _diffusers(pipe, zero=True, **call)
    args = {"steps": STEPS, "guidance": GUIDANCE, "latents": latents}
    result = runtime(PROMPT, control_image=control_image(), **args)
    _assert_close_to_diffusers(result.latents, ref_latents, no_model, "pooled ControlNet")
    assert _psnr(result.image, ref_image) >= 40.0
    asked = runtime(PROMPT, control_image=control_image(), control_guess=True, **args)
    np.testing.assert_array_equal(asked.latents, result.latents)


def test_guess_mode_refusals_and_older_bundles(controlled, tmp_path):
    """Guess mode needs a ControlNet bundle whose graph has its inputs: a bundle exported
    before them still reads (its manifest without them validates) but refuses guess mode."""
    from slimdiff.runtime.control import check_control

    c = controlled("sd15")
    runtime = Text2ImagePipeline.from_bundle(c.bundle)
    with pytest.raises(UserError, match="True or False"):
        runtime(PROMPT, steps=1, control_image=control_image(), control_guess="yes")
    where = c.bundle / "manifest.json"
    data = json.loads(where.read_text())
    unet = data["components"]["unet"]
    unet["inputs"] = [
        i for i in unet["inputs"] if i["name"] not in ("control_rows", "control_guess")
    ]
    for bound in unet["profile"].values():
        bound.pop("control_rows"), bound.pop("control_guess")
    old = parse_manifest(json.dumps(data).encode(), where)
    with pytest.raises(UserError, match="exported before guess mode"):
        check_control(old.pipeline, control_image(), 1.0, 0.0, 1.0, True, guess_inputs=False)
    plain = check_control(old.pipeline, control_image(), 1.0, 0.0, 1.0, False, guess_inputs=False)
    assert plain.guess is False
    # one of the two guess inputs alone is not a graph the runtime feeds
    unet.pop("profile")  # checked on its own: here the input set speaks
    unet["inputs"].append({"name": "control_rows", "dtype": "float32", "shape": ["B"]})
    with pytest.raises(BundleError, match="is not what a unet pipeline feeds"):
        parse_manifest(json.dumps(data).encode(), where)


def test_guess_mode_from_the_cli(controlled, tmp_path):
    from click.testing import CliRunner

    from slimdiff.cli import main

    c = controlled("sd15")
    edges = tmp_path / "edges.png"
    Image.fromarray(control_image()).save(edges)
    args = ["run", str(c.bundle), "--prompt", PROMPT, "--steps", "2", "--size", "64x64"]
    outs = []
    for extra in ([], ["--control-guess-mode"]):
        out = tmp_path / f"{len(extra)}.png"
        result = CliRunner().invoke(
            main, [*args, "--control-image", str(edges), *extra, "--out", str(out)]
        )
        assert result.exit_code == 0, result.output
        outs.append(np.array(Image.open(out)))
    assert not np.array_equal(*outs)
    result = CliRunner().invoke(
        main, [*args, "--control-guess-mode", "--out", str(tmp_path / "x.png")]
    )
    assert result.exit_code == 2 and "--control-guess-mode needs --control-image" in result.output
