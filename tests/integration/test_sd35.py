"""SD3.5 (medium and large): q/k RMSNorm in every block, and in medium a second
self-attention in the first blocks (dual attention). Saved as a diffusers folder, exported
with ORT's fusions (the RMSNorm fuses to ORT's SimplifiedLayerNormalization) and in fp16,
run against diffusers' StableDiffusion3Pipeline as test_runtime_vs_diffusers.py does."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from slimdiff.export import export_bundle
from slimdiff.runtime import Text2ImagePipeline

from slimdiff.models import load_model
from tests.integration.test_runtime_vs_diffusers import (
    PROMPT,
    SIZE,
    _assert_close_to_diffusers,
    _diffusers,
    _psnr,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def sd35(tmp_path_factory):
    """tiny:sd3 with an SD3.5 medium transformer (qk_norm and dual attention in block 0),
    saved as a folder and exported from it."""
    base = load_model("tiny:sd3").pipe
    config = {k: v for k, v in base.transformer.config.items() if not k.startswith("_")}
    config.update(qk_norm="rms_norm", dual_attention_layers=(0,))
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**config).eval()
    with torch.no_grad():  # RMSNorm scales of 1 would hide a wrong weight
        for name, weight in transformer.named_parameters():
            if ".norm_q." in name or ".norm_k." in name:
                weight.uniform_(0.5, 1.5)
    pipe = StableDiffusion3Pipeline(**{**base.components, "transformer": transformer})
    root = tmp_path_factory.mktemp("sd35")
    pipe.save_pretrained(root / "folder")
    model = load_model(str(root / "folder"))
    bundles = {p: root / p for p in ("fp32", "fp16")}
    for precision, out in bundles.items():
        export_bundle(model, out, precision=precision)
    pipe.set_progress_bar_config(disable=True)
    return pipe, bundles


def test_the_qk_norms_fuse_and_the_graph_checks(sd35):
    _, bundles = sd35
    graph = onnx.load(str(bundles["fp32"] / "transformer" / "model.onnx"), load_external_data=False)
    fused = [n for n in graph.graph.node if n.op_type == "SimplifiedLayerNormalization"]
    # q and k of both streams per block, and the dual attention's q and k
    assert len(fused) == 4 * 2 + 2 and all(n.domain == "" for n in fused)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_sd35_matches_diffusers(sd35, precision):
    pipe, bundles = sd35
    runtime = Text2ImagePipeline.from_bundle(bundles[precision])
    assert runtime.manifest.components["transformer"].parity["passed"]
    shape = runtime.conditioning.latent_shape(SIZE, SIZE)
    latents = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    ref_image, ref_latents = _diffusers(pipe, latents, 5.0, None)
    _, no_model = _diffusers(pipe, latents, 5.0, None, zero=True)
    result = runtime(PROMPT, steps=4, guidance=5.0, size=(SIZE, SIZE), latents=latents)
    if precision == "fp32":
        _assert_close_to_diffusers(result.latents, ref_latents, no_model, "sd3.5")
        assert _psnr(result.image, ref_image) >= 40.0
    else:  # fp16 weights: the export's parity tolerance, not float32's
        rel = np.linalg.norm(result.latents - ref_latents) / np.linalg.norm(ref_latents - no_model)
        assert rel < 2e-2, f"fp16: {rel:.2e}"
