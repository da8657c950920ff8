"""export_bundle(release_weights=True): each component's torch weights are freed once traced,
and the bundle is the one a normal export writes."""

from __future__ import annotations

import pytest
from slimdiff.export import export_bundle

from slimdiff.models import load_model


def test_released_export_writes_the_same_bundle(tmp_path):
    family = "sd3"  # three text encoders, a transformer, fusions on: every release path
    kept = export_bundle(load_model(f"tiny:{family}"), tmp_path / "kept")
    model = load_model(f"tiny:{family}")
    released = export_bundle(model, tmp_path / "released", release_weights=True)
    # The same graphs byte for byte (every file's SHA-256), checked against the same torch
    # outputs: the references are computed before the weights go.
    assert released.files == kept.files
    for name, entry in released.components.items():
        assert entry.parity["passed"], name
        assert entry.parity["rel_err"] == pytest.approx(kept.components[name].parity["rel_err"])
    # Every exported module's weights are gone: nothing of the pipeline stays resident.
    pipe = model.pipe
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae", model.arch.denoiser):
        module = getattr(pipe, name, None)
        if module is not None:
            assert {p.device.type for p in module.parameters()} == {"meta"}, name
