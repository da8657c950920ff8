"""Image-to-image from a bundle reproduces diffusers' img2img pipelines, family by family.

The bundles come from the session's shared exports (tests/conftest.py), which carry the VAE
encoder. diffusers' pipeline (StableDiffusion(XL|3)Img2ImgPipeline, FluxImg2ImgPipeline,
built from the same components) gets the runtime's two draws, the posterior sample of
the VAE encoder and the noise the image is noised with, through its randn_tensor; the
final latents must then agree to 1e-4 of the denoiser's contribution and the images to
40 dB, as in test_runtime_vs_diffusers.py.
"""

from __future__ import annotations

import importlib

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from slimdiff.runtime import Text2ImagePipeline
from slimdiff.runtime.img2img import MASKED_STREAM, POSTERIOR_STREAM, encode_image

from slimdiff.errors import UserError
from slimdiff.models.kinds import unpack_latents
from tests.integration.test_runtime_vs_diffusers import (
    PROMPT,
    SIZE,
    _assert_close_to_diffusers,
    _psnr,
)

pytestmark = pytest.mark.slow

STEPS = 5
SEED = 3
# strength 0.5 of 5 steps: SD1.5/SDXL denoise int(2.5) = 2 steps (start 3), SD3/FLUX start
# at int(2.5) = 2 (3 steps): both roundings of get_timesteps are exercised
STRENGTH = 0.5
CASES = [("sd15", 5.0), ("sdxl", 5.0), ("sd3", 5.0), ("flux", 3.5)]
PIPELINES = {
    "sd15": "stable_diffusion.pipeline_stable_diffusion_img2img.StableDiffusionImg2ImgPipeline",
    "sdxl": "stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img."
    "StableDiffusionXLImg2ImgPipeline",
    "sd3": "stable_diffusion_3.pipeline_stable_diffusion_3_img2img.StableDiffusion3Img2ImgPipeline",
    "flux": "flux.pipeline_flux_img2img.FluxImg2ImgPipeline",
}


def test_image(size: int = SIZE) -> np.ndarray:
    """A picture with structure at every scale: a disc on a gradient, (H, W, 3) uint8."""
    y, x = np.mgrid[0:size, 0:size] / size
    disc = ((x - 0.4) ** 2 + (y - 0.55) ** 2 < 0.08).astype(np.float64)
    rgb = np.stack([0.2 + 0.7 * disc, 0.3 + 0.5 * x * (1 - disc), 0.8 * y], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


test_image.__test__ = False  # a helper, not a test


INPAINT = {
    "sd15": "stable_diffusion.pipeline_stable_diffusion_inpaint.StableDiffusionInpaintPipeline",
    "sdxl": "stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint."
    "StableDiffusionXLInpaintPipeline",
    "sd3": "stable_diffusion_3.pipeline_stable_diffusion_3_inpaint.StableDiffusion3InpaintPipeline",
    "flux": "flux.pipeline_flux_inpaint.FluxInpaintPipeline",
}


def test_mask(size: int = SIZE) -> np.ndarray:
    """Repaint the right part: white there, black on the left, a grey ramp between (the
    binarisation at half grey decides it), (H, W) uint8."""
    ramp = np.clip((np.arange(size) - size * 0.4) / (size * 0.2), 0, 1)
    return np.tile((ramp * 255).round().astype(np.uint8), (size, 1))


test_mask.__test__ = False  # a helper, not a test


def _img2img_pipe(model, family: str, pipelines: dict = PIPELINES):
    module, _, name = pipelines[family].rpartition(".")
    module = importlib.import_module(f"diffusers.pipelines.{module}")
    # a model loaded as the pipeline itself keeps its config (the SDXL refiner's
    # requires_aesthetics_score and force_zeros_for_empty_prompt), in a pipeline of its own
    # (the caller sets its scheduler)
    cls = getattr(module, name)
    pipe = cls.from_pipe(model.pipe) if type(model.pipe) is cls else cls(**model.pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return module, pipe


def _diffusers(
    model, family, runtime, guidance, zero=False, strength=STRENGTH, mask=None, given=None
):
    """diffusers' image and final latents, with the runtime's draws (module docstring);
    with `mask`, its inpaint pipeline; `given`: more keywords for its call."""
    from diffusers.models.autoencoders import vae as vae_module

    module, pipe = _img2img_pipe(model, family, PIPELINES if mask is None else INPAINT)
    config = runtime.scheduler_config  # the bundle's, or the one `scheduler=` switched to
    pipe.scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    cond = runtime.conditioning
    lat_h = lat_w = SIZE // cond.vae_scale
    noise = unpack_latents(cond.noise(SEED, SIZE, SIZE), cond.kind.latent_packing, lat_h, lat_w)
    shape = (1, cond.channels, lat_h, lat_w)
    posterior, masked = (
        np.random.default_rng([stream, SEED]).standard_normal(shape, dtype=np.float32)
        for stream in (POSTERIOR_STREAM, MASKED_STREAM)
    )
    # the VAE posterior's draws in diffusers' order: the image's (unless an inpainting
    # model starts from pure noise), then an inpainting model's masked image's
    draws = [posterior]
    if runtime.config.kind.inpainting:
        draws = [masked] if strength == 1.0 else [posterior, masked]
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    handle = denoiser.register_forward_hook(
        lambda _m, _a, out: (torch.zeros_like(out[0]), *out[1:]) if zero else None
    )
    final = {}

    def keep_last(_pipe, step, _t, kwargs):
        final["latents"] = kwargs["latents"].numpy().copy()
        return kwargs

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "randn_tensor", lambda shape, **_: torch.from_numpy(noise))
        calls = iter(range(len(draws) + 8))
        patch.setattr(
            vae_module,
            "randn_tensor",
            lambda shape, **_: torch.from_numpy(draws[min(next(calls), len(draws) - 1)]),
        )
        extra = {} if mask is None else {"mask_image": Image.fromarray(mask)}
        images = pipe(
            PROMPT,
            image=Image.fromarray(test_image()),  # a uint8 array would be read as [0, 1]
            strength=strength,
            **extra,
            num_inference_steps=STEPS,
            guidance_scale=guidance,
            height=SIZE,
            width=SIZE,
            callback_on_step_end=keep_last,
            **(given or {}),
        ).images
    handle.remove()
    return np.array(images[0]), final["latents"]


def _compare(model, family, runtime, guidance, strength=STRENGTH, mask=None, given=None, **call):
    """Run the runtime and diffusers (twice: as is, and with the denoiser zeroed) on the
    same draws; assert the final latents and images agree (module docstring). `given`:
    keywords both calls take (diffusers' names); `call`: the runtime's alone. Returns the
    runtime's result and diffusers' image and latents."""
    given = given or {}
    args = (model, family, runtime, guidance)
    ref_image, ref_latents = _diffusers(*args, False, strength, mask, given)
    _, no_model = _diffusers(*args, True, strength, mask, given)
    result = runtime(
        PROMPT,
        steps=STEPS,
        guidance=guidance,
        seed=SEED,
        image=test_image(),
        strength=strength,
        mask_image=mask,
        **given,
        **call,
    )
    _assert_close_to_diffusers(result.latents, ref_latents, no_model, family)
    return result, ref_image, ref_latents


@pytest.mark.parametrize(("family", "guidance"), CASES)
def test_img2img_matches_diffusers(tiny_bundle, family, guidance):
    model, bundle = tiny_bundle(family)
    runtime = Text2ImagePipeline.from_bundle(bundle)
    steps_seen = []
    on_step = lambda done, total: steps_seen.append((done, total))  # noqa: E731
    result, ref_image, _ = _compare(model, family, runtime, guidance, on_step=on_step)
    assert _psnr(result.image, ref_image) >= 40.0
    runs = 2 if runtime.config.kind.strength_rounding is None else 3
    assert len(result.timings_ms["denoiser_steps"]) == runs
    assert steps_seen == [(i + 1, runs) for i in range(runs)]
    assert result.timings_ms["vae_encode"] > 0


@pytest.mark.parametrize(("family", "guidance"), CASES)
@pytest.mark.parametrize("strength", [STRENGTH, 1.0])
def test_inpainting_matches_diffusers(tiny_bundle, family, guidance, strength):
    """Inpainting with a model not trained for it, as diffusers' inpaint pipelines do it
    (the kept latents put back after every step); at strength 1 from pure noise."""
    model, bundle = tiny_bundle(family)
    runtime = Text2ImagePipeline.from_bundle(bundle)
    mask = test_mask()
    result, ref_image, ref_latents = _compare(model, family, runtime, guidance, strength, mask)
    if family == "sd3":
        # diffusers 0.42's StableDiffusion3InpaintPipeline decodes latents / scaling_factor
        # without adding the VAE's shift_factor back (its text-to-image and img2img
        # pipelines add it, and its own encode subtracts it): the runtime decodes as those
        # do, so its image is compared with diffusers' latents decoded that way
        vae = model.pipe.vae
        with torch.no_grad():
            z = torch.from_numpy(ref_latents) / vae.config.scaling_factor + vae.config.shift_factor
            decoded = vae.decode(z, return_dict=False)[0]
        ref_image = np.array(model.pipe.image_processor.postprocess(decoded)[0])
    assert _psnr(result.image, ref_image) >= 40.0
    # the kept part is the image's own latents: only the VAE's round trip changes it
    cond = runtime.conditioning
    h = w = SIZE // cond.vae_scale
    final = unpack_latents(result.latents, cond.kind.latent_packing, h, w)
    kept = test_mask()[:: cond.vae_scale, :: cond.vae_scale] < 128  # (h, w)
    assert kept.sum() > 0 and (~kept).sum() > 0
    encoded = encode_image(runtime.config, runtime.vae_encoder, _pixels(), SEED, 1)
    clean = unpack_latents(encoded, cond.kind.latent_packing, h, w)
    np.testing.assert_allclose(final[..., kept], clean[..., kept], rtol=0, atol=1e-6)
    assert np.abs(final[..., ~kept] - clean[..., ~kept]).max() > 0.1


@pytest.fixture(scope="module")
def inpainting_model(tmp_path_factory):
    """`inpainting_model(family)`: (LoadedModel, bundle) of an inpainting-trained tiny
    model: the family's tiny pipeline with a 9-channel UNet, saved as diffusers'
    inpaint pipeline saves it, loaded and exported by slimdiff (the VAE encoder comes
    along by itself)."""
    from slimdiff.export import export_bundle

    from slimdiff.models import load_model

    cache = {}

    def get(family: str):
        if family not in cache:
            base = load_model(f"tiny:{family}").pipe
            torch.manual_seed(0)
            unet = diffusers.UNet2DConditionModel.from_config(base.unet.config, in_channels=9)
            cls = getattr(diffusers, INPAINT[family].rpartition(".")[2])
            folder = tmp_path_factory.mktemp(f"inpaint-{family}") / "model"
            cls(**{**base.components, "unet": unet}).save_pretrained(folder)
            model = load_model(str(folder))
            bundle = folder.parent / "bundle"
            export_bundle(model, bundle, optimize=False)
            cache[family] = model, bundle
        return cache[family]

    return get


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("strength", [STRENGTH, 1.0])
def test_inpainting_models_match_diffusers(inpainting_model, family, strength):
    """A 9-channel inpainting UNet gets the mask and the masked image's latents joined to
    its latents at every step, as diffusers' inpaint pipelines give them."""
    model, bundle = inpainting_model(family)
    runtime = Text2ImagePipeline.from_bundle(bundle)
    assert runtime.config.kind.inpainting and runtime.vae_encoder is not None
    result, ref_image, _ = _compare(model, family, runtime, 5.0, strength, test_mask())
    assert _psnr(result.image, ref_image) >= 40.0


def test_inpainting_models_need_an_image_and_a_mask(inpainting_model, tmp_path):
    model, bundle = inpainting_model("sd15")
    runtime = Text2ImagePipeline.from_bundle(bundle)
    for call in ({}, {"image": test_image()}):
        with pytest.raises(UserError, match="this is an inpainting model"):
            runtime(PROMPT, steps=2, **call)
    from slimdiff.calib import Calibration
    from slimdiff.recipe import CalibrationSpec

    calib = Calibration(model.pipe, model.arch, CalibrationSpec(num_prompts=1, steps=2))
    with pytest.raises(UserError, match="an inpainting model"):
        calib.record()


def _pixels():
    from slimdiff.runtime.image import load_image, prepare_image

    return prepare_image(load_image(test_image()), (SIZE, SIZE))


# Schedulers with a history or two calls per step, from a start past 0: their history must
# begin there, as diffusers' set_begin_index makes it (PNDM's off-by-one start included).
SWITCHED = ["dpm++2m-karras", "unipc", "heun", "pndm", "lms", "deis", "dpm++2s"]


@pytest.mark.parametrize("name", SWITCHED)
def test_img2img_with_other_schedulers_matches_diffusers(tiny_bundle, name):
    model, bundle = tiny_bundle("sd15")
    runtime = Text2ImagePipeline.from_bundle(bundle, scheduler=name)
    result, ref_image, _ = _compare(model, "sd15", runtime, 5.0)
    assert _psnr(result.image, ref_image) >= 40.0


def test_img2img_strength_one_and_images(tiny_bundle):
    """strength 1 runs every step; several images share the encoded image but not the
    noise, and the first is the one-image call's."""
    _, bundle = tiny_bundle("sd15")
    runtime = Text2ImagePipeline.from_bundle(bundle)
    args = {"steps": 3, "guidance": 5.0, "seed": 5, "image": test_image()}
    one = runtime(PROMPT, strength=1.0, **args)
    assert len(one.timings_ms["denoiser_steps"]) == 3
    three = runtime(PROMPT, strength=1.0, images=3, **args)
    np.testing.assert_array_equal(three.images[0], one.image)
    assert not np.array_equal(three.latents[1], three.latents[0])
    # ... with a scheduler that adds noise every step too (each image has its own stream)
    ancestral = Text2ImagePipeline.from_bundle(bundle, scheduler="euler-a")
    one_a = ancestral(PROMPT, strength=0.7, **args)
    three_a = ancestral(PROMPT, strength=0.7, images=3, **args)
    np.testing.assert_allclose(three_a.latents[:1], one_a.latents, rtol=0, atol=1e-4)
    # a lower strength keeps more of the image: the result is closer to the input
    low = runtime(PROMPT, strength=0.34, **args)
    assert len(low.timings_ms["denoiser_steps"]) == 1
    source = test_image().astype(np.float64)
    assert np.abs(low.image - source).mean() < np.abs(one.image - source).mean()


def test_img2img_resizes_to_size_and_cuts_to_the_multiple(tiny_bundle, tmp_path):
    _, bundle = tiny_bundle("sdxl")
    runtime = Text2ImagePipeline.from_bundle(bundle)
    m = runtime.conditioning.size_multiple()
    path = tmp_path / "odd.png"
    Image.fromarray(test_image(SIZE + m // 2 + 1)).save(path)  # not a multiple
    args = {"steps": 2, "strength": 1.0, "output": "latent"}
    cut = runtime(PROMPT, image=path, **args)
    h, w = (SIZE + m // 2 + 1) // m * m, (SIZE + m // 2 + 1) // m * m
    assert cut.latents.shape == runtime.conditioning.latent_shape(h, w)
    resized = runtime(PROMPT, image=path, size=(SIZE, SIZE + m), **args)
    assert resized.latents.shape == runtime.conditioning.latent_shape(SIZE, SIZE + m)


def test_img2img_refusals(tiny_bundle, tmp_path):
    _, bundle = tiny_bundle("sd15")
    runtime = Text2ImagePipeline.from_bundle(bundle)
    image = test_image()
    with pytest.raises(UserError, match="leaves no step to run"):
        runtime(PROMPT, steps=4, image=image, strength=0.2)  # int(0.8) = 0 steps
    with pytest.raises(UserError, match="strength 0"):
        runtime(PROMPT, image=image, strength=0)
    with pytest.raises(UserError, match="exclusive"):
        runtime(PROMPT, image=image, latents=np.zeros(runtime.conditioning.latent_shape(64, 64)))
    with pytest.raises(UserError, match=r"\(H, W, 3\) uint8"):
        runtime(PROMPT, image=image.astype(np.float32))
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(UserError, match="cannot be read as an image"):
        runtime(PROMPT, image=bad)
    with pytest.raises(UserError, match="no such file"):
        runtime(PROMPT, image=tmp_path / "missing.png")
    with pytest.raises(UserError, match="each side must be"):
        runtime(PROMPT, image=test_image(4))


def test_an_all_black_mask_runs_with_a_warning(tiny_bundle, caplog):
    """diffusers runs every step and gives the image back; the runtime too, and says so."""
    _, bundle = tiny_bundle("sd15")
    runtime = Text2ImagePipeline.from_bundle(bundle)
    black = np.zeros((SIZE, SIZE), np.uint8)
    with caplog.at_level("WARNING", logger="slimdiff.runtime.pipeline"):
        result = runtime(PROMPT, steps=2, image=test_image(), mask_image=black, strength=0.5)
    assert result.image.shape == (SIZE, SIZE, 3)
    warned = [r.getMessage() for r in caplog.records if r.name == "slimdiff.runtime.pipeline"]
    assert warned == [
        "the mask is all black (kept): nothing will be repainted; white marks what to repaint"
    ]


def test_a_vae_output_of_another_shape_or_type_is_refused(tiny_bundle):
    """A decoder graph that is not the manifest's (rows cut, ints) stops the run in one
    line, not a 64x17 or integer image written in silence."""
    from slimdiff.runtime.manifest import VAE_OUTPUT, BundleError

    _, bundle = tiny_bundle("sd15")
    runtime = Text2ImagePipeline.from_bundle(bundle)
    decoder = runtime.vae_decoder
    for cut in (lambda y: y[:, :, :17], lambda y: y.astype(np.int64)):

        class Cut:
            def run(self, feeds, cut=cut):
                return {VAE_OUTPUT: cut(decoder.run(feeds)[VAE_OUTPUT])}

        runtime.vae_decoder = Cut()
        with pytest.raises(BundleError, match=r"VAE decoder's output is .* not float pixels"):
            runtime(PROMPT, steps=1, size=(SIZE, SIZE))


def test_img2img_from_the_cli(tiny_bundle, tmp_path):
    from click.testing import CliRunner

    from slimdiff.cli import main

    _, bundle = tiny_bundle("sd15")
    source = tmp_path / "in.png"
    Image.fromarray(test_image()).save(source)
    out = tmp_path / "out.png"
    args = ["run", str(bundle), "--prompt", PROMPT, "--image", str(source), "--steps", "4"]
    result = CliRunner().invoke(main, [*args, "--strength", "0.5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "vae encode" in result.output and ", 2 steps," in result.output
    assert Image.open(out).size == (SIZE, SIZE)
    mask = tmp_path / "mask.png"
    Image.fromarray(test_mask()).save(mask)
    painted = tmp_path / "painted.png"
    args += ["--mask", str(mask), "--out", str(painted)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    # SD1.5 inpainting's default strength, 1.0: all 4 steps run, from pure noise
    assert ", 4 steps," in result.output and Image.open(painted).size == (SIZE, SIZE)


def test_a_bundle_without_the_encoder(tiny_bundle, tmp_path):
    """An encoder-less manifest (every bundle before --vae-encoder) is valid; image-to-image
    on it names the export option."""
    import json
    import shutil

    _, bundle = tiny_bundle("sd15")
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["components"]["vae_encoder"]
    manifest["files"] = {k: v for k, v in manifest["files"].items() if "vae_encoder/" not in k}
    (copy / "manifest.json").chmod(0o644)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(copy / "vae_encoder")
    runtime = Text2ImagePipeline.from_bundle(copy)
    assert runtime.vae_encoder is None
    with pytest.raises(UserError, match="export it again with --vae-encoder"):
        runtime(PROMPT, image=test_image())


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        (lambda e: e["inputs"][0].update(name="pixels"), "must be exactly \\[image\\]"),
        (lambda e: e["inputs"][0]["shape"].__setitem__(1, 4), "3 \\(RGB\\) channels"),
        (lambda e: e["outputs"][1]["shape"].__setitem__(1, 16), "latent_channels"),
        (lambda e: e["outputs"].pop(), "latent_std': missing"),
    ],
)
def test_the_encoder_entry_is_checked(tiny_bundle, edit, error):
    import json

    from slimdiff.runtime.manifest import BundleError, parse_manifest

    _, bundle = tiny_bundle("sd15")
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = manifest["components"]["vae_encoder"]
    entry.pop("profile")  # checked on its own: here the entry's own checks speak
    edit(entry)
    with pytest.raises(BundleError, match=error):
        parse_manifest(json.dumps(manifest).encode(), bundle)


def test_img2img_low_memory_equals_resident(tiny_bundle):
    """--low-memory loads the encoder for its phase only; the image is the same."""
    _, bundle = tiny_bundle("sd15")
    args = {"steps": 3, "guidance": 5.0, "seed": 2, "image": test_image(), "strength": 0.7}
    resident = Text2ImagePipeline.from_bundle(bundle)
    text_only = resident(PROMPT, steps=3)
    assert "load" not in text_only.timings_ms and not resident.vae_encoder.loaded
    first = resident(PROMPT, **args)
    assert first.timings_ms["load"] > 0 and resident.vae_encoder.loaded  # kept from now on
    assert "load" not in resident(PROMPT, **args).timings_ms
    low = Text2ImagePipeline.from_bundle(bundle, low_memory=True)
    resident_with = []  # what else is loaded while the VAE encoder runs: nothing
    encoder_run = low.vae_encoder.run

    def run(feeds):
        others = (*[e.session for e in low.conditioning.encoders], low.denoiser, low.vae_decoder)
        resident_with.append(sum(session.loaded for session in others))
        return encoder_run(feeds)

    low.vae_encoder.run = run
    result = low(PROMPT, **args)
    np.testing.assert_array_equal(result.image, first.image)
    assert not low.vae_encoder.loaded and low.vae_encoder.loads == 1
    assert resident_with == [0]
