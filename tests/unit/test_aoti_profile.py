"""An AOTInductor bundle's size range must lie inside the axes its package was exported
for: a range beyond them is one UserError at export, not a failure at run time. And the
session's feeds: constant (read-only) ones reach the device once."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from slimdiff.export.aoti import AXIS_RANGES, check_profile

from slimdiff.errors import UserError


def _entry(max_side: int) -> SimpleNamespace:
    spec = {"name": "sample", "dtype": "float32", "shape": ["B", 4, "H", "W"]}
    return SimpleNamespace(
        inputs=[spec],
        profile={"min": {"sample": [1, 4, 8, 8]}, "max": {"sample": [2, 4, max_side, max_side]}},
    )


def test_a_profile_inside_the_package_axes_passes():
    check_profile("unet", _entry(AXIS_RANGES["H"][1]))


def test_a_profile_beyond_them_is_refused():
    side = AXIS_RANGES["H"][1] + 8
    with pytest.raises(UserError, match=rf"unet: .* axis H at {side}, outside the 1\.\.256"):
        check_profile("unet", _entry(side))


def _session(calls: list) -> object:
    """An AotiSession around a stand-in for the compiled package (records what it gets)."""
    import torch
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
