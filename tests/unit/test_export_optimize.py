"""ORT fusion options per execution provider, and optional denoiser inputs.

The fused CPU graphs themselves are checked end to end in
tests/integration/test_export_tiny.py (tiny:sd15's UNet, tiny:sd3's transformer).
"""

from __future__ import annotations

import pytest
from slimdiff.export import export_bundle
from slimdiff.export.optimize import fusion_options

from slimdiff.models import get_arch, load_model
from tests.onnx_check import denoiser_rel_err

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_gpu_fusion_set_enables_the_cuda_only_fusions():
    gpu = fusion_options(get_arch("sdxl").denoiser_onnx, for_gpu=True, fp16=True)
    assert gpu.enable_group_norm and gpu.enable_nhwc_conv and gpu.enable_bias_splitgelu
    assert gpu.enable_packed_qkv and gpu.enable_packed_kv
    # As ORT's optimize_pipeline: packed QKV/KV only for fp16 graphs.
    gpu32 = fusion_options(get_arch("sdxl").denoiser_onnx, for_gpu=True, fp16=False)
    assert not gpu32.enable_packed_qkv and not gpu32.enable_packed_kv
    cpu = fusion_options(get_arch("sdxl").denoiser_onnx, for_gpu=False, fp16=True)
    assert not (cpu.enable_group_norm or cpu.enable_nhwc_conv or cpu.enable_bias_splitgelu)
    assert not (cpu.enable_packed_qkv or cpu.enable_packed_kv or cpu.enable_bias_add)
    assert cpu.enable_attention


def test_flux_without_guidance_embeds_has_no_guidance_input(tmp_path):
    from diffusers import FluxTransformer2DModel

    model = load_model("tiny:flux")
    config = {**model.denoiser.config, "guidance_embeds": False}  # FLUX.1-schnell-like
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    model.pipe.transformer = model.denoiser = FluxTransformer2DModel(**config).eval()
    manifest = export_bundle(model, tmp_path / "schnell")
    entry = manifest.components["transformer"]
    assert [i["name"] for i in entry.inputs] == [
        "hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
        "img_ids", "txt_ids",
    ]  # fmt: skip
    assert "guidance" not in manifest.pipeline.kind.extra_inputs
    assert denoiser_rel_err(model, tmp_path / "schnell" / entry.path) <= 1e-4
