"""ControlNets without an export: the per-step scales and control pixels the runtime feeds
(runtime/control.py), and the checks slimdiff/models/controlnet.py makes on a ControlNet
folder and on a ControlNet against the UNet it is to steer, on models a few kB in size."""

from __future__ import annotations

import json
import os
import pickle

import diffusers
import numpy as np
import pytest
from PIL import Image
from slimdiff.runtime.control import Control, control_pixels, control_scales

from slimdiff.errors import UserError
from slimdiff.models.controlnet import check_controlnet, controlnet_folder, load_controlnet

# A UNet as small as diffusers builds one: two blocks, one ResNet each, 8 and 16 channels.
UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "cross_attention_dim": 8,
    "attention_head_dim": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}
EMBEDDING = (4, 8, 16, 32)  # three halvings: 8 pixels per latent pixel, as the VAEs have
VAE_SCALE = 8


def _unet(**changes):
    return diffusers.UNet2DConditionModel(**{**UNET, **changes})


def _controlnet(unet=None, **changes):
    """A ControlNet made from `unet` (the default tiny one), `changes` to its config."""
    made = diffusers.ControlNetModel.from_unet(
        unet if unet is not None else _unet(), conditioning_embedding_out_channels=EMBEDDING
    )
    if not changes:
        return made
    # without _use_default_values: from_config would put those keys back to the defaults
    config = {k: v for k, v in made.config.items() if k != "_use_default_values"}
    changed = diffusers.ControlNetModel.from_config({**config, **changes})
    assert all(changed.config[k] == v for k, v in changes.items())
    return changed


def _keep(steps: int, start: float, end: float) -> list[float]:
    """diffusers' controlnet_keep (StableDiffusionControlNetPipeline.__call__, 0.42), as
    written there, for one ControlNet."""
    return [1.0 - float(i / steps < start or (i + 1) / steps > end) for i in range(steps)]


# ---------------------------------------------------------------- control_scales


def _control(scales, starts, ends, images=()) -> Control:
    """A run's settings as check_control returns them; `images` non-empty: given."""
    return Control(list(images) or None, tuple(scales), tuple(starts), tuple(ends))


@pytest.mark.parametrize(
    ("steps", "start", "end"),
    [
        (5, 0.0, 1.0),
        (5, 0.2, 0.7),
        (5, 0.5, 0.6),  # no step inside
        (4, 0.25, 0.75),  # window edges on step boundaries
        (3, 0.0, 1 / 3),  # 1/3 is a float: (0 + 1) / 3 > 1/3 must be false
        (7, 0.1, 0.9),
        (10, 0.3, 1.0),
        (1, 0.0, 1.0),
        (1, 0.0, 0.5),  # the only step ends past the window
        (25, 0.0, 0.6),
        (30, 0.35, 0.85),
    ],
)
@pytest.mark.parametrize("scale", [1.0, 0.6, 0.0, 10.0])
def test_control_scales_are_diffusers_controlnet_keep(steps, start, end, scale):
    scales = control_scales(_control([scale], [start], [end], [_GREY]), steps)
    assert len(scales) == steps
    for value in scales:
        assert value.shape == (1,) and value.dtype == np.float32
    expected = np.float32(scale) * np.array(_keep(steps, start, end), np.float32)
    np.testing.assert_array_equal(np.concatenate(scales), expected)


def test_control_scales_by_hand():
    def first(control, steps):
        return [float(s[0]) for s in control_scales(control, steps)]

    assert first(_control([0.5], [0.2], [0.7], [_GREY]), 5) == [0.0, 0.5, 0.5, 0.0, 0.0]
    assert first(_control([1.0], [0.0], [0.5], [_GREY]), 4) == [1.0, 1.0, 0.0, 0.0]
    assert first(_control([1.0], [0.5], [1.0], [_GREY]), 4) == [0.0, 0.0, 1.0, 1.0]
    assert first(_control([1.0], [0.0], [1.0]), 4) == [0.0] * 4  # no image: scale 0


def test_control_scales_of_two_controlnets_each_their_own_window():
    """diffusers' MultiControlNetModel keep lists: one window and scale per ControlNet."""
    control = _control([0.5, 1.5], [0.0, 0.4], [0.6, 1.0], [_GREY, _GREY])
    got = np.stack(control_scales(control, 5))
    assert got.shape == (5, 2) and got.dtype == np.float32
    keeps = np.array([_keep(5, 0.0, 0.6), _keep(5, 0.4, 1.0)], np.float32).T
    np.testing.assert_array_equal(got, keeps * np.float32([0.5, 1.5]))


def test_a_window_that_keeps_no_step_is_warned_once(caplog):
    """[0.5, 0.6] of 2 steps keeps neither (diffusers runs them unsteered too): a warning
    naming the ControlNet; a window that keeps a step, or a scale of 0, is not warned."""
    with caplog.at_level("WARNING", logger="slimdiff.runtime.control"):
        control_scales(_control([1.0, 1.0], [0.5, 0.0], [0.6, 1.0], [_GREY, _GREY]), 2)
        control_scales(_control([0.0], [0.5], [0.6], [_GREY]), 2)
        control_scales(_control([1.0], [0.5], [0.6]), 2)  # no image: nothing to steer
    warned = [r.getMessage() for r in caplog.records]
    assert warned == [
        "ControlNet 0's window [0.5, 0.6] keeps none of the 2 steps that run, so it steers "
        "nothing: widen --control-start/--control-end, or run more steps"
    ]


# ---------------------------------------------------------------- control_pixels


_GREY = Image.new("RGB", (24, 16), (128, 128, 128))


def test_control_pixels_without_images_are_zeros():
    pixels = control_pixels(_control([1.0, 1.0], [0.0, 0.0], [1.0, 1.0]), (16, 24), 2)
    assert pixels.shape == (2, 2, 3, 16, 24) and pixels.dtype == np.float32
    assert not pixels.any()


def test_control_pixels_are_the_images_in_0_1_one_row_each():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    array[0, 0] = (0, 128, 255)
    control = _control([1.0, 1.0], [0.0, 0.0], [1.0, 1.0], [Image.fromarray(array), _GREY])
    pixels = control_pixels(control, (16, 24), 4)
    assert pixels.shape == (2, 4, 3, 16, 24) and pixels.dtype == np.float32
    assert pixels.flags.c_contiguous
    # at its own size: the image / 255, channels first, not normalised to [-1, 1]
    np.testing.assert_allclose(pixels[0, 0], array.transpose(2, 0, 1) / 255.0, rtol=0, atol=1e-7)
    half = np.float32(128) / np.float32(255)  # in float32, as diffusers divides
    np.testing.assert_array_equal(pixels[0, :, :, 0, 0], np.tile([0, half, 1], (4, 1)))
    for row in pixels[0, 1:]:
        np.testing.assert_array_equal(row, pixels[0, 0])
    assert np.all(pixels[1] == half)  # the second ControlNet's image, in its own slot


def test_control_pixels_are_resized_as_diffusers_resizes():
    """Another size: Lanczos, as diffusers' control_image_processor (a VaeImageProcessor
    with do_normalize=False) resizes a PIL image."""
    from diffusers.image_processor import VaeImageProcessor

    y, x = np.mgrid[0:40, 0:56]
    array = np.stack([x * 4, y * 6, (x + y) * 2], -1).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(array)
    pixels = control_pixels(_control([1.0], [0.0], [1.0], [image]), (32, 48), 2)
    assert pixels.shape == (1, 2, 3, 32, 48)
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0
    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    ref = processor.preprocess(image, height=32, width=48).numpy()
    np.testing.assert_allclose(pixels[0, :1], ref, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- controlnet_folder


@pytest.fixture
def saved(tmp_path):
    """A tiny ControlNet saved by diffusers (config.json + safetensors)."""
    folder = tmp_path / "controlnet"
    _controlnet().save_pretrained(folder)
    return folder


def test_a_controlnet_folder_is_taken_as_is(saved):
    assert controlnet_folder(str(saved)) == saved


def test_a_pipeline_folder_resolves_to_its_controlnet(saved, tmp_path):
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text("{}")
    os.rename(saved, pipeline / "controlnet")
    assert controlnet_folder(str(pipeline)) == pipeline / "controlnet"


def test_a_hub_id_is_returned_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert controlnet_folder("lllyasviel/sd-controlnet-canny") == "lllyasviel/sd-controlnet-canny"
    with pytest.raises(UserError, match="no such folder"):
        controlnet_folder("a/b/c")  # not an id: a missing path
    for spec in ("./owner/name", str(tmp_path / "missing"), "missing"):
        with pytest.raises(UserError, match=f"ControlNet {spec}: no such folder"):
            controlnet_folder(spec)


def test_a_hub_id_not_downloaded_is_refused_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"could not load it: download it first"):
        load_controlnet("slimdiff-tests/no-such-controlnet")


def test_a_file_that_is_no_controlnet_is_refused(saved):
    notes = saved / "notes.txt"
    notes.write_text("a ControlNet?")
    with pytest.raises(UserError, match=f"ControlNet {notes}.*diffusers ControlNet folder"):
        controlnet_folder(str(notes))


def test_a_folder_without_config_is_refused(tmp_path):
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=r"has no config\.json"):
        controlnet_folder(str(tmp_path))


@pytest.mark.parametrize(
    ("text", "error"),
    [("{not json", "config.json is not readable JSON"), ("[1, 2]", "is not a JSON object")],
)
def test_a_config_that_is_not_json_is_refused(tmp_path, text, error):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(UserError, match=error):
        controlnet_folder(str(tmp_path))


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("FluxControlNetModel", r"is a FLUX ControlNet \(FluxControlNetModel\)"),
        ("SD3ControlNetModel", r"is an SD3 ControlNet \(SD3ControlNetModel\)"),
        ("ControlNetUnionModel", r"is a ControlNet-Union"),
        ("T2IAdapter", r"is a T2I-Adapter, not a ControlNet \(T2IAdapter\)"),
        ("UNet2DConditionModel", r"config.json names 'UNet2DConditionModel', not a ControlNet"),
        (None, r"config.json names None, not a ControlNetModel"),
    ],
)
def test_other_classes_are_refused(tmp_path, name, error):
    config = {"in_channels": 4} if name is None else {"_class_name": name, "in_channels": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=error):
        controlnet_folder(str(tmp_path))


# ---------------------------------------------------------------- load_controlnet


def test_load_controlnet_reads_safetensors(saved):
    controlnet = load_controlnet(str(saved))
    assert type(controlnet).__name__ == "ControlNetModel"
    assert not controlnet.training
    assert not any(p.requires_grad for p in controlnet.parameters())


class _Unpickled:
    """Pickles to a call that creates a folder: if it exists, the file was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickled_weights_are_never_read(tmp_path):
    folder = tmp_path / "controlnet"
    _controlnet().save_config(folder)
    marker = tmp_path / "unpickled"
    (folder / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Unpickled(marker)))
    with pytest.raises(UserError, match=r"holds only pickled weights .* pass --allow-pickle"):
        load_controlnet(str(folder))
    assert not marker.exists()
    # with allow_pickle it is read, through torch's weights-only unpickler (diffusers'),
    # which refuses a file that calls anything: one line, and still no marker
    with pytest.raises(UserError, match="could not load it: its weights do not fit"):
        load_controlnet(str(folder), allow_pickle=True)
    assert not marker.exists()
    # garbage where the safetensors should be: refused too, as a UserError
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="could not load it"):
        load_controlnet(str(folder))
    assert not marker.exists()


# ---------------------------------------------------------------- check_controlnet


def test_a_controlnet_from_the_unet_fits_it():
    unet = _unet()
    assert check_controlnet(_controlnet(unet), unet, VAE_SCALE, "cn") is None


def test_an_inpainting_unet_takes_a_controlnet_for_its_latents():
    """A 9-channel inpainting UNet's ControlNet reads the 4 latent channels (diffusers'
    ControlNet inpaint pipeline feeds it those); one made from the 9-channel UNet does not fit."""
    unet = _unet(in_channels=9)
    assert check_controlnet(_controlnet(), unet, VAE_SCALE, "cn") is None
    with pytest.raises(UserError, match="takes 9-channel latents, this model has 4"):
        check_controlnet(_controlnet(unet), unet, VAE_SCALE, "cn")


@pytest.mark.parametrize(
    ("controlnet", "error"),
    [
        (
            lambda: _controlnet(cross_attention_dim=16),
            r"ControlNet cn has cross_attention_dim 16, this model's UNet 8: it is a "
            r"ControlNet for another model \(SD1.5 vs SDXL",
        ),
        (
            lambda: _controlnet(conditioning_channels=1),
            r"takes 1-channel control images; slimdiff feeds RGB \(3\)",
        ),
        (
            lambda: diffusers.ControlNetModel.from_unet(
                _unet(), conditioning_embedding_out_channels=(4, 8, 16)
            ),
            "maps 4 image pixels to a latent pixel, this model's VAE 8",
        ),
        (
            lambda: diffusers.ControlNetModel.from_unet(
                _unet(), conditioning_embedding_out_channels=(4, 8, 16, 32, 64)
            ),
            "maps 16 image pixels to a latent pixel, this model's VAE 8",
        ),
        (lambda: _controlnet(in_channels=16), "takes 16-channel latents, this model has 4"),
        (
            lambda: _controlnet(_unet(layers_per_block=2)),
            r"gives 6 down residuals of widths \[8, 8, 8, 8, 16, 16\], but this UNet's down "
            r"path has 4 skips of widths \[8, 8, 8, 16\]",
        ),
        (
            lambda: _controlnet(_unet(block_out_channels=(8, 24), norm_num_groups=4)),
            r"widths \[8, 8, 8, 24\], but this UNet's down path has 4 skips of widths "
            r"\[8, 8, 8, 16\]",
        ),
    ],
    ids=[
        "cross-attention",
        "one-channel",
        "short-embedding",
        "long-embedding",
        "latent-channels",
        "more-resnets",
        "other-widths",
    ],
)
def test_a_controlnet_that_does_not_fit_is_refused(controlnet, error):
    with pytest.raises(UserError, match=error):
        check_controlnet(controlnet(), _unet(), VAE_SCALE, "cn")


def test_an_sdxl_controlnet_on_an_sd15_unet_and_back():
    """The added conditioning differs (SDXL's text_time embedding): another family."""
    sdxl = {
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 4,
        "projection_class_embeddings_input_dim": 8 + 6 * 4,
    }
    sd15, xl = _unet(), _unet(**sdxl)
    ours = "this model's UNet"
    with pytest.raises(UserError, match=f"has addition_embed_type text_time, {ours} None"):
        check_controlnet(_controlnet(xl), sd15, VAE_SCALE, "cn")
    with pytest.raises(UserError, match=f"has addition_embed_type None, {ours} text_time"):
        check_controlnet(_controlnet(sd15), xl, VAE_SCALE, "cn")
    other = _unet(**{**sdxl, "projection_class_embeddings_input_dim": 8 + 6 * 2})
    with pytest.raises(UserError, match=f"projection_class_embeddings_input_dim 32, {ours} 20"):
        check_controlnet(_controlnet(xl), other, VAE_SCALE, "cn")
    assert check_controlnet(_controlnet(xl), xl, VAE_SCALE, "cn") is None


def test_a_transformer_is_refused():
    class Transformer:  # what matters: no down path
        def __init__(self):
            self.config = {"in_channels": 16}

    with pytest.raises(UserError, match="denoiser is a Transformer; ControlNets steer"):
        check_controlnet(_controlnet(), Transformer(), VAE_SCALE, "cn")


def test_a_folder_with_only_an_fp16_variant_loads_it(tmp_path):
    """diffusers' `save_pretrained(variant="fp16")` (diffusion_pytorch_model.fp16
    .safetensors) is all some hub folders hold: read as float32."""
    import torch

    reference = _controlnet()
    folder = tmp_path / "fp16"
    reference.half().save_pretrained(folder, variant="fp16")
    loaded = load_controlnet(str(folder))
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    expected = reference.state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, expected[name].float()), name


def test_a_folder_without_weights_is_refused(tmp_path):
    folder = tmp_path / "config-only"
    _controlnet().save_config(folder)
    with pytest.raises(UserError, match=r"has no diffusion_pytorch_model\.safetensors"):
        load_controlnet(str(folder))


def test_the_same_controlnet_may_come_twice_but_not_five():
    """One OpenPose ControlNet for two poses is a real use (diffusers takes it twice)."""
    from slimdiff.export import controlnet_specs

    assert controlnet_specs(["pose", "pose"]) == ["pose", "pose"]
    assert controlnet_specs("a") == ["a"] and controlnet_specs(None) == []
    with pytest.raises(UserError, match="5 ControlNets: a bundle takes at most 4"):
        controlnet_specs(["a"] * 5)


def test_a_config_check_needs_no_weights(tmp_path):
    """precheck_controlnets reads config.json alone: another family's ControlNet is
    refused before a recipe compresses anything."""
    from slimdiff.models.controlnet import precheck_controlnets

    folder = tmp_path / "cn"
    _controlnet(cross_attention_dim=16).save_config(folder)  # no weights at all
    with pytest.raises(UserError, match="has cross_attention_dim 16, this model's UNet 8"):
        precheck_controlnets([str(folder)], _unet(), VAE_SCALE)
    _controlnet().save_config(folder)
    assert precheck_controlnets([str(folder)], _unet(), VAE_SCALE) is None
