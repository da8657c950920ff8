"""Batch ranges of the shape profiles (export/profiles.py): what the runtime feeds each
component when a call makes several images."""

from __future__ import annotations

import pytest
from slimdiff.export.components import plan_components
from slimdiff.export.profiles import shape_profile, size_range

from slimdiff.models import load_model


@pytest.mark.parametrize(("family", "text_opt"), [("sd15", 2), ("sdxl", 1)])
def test_batches_for_three_images_per_call(family, text_opt):
    """Text encoders: the prompt and the negative one (opt 1 where SDXL feeds zeros for an
    empty negative prompt); denoiser: CFG's pair per image in one batch; VAE: one image at
    a time."""
    model = load_model(f"tiny:{family}")
    sizes = size_range(model, max_images=3)
    batches = {}
    for component in plan_components(model):
        profile = shape_profile(component, model, sizes)
        first = component.input_names[0]
        batches[component.name] = tuple(profile[p][first][0] for p in ("min", "opt", "max"))
    text = {name: b for name, b in batches.items() if name.startswith("text_encoder")}
    assert text and set(text.values()) == {(1, text_opt, 2)}
    assert batches["unet"] == (1, 2, 6)
    assert batches["vae_decoder"] == (1, 1, 1)
