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


def test_fusions_are_skipped_when_the_optimizer_would_not_fit(tmp_path, monkeypatch):
    """ORT's optimizer holds the graph several times over (FUSE_MEMORY): where that is more
    than the memory available, the graph is exported unfused, with the reason recorded,
    instead of the export being killed (SD3 Medium's fp32 transformer on 24 GiB)."""
    from slimdiff.export.optimize import FUSE_MEMORY, fusion_memory

    from slimdiff import export

    model = load_model("tiny:sd3")
    raw_bytes = {}

    def available():  # room for everything but a fused transformer
        return 1 << 20

    real = fusion_memory

    def spy(path, plan):
        raw_bytes[path.parent.name] = sum(f.stat().st_size for f in path.parent.iterdir())
        return real(path, plan)

    monkeypatch.setattr(export, "available_bytes", available)
    monkeypatch.setattr(export, "fusion_memory", spy)
    manifest = export_bundle(model, tmp_path / "b")
    entry = manifest.components["transformer"]
    assert entry.extra["ort_fusions"] == {}
    need = raw_bytes["transformer"] * FUSE_MEMORY[True]  # the mmdit plan infers shapes
    assert f"about {need / 2**30:.1f} GiB, 0.0 GiB available" in entry.extra["fusions_skipped"]
    assert entry.parity["rel_err"] <= entry.parity["tolerance"]
    assert denoiser_rel_err(model, tmp_path / "b" / entry.path) <= 1e-4
    # with the memory there, the same model fuses and records no reason
    monkeypatch.setattr(export, "available_bytes", lambda: None)
    fused = export_bundle(model, tmp_path / "f").components["transformer"]
    assert fused.extra["ort_fusions"] and "fusions_skipped" not in fused.extra
