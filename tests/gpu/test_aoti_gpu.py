"""AOTInductor target on a real GPU: tiny:sdxl's UNet compiled for CUDA (Triton kernels)
gives the image the all-ONNX CPU bundle gives (skipped without CUDA).

The UNet alone moves to the GPU before export: a package is compiled for the device of
its model (export/aoti.py), while the ONNX components trace and check on the CPU as in
every other bundle.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

PROMPT = "a red circle"


def test_aoti_cuda_image_matches_the_onnx_cpu_bundle(tmp_path):
    import torch
    from slimdiff.export import export_bundle
    from slimdiff.export.components import plan_components
    from slimdiff.export.dummy_inputs import Sizes
    from slimdiff.runtime import Text2ImagePipeline
    from slimdiff.runtime.backends.aoti import AotiBackend

    from slimdiff.metrics import psnr
    from slimdiff.models import load_model

    export_bundle(load_model("tiny:sdxl"), tmp_path / "onnx", optimize=False)
    model = load_model("tiny:sdxl")
    model.denoiser.to("cuda")
    manifest = export_bundle(model, tmp_path / "aoti", target="aoti")
    unet = manifest.components["unet"]
    assert (unet.format, unet.path) == ("aoti", "unet/model.pt2")
    assert unet.parity["passed"] and unet.parity["rel_err"] < 1e-4  # eager CUDA vs package
    io = json.loads((tmp_path / "aoti" / "unet" / "io.json").read_text())
    assert io["device"] == "cuda"

    # Two sizes on the package, against the eager CUDA UNet: dynamic shapes hold there too.
    component = next(c for c in plan_components(model) if c.name == "unet")
    session = AotiBackend().load(tmp_path / "aoti" / "unet" / "model.pt2")
    for sizes in (Sizes(1, 8, 8, 77, seed=5), Sizes(2, 12, 20, 77, seed=6)):
        feeds = component.make_inputs(sizes)
        with torch.inference_mode():
            ref = component.module(*(feeds[n].cuda() for n in component.input_names)).cpu()
        got = session.run({k: v.numpy() for k, v in feeds.items()})["out_sample"]
        assert got.shape == tuple(ref.shape)
        assert np.abs(got - ref.numpy()).max() / np.abs(ref.numpy()).max() < 1e-4

    noise = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
    images = {}
    for name, backend in (("aoti", "aoti"), ("onnx", "ort-cpu")):
        pipe = Text2ImagePipeline.from_bundle(tmp_path / name, backend=backend)
        images[name] = pipe(PROMPT, steps=4, size=(128, 128), latents=noise).image
    assert psnr(images["aoti"], images["onnx"]) >= 40
