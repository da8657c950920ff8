"""An AOTInductor bundle's size range must lie inside the axes its package was exported
for: a range beyond them is one UserError at export, not a failure at run time."""

from __future__ import annotations

from types import SimpleNamespace

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
