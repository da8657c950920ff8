"""TensorRT and TensorRT-RTX against ort-cpu on a tiny:sd15 UNet (GPU; skipped without one).

The native trt backend builds its engine into a temporary cache, then runs plainly, captures
a CUDA graph and replays it; all must match onnxruntime's CPU result within an fp16
tolerance (TensorRT uses TF32 and its own kernels). trt-rtx is skipped where TensorRT-RTX
lists no supported GPU (it supports compute capability 8.6, 8.9 and 12.0+, not Hopper).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from slimdiff.errors import UserError

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("one_torch_thread")]

FP16_TOL = 1e-2  # max |a - b| relative to max |reference|


def _have(*modules: str) -> bool:
    try:
        return all(importlib.util.find_spec(m) is not None for m in modules)
    except ModuleNotFoundError:  # a parent package is missing
        return False


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from slimdiff.export import export_bundle

    from slimdiff.models import load_model

    out = tmp_path_factory.mktemp("trt-parity") / "b"
    export_bundle(load_model("tiny:sd15"), out, target="tensorrt")
    return out


def feeds(batch: int, side: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "sample": rng.standard_normal((batch, 4, side, side)).astype(np.float32),
        "timestep": np.full((batch,), 500.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, 77, 32)).astype(np.float32),
    }


def reference(bundle, x):
    from slimdiff.runtime.backends.ort import OrtBackend

    return OrtBackend("ort-cpu").load(bundle / "unet" / "model.onnx").run(x)["out_sample"]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.skipif(
    not (_have("tensorrt") and (_have("cuda.bindings") or _have("cuda.cudart"))),
    reason="needs TensorRT and cuda-python (pip install tensorrt-cu12 cuda-python)",
)
def test_trt_engine_and_cuda_graph_match_ort_cpu(bundle, tmp_path):
    from slimdiff.runtime.backends.trt import TensorRTBackend
    from slimdiff.runtime.manifest import read_manifest

    session = TensorRTBackend(cache_dir=tmp_path).load(bundle / "unet" / "model.onnx")
    assert sorted(p.suffix for p in (tmp_path / "engines").iterdir()) == [
        ".cache",
        ".json",
        ".plan",
    ]
    x = feeds(2, 16)
    want = reference(bundle, x)
    runs = [session.run(x)["out_sample"] for _ in range(3)]  # plain, capture, replay
    assert session.graph_captured, "the repeated shape was not captured into a CUDA graph"
    for got in runs:
        assert got.shape == want.shape and rel_err(got, want) <= FP16_TOL
    np.testing.assert_allclose(runs[2], runs[0], rtol=0, atol=1e-5)
    small = feeds(1, 8)  # new shapes: a plain run, no graph for them yet
    assert rel_err(session.run(small)["out_sample"], reference(bundle, small)) <= FP16_TOL
    assert not session.graph_captured
    with pytest.raises(UserError, match="outside the range"):
        session.run(feeds(1, 32))
    # The second backend finds the cached engine instead of building again.
    again = TensorRTBackend(cache_dir=tmp_path).load(bundle / "unet" / "model.onnx")
    assert rel_err(again.run(x)["out_sample"], want) <= FP16_TOL
    read_manifest(bundle)  # the bundle still verifies: nothing was written into it


@pytest.mark.skipif(
    not _have("onnxruntime_ep_nv_tensorrt_rtx"),
    reason="needs onnxruntime-ep-nv-tensorrt-rtx-cu13 (pip install it with onnxruntime>=1.24)",
)
def test_trt_rtx_matches_ort_cpu(bundle, tmp_path):
    from slimdiff.runtime.backends.trt_rtx import TrtRtxBackend

    backend = TrtRtxBackend(cache_dir=tmp_path)
    try:
        session = backend.load(bundle / "unet" / "model.onnx")
    except UserError as err:
        if "sees no GPU it supports" in str(err):
            pytest.skip(str(err))
        raise
    x = feeds(2, 16)
    got = session.run(x)["out_sample"]
    assert rel_err(got, reference(bundle, x)) <= FP16_TOL
    assert any((tmp_path / "trt-rtx").iterdir())  # its runtime cache went to the user cache
