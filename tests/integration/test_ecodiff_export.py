"""A pruned model end to end, on tiny SDXL, SD3 and FLUX: compressed by the runner (learned
masks, so calibration, learning and slicing all run), reloaded from its artifact through the
edit log, exported to ONNX, checked against torch, and run by the torch-free runtime."""

from __future__ import annotations

import json

import onnx
import pytest
import yaml
from slimdiff.compress.prune.units import unit_groups
from slimdiff.compress.runner import compress_model

from slimdiff.models import load_model
from slimdiff.models.structure import attention_sites, ffn_sites
from slimdiff.recipe import load_recipe
from tests.onnx_check import denoiser_rel_err

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _recipe(tmp_path, family: str):
    recipe = {
        "version": 1,
        "model": f"tiny:{family}",
        "calibration": {"num_prompts": 2, "steps": 2, "size": [64, 64]},
        "passes": [
            {
                "pass": "prune.ecodiff",
                "sparsity": 0.3,
                "iterations": 2,
                "prompts_per_iteration": 1,
                "checkpoint_every": 1,
            }
        ],
    }
    path = tmp_path / f"{family}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return load_recipe(path)


def widths(model) -> tuple[int, int]:
    """(attention heads, FFN neurons) summed over the denoiser, read from its modules."""
    heads = sum(s.heads for s in attention_sites(model.arch, model.denoiser))
    return heads, sum(s.hidden for s in ffn_sites(model.arch, model.denoiser))


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_a_pruned_model_exports_and_runs(tmp_path, family):
    from slimdiff.export import export_bundle
    from slimdiff.runtime.pipeline import Text2ImagePipeline

    base = load_model(f"tiny:{family}")
    params0 = sum(p.numel() for p in base.denoiser.parameters())
    heads0, ffn0 = widths(base)  # before: the runner prunes the loaded model in place
    pruned = compress_model(base, _recipe(tmp_path, family), tmp_path / "a")
    summary = json.loads((tmp_path / "a" / "report.json").read_text())
    entry = next(p for p in summary["passes"] if p["name"] == "prune.ecodiff")["summary"]
    params = sum(p.numel() for p in pruned.denoiser.parameters())
    maskable = entry["maskable_params"]
    # The requested fraction of the maskable parameters went, within 1% of them.
    assert abs((params0 - params) - 0.3 * maskable) <= 0.01 * maskable
    assert params == entry["params_after"]

    # The reloaded model is the pruned one: per-layer widths from the edit log, read back
    # from its modules (an attention with no heads left is a skip and has no site).
    heads, ffn = widths(pruned)
    assert heads < heads0 or ffn < ffn0
    assert sum(1 for _ in unit_groups(pruned.arch, pruned.denoiser)) > 0
    manifest = export_bundle(pruned, tmp_path / "b", optimize=False)
    entry = manifest.components[pruned.arch.denoiser]
    assert entry.parity["passed"] and entry.parity["rel_err"] <= 1e-4
    path = next((tmp_path / "b" / pruned.arch.denoiser).glob("*.onnx"))
    assert denoiser_rel_err(pruned, path) <= 1e-4  # on inputs of this test's own
    runtime = Text2ImagePipeline.from_bundle(tmp_path / "b")
    image = runtime("a red circle on the left", steps=2, size=(64, 64), seed=3).image
    assert image.shape == (64, 64, 3) and image.std() > 0
    # `slimdiff inspect ARTIFACT` reads the per-layer widths back from the artifact.
    from click.testing import CliRunner

    from slimdiff.cli import main

    done = CliRunner().invoke(main, ["inspect", str(tmp_path / "a"), "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.output)["denoiser"]
    assert (report["heads"], report["ffn_width"], report["params"]) == (heads, ffn, params)


def test_a_pruned_unet_exports_with_ort_fusions(tmp_path):
    """ORT's UNet attention fusion sizes the fused op by the query's input width: modules
    that lost heads stay unfused, the others fuse, and the graph matches torch."""
    from slimdiff.compress import get_pass
    from slimdiff.export import export_bundle

    model = load_model("tiny:sd15")
    cls = get_pass("prune.ecodiff")
    # Local 0.3: every module loses one of its 4 heads; global 0.3 leaves some whole.
    cls(cls.Config(sparsity=0.3, method="magnitude")).apply(model.pipe, None)
    narrowed = [
        n
        for n, m in model.denoiser.named_modules()
        if hasattr(m, "to_q") and m.to_q.out_features < m.to_q.in_features
    ]
    assert narrowed
    manifest = export_bundle(model, tmp_path / "b", optimize=True)
    unet = manifest.components["unet"]
    assert unet.parity["passed"] and unet.parity["rel_err"] <= 1e-4
    path = tmp_path / "b" / "unet" / "model.onnx"
    assert denoiser_rel_err(model, path) <= 1e-4
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    whole = sum(1 for n, m in model.denoiser.named_modules() if hasattr(m, "to_q")) - len(narrowed)
    assert whole == 0 or ops & {"Attention", "MultiHeadAttention"}


def test_ecodiff_on_an_sd15_folder_with_the_hubs_pndm_scheduler(tmp_path):
    """stable-diffusion-v1-5 ships PNDMScheduler (PLMS, skip_prk_steps): EcoDiff's
    checkpointed loop recomputes its steps with the torch PLMS sampler, and the bundle
    keeps PNDM, which the runtime samples (one call more than steps: the Heun-like start)."""
    import diffusers
    from slimdiff.runtime.pipeline import Text2ImagePipeline

    base = load_model("tiny:sd15")
    base.pipe.scheduler = diffusers.PNDMScheduler(  # the hub folder's scheduler_config.json
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    base.pipe.save_pretrained(tmp_path / "hub")
    recipe = _recipe(tmp_path, "sd15")
    pruned = compress_model(load_model(str(tmp_path / "hub")), recipe, tmp_path / "a")
    summary = json.loads((tmp_path / "a" / "report.json").read_text())
    entry = next(p for p in summary["passes"] if p["name"] == "prune.ecodiff")["summary"]
    assert entry["params_after"] < entry["params_before"]
    from slimdiff.export import export_bundle

    export_bundle(pruned, tmp_path / "b", optimize=False)
    shipped = json.loads((tmp_path / "b/scheduler/scheduler_config.json").read_text())
    assert shipped["_class_name"] == "PNDMScheduler" and shipped["skip_prk_steps"] is True
    result = Text2ImagePipeline.from_bundle(tmp_path / "b")("a cat", steps=3, size=(64, 64))
    assert len(result.timings_ms["denoiser_steps"]) == 4 and result.image.std() > 0
