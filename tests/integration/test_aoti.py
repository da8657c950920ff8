"""AOTInductor target end to end on the CPU: tiny:sdxl's UNet as a .pt2 package, the rest
ONNX, run by the "aoti" backend; the image agrees with the all-ONNX bundle's.

One package compile serves the module (module-scoped fixture): AOTInductor generates and
compiles C++ for the whole UNet with symbolic shapes, which is most of this file's time
(tiny:sdxl UNet: 200-300 s on a shared 2-CPU machine with inductor's defaults; 84 s alone
with the scalar kernels of tests/conftest.py's quick_inductor, 150-190 s in the suite).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from slimdiff.export import export_bundle
from slimdiff.export.components import plan_components
from slimdiff.export.dummy_inputs import Sizes
from slimdiff.runtime import Text2ImagePipeline
from slimdiff.runtime.backends.aoti import AotiBackend
from slimdiff.runtime.backends.ort import OrtBackend, OrtSession

from slimdiff.errors import UserError
from slimdiff.metrics import psnr
from slimdiff.models import load_model
from tests.onnx_check import package_vs_eager, rel_err

# pyproject.toml's 300 s per test catches hangs; the package compile (fixture setup) took
# 230 s on a quiet 2-core host and over 300 s on one loaded three times over (2026-12-07,
# inductor's defaults)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.timeout(900),
]

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def aoti(tmp_path_factory, quick_inductor):
    # Exported from a lazy model, as `slimdiff export` loads one (its weights fetched per
    # component, then freed); the tests compare against the same model loaded in memory.
    out = tmp_path_factory.mktemp("aoti") / "bundle"
    manifest = export_bundle(load_model("tiny:sdxl", weights="lazy"), out, target="aoti")
    return load_model("tiny:sdxl"), out, manifest


@pytest.fixture(scope="module")
def onnx_bundle(shared_bundle):
    return shared_bundle("sdxl", optimize=False)  # the bundle test_export_tiny.py shares


def test_manifest_lists_the_unet_as_aoti_with_the_onnx_io(aoti, onnx_bundle):
    _, out, manifest = aoti
    unet = manifest.components["unet"]
    assert (unet.path, unet.format, unet.precision) == ("unet/model.pt2", "aoti", "fp32")
    assert unet.parity["passed"] and unet.parity["tolerance"] == 1e-4
    assert unet.parity["rel_err"] < 1e-4
    assert unet.parity["inputs"]["sample"] == [3, 4, 10, 24]  # CHECK sizes, not the trace's
    onnx_unet = onnx_bundle.manifest.components["unet"]
    assert unet.inputs == onnx_unet.inputs  # same names, dtypes and axis names
    assert (
        unet.outputs
        == onnx_unet.outputs
        == [{"name": "out_sample", "dtype": "float32", "shape": ["B", 4, "H", "W"]}]
    )
    others = {n: e.format for n, e in manifest.components.items() if n != "unet"}
    assert others == {"text_encoder": "onnx", "text_encoder_2": "onnx", "vae_decoder": "onnx"}
    assert {"unet/model.pt2", "unet/io.json"} <= set(manifest.files)
    io = json.loads((out / "unet" / "io.json").read_text())
    assert io["device"] == "cpu"
    # The package covers the bundle's profile (64..192 px: latent 8..24, batch 1..2).
    lo, hi = unet.profile["min"]["sample"], unet.profile["max"]["sample"]
    for axis, i in (("B", 0), ("H", 2), ("W", 3)):
        assert io["axes"][axis]["min"] <= lo[i] and hi[i] <= io["axes"][axis]["max"]


def test_aoti_image_matches_the_onnx_bundle(aoti, onnx_bundle):
    _, out, _ = aoti
    images = {}
    for name, bundle, backend in (("aoti", out, "aoti"), ("onnx", onnx_bundle.out, "ort-cpu")):
        pipe = Text2ImagePipeline.from_bundle(bundle, backend=backend)
        images[name] = pipe(PROMPT, steps=4, size=(128, 128), seed=3).image
    assert images["aoti"].shape == (128, 128, 3)
    assert psnr(images["aoti"], images["onnx"]) >= 40


def test_package_runs_at_two_sizes_within_its_range(aoti):
    """Dynamic shapes hold: batch 1 at 8x8 latents (the profile's minimum, no CFG), batch 2
    at 12x20 and batch 1 at 3x3 (a 1x1 bottom resolution), none the trace's 2 x 18x18,
    match the eager UNet."""

    model, out, _ = aoti
    unet = next(c for c in plan_components(model) if c.name == "unet")
    session = AotiBackend(device="cpu").load(out / "unet" / "model.pt2")
    assert session.input_names == list(unet.input_names)
    assert session.input_dtypes["sample"] == np.float32
    for sizes in (Sizes(1, 8, 8, 77, seed=5), Sizes(2, 12, 20, 77, seed=6), Sizes(1, 3, 3, 77)):
        got, ref = package_vs_eager(unet, session, sizes)
        assert got.shape == ref.shape == (sizes.batch, 4, sizes.height, sizes.width)
        assert rel_err(got, ref) < 1e-4, sizes


def test_size_outside_the_package_range_is_a_user_error(aoti):
    model, out, _ = aoti
    unet = next(c for c in plan_components(model) if c.name == "unet")
    session = AotiBackend(device="cpu").load(out / "unet" / "model.pt2")
    feeds = {k: v.numpy() for k, v in unet.make_inputs(Sizes(33, 8, 8, 77)).items()}
    with pytest.raises(UserError, match=r"axis B of sample is 33, outside the 1\.\.32"):
        session.run(feeds)


def test_a_run_outside_the_package_range_is_refused_before_it_starts(aoti, monkeypatch):
    """17 images under CFG are 34 UNet rows, past the package's 1..32: refused from its
    io.json before the text encoders run (not at the first step), naming the axis. The
    CLI's image limit (64) is not the package's."""
    _, out, _ = aoti
    pipe = Text2ImagePipeline.from_bundle(out, backend="aoti")
    ran = []
    monkeypatch.setattr(pipe.conditioning, "encode", lambda *a, **k: ran.append(a))
    with pytest.raises(UserError, match=r"axis B of sample is 34, outside the 1\.\.32 .*"
                       r"pick a size or image count within them"):  # fmt: skip
        pipe(PROMPT, steps=1, guidance=5.0, images=17)
    with pytest.raises(UserError, match=r"axis B of sample is 33, outside the 1\.\.32"):
        pipe(PROMPT, steps=1, guidance=1.0, images=33)
    assert ran == []


def test_another_backend_is_told_to_use_aoti(aoti):
    """An ONNX backend on a bundle with a package: one line naming --backend aoti, not
    onnxruntime's protobuf error."""
    _, out, _ = aoti
    with pytest.raises(UserError, match=r"its unet is an AOTInductor package .* --backend aoti"):
        Text2ImagePipeline.from_bundle(out, backend="ort-cpu")


def test_onnx_component_loads_through_the_aoti_backend(aoti):
    _, out, _ = aoti
    path = out / "text_encoder" / "model.onnx"
    session = AotiBackend(device="cpu").load(path)
    assert isinstance(session, OrtSession) and session.providers == ["CPUExecutionProvider"]
    ids = np.zeros((2, 77), np.int64)
    ids[:, 0], ids[:, 1:] = 1, 2  # BOS, then EOS/padding
    got = session.run({"input_ids": ids})
    want = OrtBackend("ort-cpu").load(path).run({"input_ids": ids})
    assert set(got) == {"penultimate_hidden_state"}
    np.testing.assert_array_equal(got["penultimate_hidden_state"], want["penultimate_hidden_state"])


def test_package_for_another_device_is_refused(aoti):
    _, out, _ = aoti
    with pytest.raises(UserError, match="compiled for cpu, not cuda"):
        AotiBackend(device="cuda").load(out / "unet" / "model.pt2")
