"""SDXL's size conditioning: the checks of a call's values, and the time id rows of each
diffusers pipeline (text-to-image, image-to-image, the refiner); the images themselves
are compared with diffusers in tests/integration/test_size_conditioning.py."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
from slimdiff.runtime.size_conditioning import (
    SIZE_CONDITIONING,
    SizeConditioning,
    check_size_conditioning,
    time_id_rows,
)

from slimdiff.errors import UserError


def _rows(values: dict, image_to_image: bool = False, aesthetic=None) -> list[list[float]]:
    checked = check_size_conditioning(True, values)
    rows = time_id_rows(checked, 96, 64, image_to_image=image_to_image, aesthetic=aesthetic)
    assert all(r.dtype == np.float32 for r in rows)
    return [r.tolist() for r in rows]


def test_defaults_are_the_image_size_uncropped():
    assert _rows({}) == [[96, 64, 0, 0, 96, 64]] * 2
    assert _rows({}, image_to_image=True) == [[96, 64, 0, 0, 96, 64]] * 2
    assert _rows({}, aesthetic=(2.5, 6.0)) == [[96, 64, 0, 0, 2.5], [96, 64, 0, 0, 6.0]]


def test_text_to_image_takes_negatives_only_in_pairs(caplog):
    given = {"original_size": (512, 256), "crops_coords_top_left": (8, 4)}
    assert _rows(given) == [[512, 256, 8, 4, 96, 64]] * 2
    pair = {"negative_original_size": (32, 16), "negative_target_size": (64, 64)}
    assert _rows({**given, **pair}) == [[32, 16, 0, 0, 64, 64], [512, 256, 8, 4, 96, 64]]
    crop = {"negative_crops_coords_top_left": (2, 1)}
    assert _rows({**pair, **crop})[0] == [32, 16, 2, 1, 64, 64]
    with caplog.at_level(logging.WARNING):
        assert _rows({"negative_target_size": (64, 64)}) == [[96, 64, 0, 0, 96, 64]] * 2
    assert "negative_target_size: not used by SDXL text-to-image" in caplog.text


def test_image_to_image_defaults_each_negative_and_keeps_the_prompt_crop(caplog):
    given = {"crops_coords_top_left": (8, 4), "negative_original_size": (32, 16)}
    assert _rows(given, True) == [[32, 16, 8, 4, 96, 64], [96, 64, 8, 4, 96, 64]]
    with caplog.at_level(logging.WARNING):
        rows = _rows({"negative_crops_coords_top_left": (2, 2)}, True)
    assert rows == [[96, 64, 0, 0, 96, 64]] * 2
    assert "negative_crops_coords_top_left: not used by SDXL image-to-image" in caplog.text


def test_the_refiner_has_its_own_negative_crop_and_no_target(caplog):
    given = {"original_size": (512, 256), "crops_coords_top_left": (8, 4)}
    assert _rows(given, True, (2.5, 6.0)) == [[512, 256, 0, 0, 2.5], [512, 256, 8, 4, 6.0]]
    with caplog.at_level(logging.WARNING):
        given = {"target_size": (10, 10), "negative_crops_coords_top_left": (1, 2)}
        rows = _rows(given, True, (1, 9))
    assert rows == [[96, 64, 1, 2, 1], [96, 64, 0, 0, 9]]
    assert "target_size: not used by the SDXL refiner" in caplog.text


def test_values_are_pairs_of_whole_numbers():
    checked = check_size_conditioning(
        True, {"original_size": [np.int64(4096), 2048.0], "crops_coords_top_left": (0, 0)}
    )
    assert checked == SizeConditioning(original_size=(4096, 2048), crops_coords_top_left=(0, 0))
    assert check_size_conditioning(False, dict.fromkeys(SIZE_CONDITIONING)) == SizeConditioning()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("original_size", 512),
        ("original_size", "512x512"),
        ("original_size", (512,)),
        ("original_size", (512, 512, 3)),
        ("original_size", (0, 512)),
        ("original_size", (512, 16385)),
        ("target_size", (512.5, 512)),
        ("target_size", (True, 512)),
        ("negative_original_size", (None, 512)),
        ("crops_coords_top_left", (-1, 0)),
        ("negative_crops_coords_top_left", (0, 1e9)),
    ],
)
def test_bad_values_are_user_errors(name, value):
    kind = re.escape("(top, left)" if "crops" in name else "(height, width)")
    with pytest.raises(UserError, match=rf"^{name} .*: use two whole numbers {kind}"):
        check_size_conditioning(True, {name: value})


def test_a_denoiser_without_time_ids_is_refused_any_value():
    with pytest.raises(UserError, match=r"^target_size, crops_coords_top_left: size and crop"):
        check_size_conditioning(False, {"target_size": (8, 8), "crops_coords_top_left": (0, 0)})
    with pytest.raises(ValueError, match="not size conditioning: size"):
        check_size_conditioning(True, {"size": (8, 8)})
