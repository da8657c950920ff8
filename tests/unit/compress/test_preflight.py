"""What blocks.remove and quant.quest cannot run is refused before the runner records the
teacher's trajectories (minutes to hours at full size), and nothing is written."""

from __future__ import annotations

import json

import pytest
from slimdiff.compress.runner import compress_model

from slimdiff.calib import Calibration
from slimdiff.errors import UserError
from slimdiff.models import load_model
from slimdiff.recipe import validate_recipe

CALIBRATION = {"prompts": ["a red circle"], "num_prompts": 1, "steps": 3, "size": [64, 64]}
DISTILL = {"steps": 2, "lr": 1e-4}


@pytest.fixture
def no_recording(monkeypatch):
    def refuse(self):
        raise AssertionError("the trajectories were recorded before the refusal")

    monkeypatch.setattr(Calibration, "record", refuse)


def _refused(model: str, step: dict, match: str, tmp_path, calibration=CALIBRATION) -> None:
    recipe = validate_recipe({"model": model, "calibration": calibration, "passes": [step]})
    with pytest.raises(UserError, match=match):
        compress_model(load_model(model), recipe, tmp_path / "a")
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.work").exists()


@pytest.mark.usefixtures("no_recording")
@pytest.mark.parametrize(
    ("model", "step", "match"),
    [
        (
            "tiny:sd15",
            {"pass": "blocks.remove", "preset": "ssd-1b", "distill": DISTILL},
            r"^blocks\.remove: preset ssd-1b is for sdxl UNets, this model is sd15; use one of "
            r"bk-sdm-base",
        ),
        (
            "tiny:sd3",
            {"pass": "blocks.remove", "drop": ["transformer_blocks.1"], "distill": DISTILL},
            r"^blocks\.remove cuts UNet2DConditionModel denoisers .*; sd3's is a "
            r"SD3Transformer2DModel",
        ),
        (
            "tiny:sdxl",
            {
                "pass": "blocks.remove",
                "preset": "vega",
                "distill": {**DISTILL, "batch": 2, "accumulate": 4},
            },
            r"^distill\.accumulate \(4\) splits a batch of 2 pairs",
        ),
        (
            "tiny:sd15",
            {"pass": "quant.quest", "weights": "int8", "keep_fp": ["*"]},
            r"^quant\.quest: no Linear or Conv2d layer is left to quantize",
        ),
        (
            "tiny:sd15",
            {"pass": "quant.quest", "weights": "int8", "timestep_groups": 4},
            r"^quant\.quest: timestep_groups 4 exceeds the 3 denoiser calls of "
            r"calibration\.steps",
        ),
    ],
    ids=["preset of another family", "not a unet", "accumulate", "no layer", "groups"],
)
def test_refused_before_the_trajectories(model, step, match, tmp_path):
    _refused(model, step, match, tmp_path)


def test_a_second_order_scheduler_makes_more_calls_to_group(tmp_path, no_recording):
    """Heun's 3 steps are 5 denoiser calls: 5 groups pass the preflight (then reach the
    recording, refused here), 6 do not."""
    heun = {**CALIBRATION, "scheduler": "HeunDiscreteScheduler"}
    step = {"pass": "quant.quest", "weights": "int8", "timestep_groups": 6}
    _refused("tiny:sd15", step, r"timestep_groups 6 exceeds the 5 denoiser calls", tmp_path, heun)
    recipe = validate_recipe(
        {"model": "tiny:sd15", "calibration": heun, "passes": [{**step, "timestep_groups": 5}]}
    )
    with pytest.raises(AssertionError, match="recorded before the refusal"):
        compress_model(load_model("tiny:sd15"), recipe, tmp_path / "b")


def _dry_run(tmp_path, recipe: dict):
    from click.testing import CliRunner

    from slimdiff.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({"version": 1, **recipe}))  # JSON is YAML
    return CliRunner().invoke(main, ["compress", str(path), "--dry-run"])


@pytest.mark.usefixtures("no_recording")
def test_dry_run_checks_the_passes_against_the_model(tmp_path):
    step = {"pass": "blocks.remove", "preset": "ssd-1b", "distill": DISTILL}
    bad = _dry_run(tmp_path, {"model": "tiny:sd15", "calibration": CALIBRATION, "passes": [step]})
    assert bad.exit_code == 2
    assert "error: blocks.remove: preset ssd-1b is for sdxl UNets, this model is sd15" in bad.output
    good = _dry_run(tmp_path, {"model": "tiny:sdxl", "calibration": CALIBRATION, "passes": [step]})
    assert good.exit_code == 0, good.output
    assert "preset: ssd-1b" in good.output  # the resolved recipe, then the check's line
    assert good.output.rstrip().endswith("# passes checked against tiny:sdxl (sdxl): ok")
    hub = _dry_run(tmp_path, {"model": "org/not-here", "passes": [step]})
    assert hub.exit_code == 0, hub.output
    assert "# passes not checked against org/not-here (a hub id: download it" in hub.output


@pytest.mark.usefixtures("no_recording")
def test_dry_run_refuses_what_compress_would_not_load(tmp_path):
    """A missing path, a component folder and a bundle: compress's own line, exit 2."""
    step = {"pass": "text.drop", "encoders": ["text_encoder_3"]}
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text("{}")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    cases = [
        (tmp_path / "missing", "not found: pass a diffusers pipeline folder"),
        (unet, "is a single component folder; compress needs the whole pipeline"),
        (bundle, "is a slimdiff bundle, already exported"),
    ]
    for model, fragment in cases:
        result = _dry_run(tmp_path, {"model": str(model), "passes": [step]})
        assert result.exit_code == 2, result.output
        assert fragment in result.output and "Traceback" not in result.output


def _quantized(model):
    """The model with quant.quest's layers in place (as a quantized artifact loads)."""
    from slimdiff.compress import get_pass
    from slimdiff.compress.quant.edits import Quantized
    from slimdiff.compress.quant.layers import replace_layers
    from slimdiff.compress.quant.quest import plan_layers

    plan = plan_layers(get_pass("quant.quest").Config(), model.arch, model.denoiser)
    replace_layers(model.denoiser.requires_grad_(False), Quantized(component="unet", layers=plan))
    return model


@pytest.mark.parametrize(
    ("step", "match"),
    [
        (
            {"pass": "prune.ecodiff", "method": "magnitude"},
            r"^prune\.ecodiff: the model is quantized already \(\d+ quant\.quest layers, .*\); "
            r"prune the unquantized model, then quantize",
        ),
        (
            {"pass": "quant.quest", "method": "minmax"},
            r"^quant\.quest: the model is quantized already .*; quantize the model it was made "
            r"from instead",
        ),
        (
            {"pass": "blocks.remove", "preset": "bk-sdm-small", "distill": DISTILL},
            r"^blocks\.remove: the UNet2DConditionModel's layers are not what its config "
            r"describes \(\d+ tensors, e\.g\. .*\); remove blocks from the unpruned",
        ),
    ],
)
def test_a_quantized_model_is_not_pruned_quantized_or_cut_again(step, match, tmp_path):
    from slimdiff.compress import build_passes

    model = _quantized(load_model("tiny:sd15"))
    recipe = validate_recipe({"model": "tiny:sd15", "calibration": CALIBRATION, "passes": [step]})
    with pytest.raises(UserError, match=match):
        build_passes(recipe)[0].preflight(model.pipe, None)


def test_blocks_are_not_removed_from_a_pruned_model():
    from slimdiff.compress import build_passes, get_pass

    model = load_model("tiny:sd15")
    cls = get_pass("prune.ecodiff")
    cls(cls.Config(sparsity=0.3, method="magnitude")).apply(model.pipe, None)
    step = {"pass": "blocks.remove", "preset": "bk-sdm-small", "distill": DISTILL}
    recipe = validate_recipe({"model": "tiny:sd15", "passes": [step]})
    with pytest.raises(UserError, match=r"layers are not what its config describes .*attn"):
        build_passes(recipe)[0].preflight(model.pipe, None)
    # the model as its config builds it passes
    build_passes(recipe)[0].preflight(load_model("tiny:sd15").pipe, None)


def test_a_recipe_quantizes_once():
    q = {"pass": "quant.quest", "method": "minmax"}
    with pytest.raises(UserError, match=r"passes\[1\] \(quant\.quest\): a model is quantized once"):
        validate_recipe({"model": "tiny:sd15", "passes": [q, {**q, "weights": "int4"}]})
