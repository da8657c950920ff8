"""An AOTInductor bundle's size range must lie inside the axes its package was exported
for: a range beyond them is one UserError at export, not a failure at run time. And the
session's feeds: constant (read-only) ones reach the device once."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from slimdiff.export.aoti import AXIS_RANGES, axis_ranges, check_profile

from slimdiff.errors import UserError


def _unet(max_side: int) -> tuple[SimpleNamespace, dict]:
    """A UNet-like component (no patch grid) and a profile reaching `max_side` latent px."""
    component = SimpleNamespace(
        name="unet",
        input_names=("sample",),
        dynamic_axes={"sample": {0: "B", 2: "H", 3: "W"}},
        model=torch.nn.Linear(1, 1),
    )
    profile = {"min": {"sample": [1, 4, 8, 8]}, "max": {"sample": [2, 4, max_side, max_side]}}
    return component, profile


def test_a_profile_inside_the_package_axes_passes():
    check_profile(*_unet(AXIS_RANGES["H"][1]))


def test_a_profile_beyond_them_is_refused():
    side = AXIS_RANGES["H"][1] + 8
    with pytest.raises(UserError, match=rf"unet: .* axis H at {side}, outside the 1\.\.256 "):
        check_profile(*_unet(side))


class _Grid(torch.nn.Module):
    """What axis_ranges reads of SD3's transformer: pos_embed with a positions grid."""

    def __init__(self, patch: int, positions: int) -> None:
        super().__init__()
        self.pos_embed = SimpleNamespace(
            patch_size=patch, pos_embed_max_size=positions, cropped_pos_embed=None
        )


@pytest.mark.parametrize(
    ("patch", "positions", "want"),
    [
        (2, 32, {"min": 4, "max": 62, "multiple": 2}),  # tiny:sd3
        (2, 192, {"min": 4, "max": 256, "multiple": 2}),  # SD3 medium: AXIS_RANGES bound
        (4, 40, {"min": 8, "max": 156, "multiple": 4}),
    ],
)
def test_a_patch_grid_narrows_the_sides_to_whole_patches_inside_it(patch, positions, want):
    component = SimpleNamespace(
        input_names=("hidden_states", "encoder_hidden_states"),
        dynamic_axes={"hidden_states": {0: "B", 2: "H", 3: "W"}, "encoder_hidden_states": {1: "S"}},
        model=_Grid(patch, positions),
    )
    ranges = axis_ranges(component)
    assert ranges == {"B": {"min": 1, "max": 32}, "H": want, "W": want, "S": {"min": 1, "max": 512}}


def test_a_side_off_the_patch_step_or_below_two_patches_is_refused():
    component = SimpleNamespace(
        name="transformer",
        input_names=("hidden_states",),
        dynamic_axes={"hidden_states": {0: "B", 2: "H", 3: "W"}},
        model=_Grid(2, 32),
    )

    def profile(lo: int, hi: int) -> dict:
        return {p: {"hidden_states": [1, 16, s, s]} for p, s in (("min", lo), ("max", hi))}

    check_profile(component, profile(4, 62))
    for lo, hi, point, size in ((2, 24, "min", 2), (8, 64, "max", 64), (8, 23, "max", 23)):
        with pytest.raises(
            UserError,
            match=rf"{point} size puts hidden_states axis H at {size}, outside the "
            r"4\.\.62 in steps of 2 its AOTInductor package",
        ):
            check_profile(component, profile(lo, hi))


def _session(calls: list) -> object:
    """An AotiSession around a stand-in for the compiled package (records what it gets)."""
    from slimdiff.runtime.backends.aoti import AotiSession

    def package(sample, states):
        calls.append((sample, states))
        return sample * 2 + states.sum()

    io = {
        "inputs": [
            {"name": "sample", "dtype": "float32", "shape": ["B", 4]},
            {"name": "states", "dtype": "float32", "shape": ["B", 3]},
        ],
        "outputs": [{"name": "out", "dtype": "float32", "shape": ["B", 4]}],
        "axes": {"B": {"min": 1, "max": 2}},
    }
    return AotiSession(package, io, torch.device("cpu"), "unet/model.pt2")


def test_read_only_feeds_are_copied_once_and_reused_while_the_same_array_is_fed():
    calls: list = []
    session = _session(calls)
    states = np.arange(6, dtype=np.float32).reshape(2, 3)
    states.flags.writeable = False  # what the pipeline does to its conditioning
    sample = np.ones((2, 4), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.from_numpy's read-only warning included
        outs = [session.run({"sample": sample + i, "states": states})["out"] for i in range(3)]
    # Each step's latents are copied; the text states once, and the same tensor is reused.
    assert session.copies == 3 + 1
    assert calls[0][1] is calls[1][1] is calls[2][1]
    np.testing.assert_array_equal(outs[2], (sample + 2) * 2 + 15)
    # Another read-only array (the next image's prompt) is copied anew, values and all.
    other = np.full((2, 3), 2, np.float32)
    other.flags.writeable = False
    np.testing.assert_array_equal(session.run({"sample": sample, "states": other})["out"], 14)
    assert session.copies == 4 + 2
    # A writable feed is copied at every call, even when the same array comes back.
    session.run({"sample": sample, "states": other.copy()})
    session.run({"sample": sample, "states": other.copy()})
    assert session.copies == 6 + 4


def test_a_feed_with_too_many_dims_is_refused_before_the_package_runs():
    calls: list = []
    session = _session(calls)
    with pytest.raises(ValueError, match=r"states has 3 dims, the package takes 2"):
        session.run({"sample": np.ones((1, 4), np.float32), "states": np.ones((1, 1, 3))})
    assert calls == []


def test_the_refusal_names_image_pixels_given_the_vae_scale():
    component, profile = _unet(264)
    with pytest.raises(
        UserError,
        match=r"axis H at 264 \(2112 px\), outside the 1\.\.256 \(image sides 8\.\.2048 px\) ",
    ):
        check_profile(component, profile, vae_scale=8)


def test_a_side_off_the_io_records_step_is_refused_by_the_session():
    from slimdiff.runtime.backends.aoti import AotiSession

    io = {
        "inputs": [{"name": "x", "dtype": "float32", "shape": [1, "H"]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [1, "H"]}],
        "axes": {"H": {"min": 4, "max": 62, "multiple": 2}},
    }
    session = AotiSession(lambda x: x + 1, io, torch.device("cpu"), "t/model.pt2")
    np.testing.assert_array_equal(session.run({"x": np.zeros((1, 6), np.float32)})["y"], 1)
    for side in (7, 2, 64):  # off the step, below the range, above it
        with pytest.raises(
            UserError, match=rf"axis H of x is {side}, outside the 4\.\.62 in steps of 2 "
        ):
            session.run({"x": np.zeros((1, side), np.float32)})
