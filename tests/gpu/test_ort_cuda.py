"""ORT CUDA backend on a real GPU: same images as the CPU backend (skipped without CUDA)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def _cuda_ep_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(not _cuda_ep_available(), reason="onnxruntime-gpu (CUDA EP) not installed")
def test_ort_cuda_matches_ort_cpu(tmp_path):
    from slimdiff.export import export_bundle
    from slimdiff.runtime import Text2ImagePipeline

    from slimdiff.metrics import psnr
    from slimdiff.models import load_model

    export_bundle(load_model("tiny:sdxl"), tmp_path / "b")
    noise = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
    images = {}
    for backend in ("ort-cpu", "ort-cuda"):
        pipe = Text2ImagePipeline.from_bundle(tmp_path / "b", backend=backend)
        images[backend] = pipe("a red circle", steps=4, size=(128, 128), latents=noise).image
    assert psnr(images["ort-cuda"], images["ort-cpu"]) >= 40
