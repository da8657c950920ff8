"""Fixtures the SD3/FLUX single-file tests share (tests/ldm_checkpoint_mmdit.py)."""

from __future__ import annotations

import pytest

from tests.ldm_checkpoint_mmdit import patch_flux_width, tuned_sd3


@pytest.fixture(scope="module")
def sd3_finetune(tmp_path_factory):
    """(a tiny SD3 pipeline with every weight moved, the base's diffusers folder)."""
    return tuned_sd3(tmp_path_factory.mktemp("sd3"))


@pytest.fixture
def flux_any_width(monkeypatch):
    """diffusers' FLUX single-file converter taking any width (tiny transformers)."""
    patch_flux_width(monkeypatch)
