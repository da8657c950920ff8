"""The runtime's conditioning, driven by each family's KindSpec, against diffusers' own:
FLUX packing and ids, SD3's joined text states, SDXL's zero negative, sizes, pixels out."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from slimdiff.runtime.conditioning import Conditioning
from slimdiff.runtime.image import save_png, to_uint8
from slimdiff.runtime.manifest import BundleError, Manifest, PipelineSpec
from slimdiff.runtime.pipeline import Text2ImagePipeline

from slimdiff.errors import UserError
from slimdiff.models import get_arch
from slimdiff.models.kinds import pack_latents


def _config(family: str, guidance_embeds: bool = True, **extra) -> dict:
    """A bundle's `pipeline` record for `family`, as Conditioning receives it (the kind as
    the validated KindSpec the manifest reader makes of it)."""
    arch = get_arch(family)
    config = {"guidance_embeds": guidance_embeds, "patch_size": 2}
    return {
        "kind": arch.kind_for(config),
        "vae_scale_factor": 8,
        "latent_channels": 4 if arch.denoiser == "unet" else 16,
        "default_size": [64, 64],
        "default_steps": 4,
        "default_guidance": 5.0,
        "uses_cfg": arch.uses_cfg,
        **extra,
    }


def _cond(family: str, encoders=(), **extra) -> Conditioning:
    return Conditioning(_config(family, **extra), list(encoders), {})


def _pipeline(family: str) -> Text2ImagePipeline:
    config = _config(family)
    # Only the argument checks run (no graphs): a manifest without validation suffices.
    manifest = Manifest.model_construct(
        family=family, pipeline=PipelineSpec.model_construct(**config)
    )
    return Text2ImagePipeline(manifest, Conditioning(config, [], {}), None, None, {})


def test_flux_packing_matches_diffusers():
    cond = _cond("flux")
    x = np.random.default_rng(0).standard_normal((1, 16, 12, 8)).astype(np.float32)
    packed = pack_latents(x, 2)
    ref = FluxPipeline._pack_latents(torch.from_numpy(x), 1, 16, 12, 8).numpy()
    np.testing.assert_array_equal(packed, ref)  # (1, 24, 64)
    back = cond.vae_latents(packed, 96, 64)
    ref_back = FluxPipeline._unpack_latents(torch.from_numpy(ref), 96, 64, 8).numpy()
    np.testing.assert_array_equal(back, ref_back)
    np.testing.assert_array_equal(back, x)


def test_flux_seeded_noise_is_drawn_unpacked_then_packed():
    cond = _cond("flux")
    noise = cond.initial_latents(None, 7, 64, 32, scheduler=_Sigma(1.0))
    raw = np.random.default_rng(7).standard_normal((1, 16, 8, 4)).astype(np.float32)
    np.testing.assert_array_equal(noise, pack_latents(raw, 2))
    assert noise.shape == cond.latent_shape(64, 32) == (1, 8, 64)


class _Sigma:
    """A scheduler as far as initial_latents reads it."""

    def __init__(self, init_noise_sigma: float) -> None:
        self.init_noise_sigma = init_noise_sigma


class _FakeEncoder:
    """Stands in for a TextEncoder: fixed outputs, so only the conditioning logic is tested."""

    def __init__(self, kind: str, outputs: dict[str, np.ndarray], segment: int = 0) -> None:
        self.kind, self.name, self.segment = kind, kind, segment
        self._outputs = outputs
        self.outputs = tuple(outputs)
        self.hidden_output = next((k for k in outputs if k.endswith("hidden_state")), None)
        self.pooled_outputs = tuple(k for k in outputs if k in ("text_embeds", "pooler_output"))
        self.calls: list[list[str]] = []

    def __call__(self, texts, warn=True):
        self.calls.append(list(texts))
        return {k: np.repeat(v, len(texts), axis=0) for k, v in self._outputs.items()}

    max_length = 4  # tokens, here words: what `cut` cuts beyond

    def cut(self, texts):
        return [t for t in texts if len(t.split()) > self.max_length]


def test_flux_feeds_ids_and_guidance_match_diffusers():
    clip = _FakeEncoder(
        "clip",
        {
            "pooler_output": np.full((1, 8), 2.0, np.float32),
        },
    )
    t5 = _FakeEncoder("t5", {"last_hidden_state": np.full((1, 512, 32), 3.0, np.float32)})
    cond = _cond("flux", [clip, t5], guidance_embeds=True)
    feeds = cond.encode("a cat", None, False, 3.5, 96, 64)
    ref_ids = FluxPipeline._prepare_latent_image_ids(1, 96 // 16, 64 // 16, "cpu", torch.float32)
    np.testing.assert_array_equal(feeds["img_ids"], ref_ids.numpy())  # (24, 3)
    np.testing.assert_array_equal(feeds["txt_ids"], np.zeros((512, 3), np.float32))
    assert feeds["guidance"].tolist() == [3.5]
    assert feeds["pooled_projections"].tolist() == [[2.0] * 8]
    assert feeds["encoder_hidden_states"].shape == (1, 512, 32)
    step = cond.step_feeds(np.zeros((1, 24, 64), np.float32), np.float32(750.0))
    assert step["timestep"].tolist() == [0.75]  # FluxPipeline passes t / 1000


def test_a_long_prompt_is_warned_of_once_for_all_encoders(caplog):
    out = {"penultimate_hidden_state": np.ones((1, 77, 4), np.float32)}
    cond = _cond("sd15", [_FakeEncoder("clip", out), _FakeEncoder("clip", out)])
    long = "a red cat on a blue square"
    with caplog.at_level("WARNING"):
        cond.encode([long, long], "blurry " + long, True, 5.0, 64, 64)
        # FLUX's true CFG pass encodes the negative prompts as prompts
        cond.encode("blurry " + long, None, False, 5.0, 64, 64, prompts_are="negative prompt")
        cond.encode("a cat", "blurry", True, 5.0, 64, 64)  # nothing cut
    rest = "is longer than the 4 tokens CLIP reads; the rest is ignored, as in diffusers"
    negative = f"negative prompt {'blurry ' + long!r} {rest}"
    assert [r.getMessage() for r in caplog.records] == [
        f"prompt {long!r} {rest}",
        negative,
        negative,  # the true CFG pass's
    ]


def test_sdxl_zero_negative_and_time_ids():
    enc1 = _FakeEncoder("clip", {"penultimate_hidden_state": np.ones((1, 77, 4), np.float32)})
    enc2 = _FakeEncoder(
        "clip",
        {
            "penultimate_hidden_state": np.ones((1, 77, 6), np.float32),
            "text_embeds": np.full((1, 5), 2.0, np.float32),
        },
    )
    cond = _cond("sdxl", [enc1, enc2], force_zeros_for_empty_prompt=True)
    feeds = cond.encode("a cat", None, True, 5.0, 128, 64)
    assert enc1.calls == [["a cat"]]  # no negative prompt encoded: zeros instead
    assert feeds["encoder_hidden_states"].shape == (2, 77, 10)
    assert not feeds["encoder_hidden_states"][0].any() and feeds["text_embeds"][0].sum() == 0
    assert feeds["time_ids"].tolist() == [[128, 64, 0, 0, 128, 64]] * 2
    cond.encode("a cat", "blurry", True, 5.0, 128, 64)
    assert enc2.calls[-1] == ["blurry", "a cat"]  # (uncond, cond), as diffusers batches


def test_sdxl_time_id_rows_follow_the_negative_and_prompt_rows():
    """Negative rows first, for every prompt and image (diffusers 0.42's text-to-image
    pipeline repeats [negative, prompt] pairs instead, which mixes them up past one image
    when the two differ; its img2img pipeline orders them as here)."""
    out = {"penultimate_hidden_state": np.ones((1, 77, 4), np.float32)}
    pooled = {**out, "text_embeds": np.ones((1, 5), np.float32)}
    cond = _cond("sdxl", [_FakeEncoder("clip", out), _FakeEncoder("clip", pooled)])
    rows = (np.arange(6, dtype=np.float32), np.arange(6, dtype=np.float32) + 10)
    feeds = cond.encode(["a", "b"], None, True, 5.0, 64, 64, images=2, time_ids=rows)
    assert feeds["time_ids"].tolist() == [rows[0].tolist()] * 4 + [rows[1].tolist()] * 4
    alone = cond.encode("a", None, False, 5.0, 64, 64, time_ids=rows)
    assert alone["time_ids"].tolist() == [rows[1].tolist()]  # no CFG: the prompt's row


def test_sd3_pads_clip_states_to_t5_width_then_joins_sequences():
    clip_l = _FakeEncoder(
        "clip",
        {
            "penultimate_hidden_state": np.ones((1, 77, 4), np.float32),
            "text_embeds": np.full((1, 4), 1.0, np.float32),
        },
    )
    clip_g = _FakeEncoder(
        "clip",
        {
            "penultimate_hidden_state": np.full((1, 77, 6), 2.0, np.float32),
            "text_embeds": np.full((1, 6), 2.0, np.float32),
        },
    )
    t5 = _FakeEncoder("t5", {"last_hidden_state": np.full((1, 256, 16), 3.0, np.float32)}, 1)
    cond = _cond("sd3", [clip_l, clip_g, t5])
    feeds = cond.encode("a cat", None, True, 5.0, 64, 64)
    states = feeds["encoder_hidden_states"]
    assert states.shape == (2, 77 + 256, 16)
    assert states[0, 0].tolist() == [1.0] * 4 + [2.0] * 6 + [0.0] * 6
    assert (states[:, 77:] == 3.0).all()
    assert feeds["pooled_projections"].shape == (2, 10)
    assert t5.calls == [["", "a cat"]]  # SD3 encodes "" for the negative, never zeros


@pytest.mark.parametrize(("family", "multiple"), [("sdxl", 8), ("sd3", 16), ("flux", 16)])
def test_size_must_be_a_multiple_of_the_latent_grid(family, multiple):
    pipe = _pipeline(family)
    assert pipe.conditioning.size_multiple() == multiple
    bad = (multiple * 16 + 2, multiple * 16)
    match = rf"size {bad[1]}x{bad[0]} \(width x height\) is not a multiple of {multiple}"
    with pytest.raises(UserError, match=match):
        pipe("a cat", size=bad)


def test_size_error_suggests_the_nearest_valid_size():
    match = r"size 128x130 \(width x height\) is not a multiple of 8; use e.g. 128x128"
    with pytest.raises(UserError, match=match):
        _pipeline("sd15")("a cat", size=(130, 128))
    with pytest.raises(UserError, match=r"size 72x48 \(width x height\).* use e.g. 80x48"):
        _pipeline("flux")("a cat", size=(48, 72))


def test_bad_output_and_steps_are_user_errors():
    with pytest.raises(UserError, match="output 'pil' is not one of: image, latent"):
        _pipeline("sd15")("a cat", output="pil")
    with pytest.raises(UserError, match="steps must be at least 1"):
        _pipeline("sd15")("a cat", steps=0)


def test_latents_of_the_wrong_shape_are_a_user_error():
    cond = _cond("sd3")
    # width x height, as run --size spells it: a 64-high, 128-wide run
    with pytest.raises(UserError, match=r"size 128x64 \(width x height\) needs \(1, 16, 8, 16\)"):
        cond.initial_latents(np.zeros((1, 4, 8, 8)), 0, 64, 128, scheduler=_Sigma(1.0))


def test_to_uint8_matches_diffusers_postprocess():
    x = np.random.default_rng(0).normal(0, 0.7, (3, 16, 24)).astype(np.float32)
    x[0, 0, :4] = [-1.5, 1.5, 0.0, 0.5]  # clipped both ways, exact mid-grey
    ref = VaeImageProcessor().postprocess(torch.from_numpy(x[None]), output_type="pil")[0]
    np.testing.assert_array_equal(to_uint8(x), np.array(ref))


def test_save_png_round_trips_and_leaves_no_temp_file(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    path = save_png(img, tmp_path / "sub" / "out.png")
    np.testing.assert_array_equal(np.array(Image.open(path)), img)
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.png"]


def test_denoiser_inputs_follow_the_pipeline_record():
    assert _cond("sd15").denoiser_inputs() == {"sample", "timestep", "encoder_hidden_states"}
    assert _cond("sdxl").denoiser_inputs() - _cond("sd15").denoiser_inputs() == {
        "text_embeds",
        "time_ids",
    }
    schnell = _cond("flux", guidance_embeds=False).denoiser_inputs()
    dev = _cond("flux", guidance_embeds=True).denoiser_inputs()
    assert dev - schnell == {"guidance"} and {"img_ids", "txt_ids"} <= schnell


def test_given_latents_are_scaled_by_init_noise_sigma_like_diffusers():
    cond = _cond("sdxl")
    given = np.ones((1, 4, 8, 8), np.float32)
    scaled = cond.initial_latents(given, 0, 64, 64, scheduler=_Sigma(14.6))
    np.testing.assert_array_equal(scaled, given * np.float32(14.6))


def test_a_pooled_input_without_a_pooled_encoder_is_a_bundle_error():
    enc = _FakeEncoder("clip", {"penultimate_hidden_state": np.ones((1, 77, 4), np.float32)})
    with pytest.raises(BundleError, match="takes text_embeds but no text encoder outputs"):
        _cond("sdxl", [enc]).encode("a cat", "", True, 5.0, 64, 64)


def test_an_unvalidated_kind_record_is_refused():
    config = {**_config("sdxl"), "kind": _config("sdxl")["kind"].model_dump(mode="json")}
    with pytest.raises(TypeError, match="must be a validated KindSpec"):
        Conditioning(config, [], {})


def test_a_size_far_from_the_trained_one_is_warned_about(caplog):
    from slimdiff.runtime.call_checks import check_run_args

    pipe = _pipeline("sd15")  # draws 64x64 by default
    assert check_run_args(pipe.config, 8, 4, (128, 128), "image") == (128, 128)
    assert not caplog.records
    check_run_args(pipe.config, 8, 4, (512, 512), "image")
    (record,) = caplog.records
    assert "size 512x512 is far from the 64x64 this model draws by default" in record.getMessage()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"guidance": float("nan")}, "guidance nan: use a finite value"),
        ({"guidance": 1e308}, "use a finite value from 0 to 100"),
        ({"seed": -1}, "seed -1: use an integer from 0 to 4294967295"),
        ({"seed": 2**70}, "use an integer from 0"),
        ({"steps": 1_000_000_000}, "steps must be at most 1000"),
        ({"size": (100000, 64)}, "each side must be 8 to 8192"),
        ({"size": "64x64"}, r"size '64x64': pass \(height, width\) in whole pixels"),
        ({"size": (64.5, 64)}, "in whole pixels"),
        ({"size": (64,)}, "in whole pixels"),
        ({"size": np.array([64, 64, 3])}, "in whole pixels"),
        ({"latents": np.full((1, 4, 8, 8), np.nan, np.float32)}, "NaN or infinite"),
        ({"latents": np.array(["x"])}, "not numbers"),
    ],
)
def test_api_arguments_out_of_bounds_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        _pipeline("sd15")("a cat", **kwargs)


_IMG2IMG = {
    "sd15": "stable_diffusion.pipeline_stable_diffusion_img2img.StableDiffusionImg2ImgPipeline",
    "sdxl": "stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img."
    "StableDiffusionXLImg2ImgPipeline",
    "sd3": "stable_diffusion_3.pipeline_stable_diffusion_3_img2img.StableDiffusion3Img2ImgPipeline",
    "flux": "flux.pipeline_flux_img2img.FluxImg2ImgPipeline",
}


@pytest.mark.parametrize("family", sorted(_IMG2IMG))
@pytest.mark.parametrize("order", [1, 2])
def test_img2img_begin_is_the_family_pipelines_get_timesteps(family, order):
    """Every (steps, strength) of a grid starts where the family's diffusers img2img
    pipeline starts: its own get_timesteps, run on a stand-in scheduler."""
    import importlib
    from types import SimpleNamespace

    from slimdiff.models.kinds import img2img_begin

    module, _, name = _IMG2IMG[family].rpartition(".")
    cls = getattr(importlib.import_module(f"diffusers.pipelines.{module}"), name)
    kind = get_arch(family).kind
    for steps in (1, 2, 3, 4, 5, 7, 10, 25, 30, 50):
        for strength in (0.01, 0.1, 0.3, 1 / 3, 0.5, 0.55, 0.6, 0.75, 0.8, 0.99, 1.0):
            begun = []
            scheduler = SimpleNamespace(
                timesteps=torch.arange(steps * order), order=order, set_begin_index=begun.append
            )
            cls.get_timesteps(SimpleNamespace(scheduler=scheduler), steps, strength, "cpu")
            assert img2img_begin(kind, steps, strength, order) == begun[0], (steps, strength)


def test_prepare_image_is_diffusers_preprocess(tmp_path):
    """Resize (Lanczos) and normalisation as VaeImageProcessor.preprocess, bit for bit; the
    default size is the image's own cut down to the multiple."""
    from slimdiff.runtime.image import image_size, load_image, prepare_image

    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (37, 50, 3), dtype=np.uint8)
    pil = Image.fromarray(array)
    processor = VaeImageProcessor(vae_scale_factor=8)
    for size in [(32, 48), (64, 64), (40, 56)]:
        ref = processor.preprocess(pil, height=size[0], width=size[1]).numpy()
        ours = prepare_image(load_image(array), size)
        assert ours.shape == (1, 3, *size) and ours.dtype == np.float32
        np.testing.assert_array_equal(ours, ref)
    assert image_size(pil, 8, 4096) == (32, 48)
    assert image_size(pil, 16, 4096) == (32, 48)
    # an RGBA or grey file comes in as RGB; EXIF orientation is applied
    rgba = tmp_path / "rgba.png"
    Image.fromarray(rng.integers(0, 256, (16, 24, 4), dtype=np.uint8), "RGBA").save(rgba)
    assert load_image(rgba).mode == "RGB" and load_image(rgba).size == (24, 16)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(array).save(rotated, exif=exif)
    assert load_image(rotated).size == (37, 50)
    with pytest.raises(UserError, match="each side must be 16 to 4096"):
        image_size(Image.fromarray(array[:8]), 16, 4096)


def test_odd_image_files_load_or_are_refused_in_one_line(tmp_path, monkeypatch):
    """16-bit grey is scaled to 8 bits (PIL's convert would clip it to white), a float
    image and an oversized one are refused as UserErrors, not tracebacks."""
    from slimdiff.runtime.image import load_image

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    grey = np.asarray(load_image(tmp_path / "grey16.png"))
    assert grey.shape == (64, 64, 3) and grey.dtype == np.uint8
    np.testing.assert_array_equal(grey[..., 0], (ramp / 257.0).round().astype(np.uint8))
    Image.fromarray(np.zeros((8, 8), np.float32), mode="F").save(tmp_path / "float.tiff")
    with pytest.raises(UserError, match="floating-point image"):
        load_image(tmp_path / "float.tiff")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 2x this is PIL's hard limit
    with pytest.raises(UserError, match="too large to open safely"):
        load_image(tmp_path / "grey16.png")


def test_32_bit_integer_images_keep_8_bit_values_and_scale_16_bit_ones(tmp_path):
    """Mode "I" holds 8-bit values (int32 arrays, 32-bit TIFFs: kept, as diffusers' convert
    keeps them) or 16-bit ones (16-bit PNGs as Pillow before 10 opened them: scaled)."""
    from slimdiff.runtime.image import load_image

    mask = np.zeros((8, 8), np.int32)
    mask[:, 4:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.tiff")
    assert Image.open(tmp_path / "mask.tiff").mode == "I"
    got = np.asarray(load_image(tmp_path / "mask.tiff", "mask"))
    np.testing.assert_array_equal(got[..., 1], mask.astype(np.uint8))
    wide = Image.fromarray(np.array([[0, 257, 65535]], np.int32))
    np.testing.assert_array_equal(np.asarray(load_image(wide))[0, :, 2], [0, 1, 255])


def test_image_paths_that_are_not_image_files_say_what_they_are(tmp_path):
    from slimdiff.runtime.image import load_image, save_image

    with pytest.raises(UserError, match=r"^mask .*: a folder, not an image file$"):
        load_image(tmp_path, "mask")
    with pytest.raises(UserError, match=r"^image .*missing.png: no such file$"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(UserError, match=r"^control image /dev/null: not a regular file"):
        load_image("/dev/null", "control image")
    with pytest.raises(UserError, match=r"^mask array of shape \(2, 2, 4\)"):
        load_image(np.zeros((2, 2, 4), np.uint8), "mask")
    # what a latent-only call returns has no image: one line, not PIL's TypeError
    for bad in (None, np.zeros((1, 4, 8, 8), np.float32)):
        with pytest.raises(UserError, match=r"an \(H, W, 3\) uint8 array, not .*output='latent'"):
            save_image(bad, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("value", [None, "x", [0.5], float("nan"), -0.1])
def test_a_guidance_rescale_that_is_not_a_number_from_0_to_1_is_one_line(value):
    from slimdiff.runtime.call_checks import check_rescale

    with pytest.raises(UserError, match="use a value from 0 to 1"):
        check_rescale(value, uses_cfg=True)


def test_non_finite_values_stop_the_run_with_exit_code_1():
    from slimdiff.runtime.call_checks import check_finite

    check_finite(np.ones(4, np.float32), "in x", "fix it")  # finite: nothing
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(UserError, match=r"^NaN or infinite values in x; fix it$") as err:
            check_finite(np.array([0.0, bad], np.float32), "in x", "fix it")
        assert err.value.exit_code == 1


@pytest.mark.parametrize(
    ("name", "fmt", "exact"),
    [
        ("a.png", "PNG", True),
        ("a", "PNG", True),
        ("a.JPG", "JPEG", False),
        ("a.jpeg", "JPEG", False),
        ("a.webp", "WEBP", True),
    ],
)
def test_save_image_writes_the_format_its_suffix_names(tmp_path, name, fmt, exact):
    from PIL import Image
    from slimdiff.runtime.image import save_image

    rng = np.random.default_rng(0)
    img = (rng.random((16, 24, 3)) * 255).astype(np.uint8)
    path = save_image(img, tmp_path / name)
    with Image.open(path) as saved:
        assert saved.format == fmt and saved.size == (24, 16)
        back = np.asarray(saved.convert("RGB"))
    error = np.abs(back.astype(int) - img).mean()
    assert error == 0 if exact else error < 8  # JPEG at quality 95 on noise
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_save_image_refuses_other_suffixes_before_writing(tmp_path):
    from slimdiff.runtime.image import save_image

    with pytest.raises(UserError, match=r"a.gif: images are written as .png, .jpg or .webp"):
        save_image(np.zeros((8, 8, 3), np.uint8), tmp_path / "a.gif")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("family", "kwargs", "names", "why"),
    [
        (
            "flux",
            {"negative_prompt": "blurry"},
            "the negative prompt",
            "runs without classifier-free guidance (it embeds the guidance, or was distilled "
            "without it); a true_cfg_scale above 1 runs the negative prompt",
        ),
        (
            "sdxl",
            {"guidance": 1.0, "negative_prompt": ["x"], "guidance_rescale": 0.7},
            "the negative prompt, guidance rescale",
            "guidance 1 turns classifier-free guidance off",
        ),
        (
            "sdxl",
            {"guidance": 0.0, "negative_original_size": (512, 512)},
            "the negative size conditioning",
            "guidance 0 turns",
        ),
    ],
)
def test_values_a_run_without_cfg_ignores_are_named(family, kwargs, names, why, caplog):
    """The warning comes with the argument checks, before any graph runs (none here)."""
    with caplog.at_level("WARNING"), contextlib.suppress(Exception):
        _pipeline(family)("a cat", **kwargs)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ignored:")]
    assert len(lines) == 1 and lines[0].startswith(f"ignored: {names}; ") and why in lines[0]


def test_nothing_is_said_when_guidance_uses_them(caplog):
    with caplog.at_level("WARNING"), contextlib.suppress(Exception):
        _pipeline("sdxl")("a cat", negative_prompt="blurry", guidance=5.0)
        _pipeline("flux")("a cat", negative_prompt="")
    assert not [r for r in caplog.records if r.getMessage().startswith("ignored:")]


def test_strength_without_an_image_is_refused():
    with pytest.raises(UserError, match="strength sets how far an image is noised: pass the"):
        _pipeline("sdxl")("a cat", strength=0.5)


def test_a_prompt_that_is_not_utf8_is_one_line():
    """A shell argument in Latin-1 reaches Python with its byte escaped as a surrogate."""
    from slimdiff.runtime.call_checks import check_prompts

    latin1 = b"caf\xe9".decode("utf-8", "surrogateescape")
    with pytest.raises(UserError, match=r"^prompt 'caf'\.\.\.: byte 0xe9 is not UTF-8 text"):
        check_prompts(latin1, None)
    with pytest.raises(UserError, match=r"byte 0xe9 is not UTF-8 text"):
        check_prompts(["a", "b"], ["x", latin1])
    assert check_prompts("café", "ünïcode") == (["café"], ["ünïcode"])
