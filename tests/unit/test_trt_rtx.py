"""TensorRT-RTX backend without its EP package: install hints and provider options.

The plugin EP (onnxruntime-ep-nv-tensorrt-rtx-cu13) needs an RTX-class GPU; what is
computed before it loads (the shape profile and cache folder it is given) is checked here,
the sessions in tests/gpu/test_trt_parity.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import onnxruntime
import pytest
from slimdiff.runtime.backends.trt_rtx import EP_PACKAGE, TrtRtxBackend, rtx_provider_options
from slimdiff.runtime.manifest import BundleError, ComponentEntry

from slimdiff.errors import UserError

PROFILE = {
    "min": {"latent_sample": [1, 4, 8, 8]},
    "opt": {"latent_sample": [1, 4, 16, 16]},
    "max": {"latent_sample": [2, 4, 24, 24]},
}


def entry(precision="fp16", profile=PROFILE, extra=None) -> ComponentEntry:
    return ComponentEntry(
        path="vae_decoder/model.onnx",
        format="onnx",
        precision=precision,
        inputs=[{"name": "latent_sample", "dtype": "float32", "shape": ["B", 4, "h", "w"]}],
        outputs=[{"name": "sample", "dtype": "float32", "shape": ["B", 3, "H", "W"]}],
        parity={},
        extra=extra or {},
        profile=profile,
    )


def test_missing_ep_package_is_one_line_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_ep_nv_tensorrt_rtx", None)
    with pytest.raises(UserError) as err:
        TrtRtxBackend()
    message = str(err.value)
    assert "\n" not in message
    assert f"pip install 'onnxruntime>=1.24' {EP_PACKAGE}" in message


def test_onnxruntime_without_plugin_eps_is_refused(monkeypatch):
    monkeypatch.delattr(onnxruntime, "register_execution_provider_library")
    with pytest.raises(UserError, match=r"needs onnxruntime >= 1\.24 for plugin"):
        TrtRtxBackend()


def test_provider_options_carry_the_profile_and_a_user_cache_folder(tmp_path):
    options = rtx_provider_options(entry(), "d" * 64, tmp_path)
    assert options == {
        "nv_profile_min_shapes": "latent_sample:1x4x8x8",
        "nv_profile_opt_shapes": "latent_sample:1x4x16x16",
        "nv_profile_max_shapes": "latent_sample:2x4x24x24",
        "nv_runtime_cache_path": str(tmp_path / "trt-rtx" / ("d" * 64)),
        "enable_cuda_graph": "0",
    }
    assert (
        rtx_provider_options(entry(), "d" * 64, tmp_path, cuda_graph=True)["enable_cuda_graph"]
        == "1"
    )
    assert not Path(options["nv_runtime_cache_path"]).exists()  # computing creates nothing


def test_provider_options_refuse_onnxruntime_qdq_and_missing_profiles(tmp_path):
    ort_form = entry("int8", extra={"quantization": {"qdq_form": "ort"}})
    with pytest.raises(UserError, match=r"export with `--target tensorrt`"):
        rtx_provider_options(ort_form, "d" * 64, tmp_path)
    trt_form = entry("int8", extra={"quantization": {"qdq_form": "tensorrt"}})
    assert "nv_profile_max_shapes" in rtx_provider_options(trt_form, "d" * 64, tmp_path)
    with pytest.raises(BundleError, match="export it again"):
        rtx_provider_options(entry(profile=None), "d" * 64, tmp_path)
