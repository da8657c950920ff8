"""`prune.ecodiff` as a pass: the contract every pass meets (config round trip, frozen
modules untouched, bit-identical reload through the edit log) for magnitude and learned
masks on SDXL, SD3 and FLUX; the parameters removed are the requested fraction of the
maskable ones; calibration is asked for only when needed; bad configs are refused."""

from __future__ import annotations

import copy
from typing import ClassVar

import pytest
import torch
from slimdiff.compress import get_pass
from slimdiff.compress.prune.units import maskable_params, unit_groups

from slimdiff.calib import Calibration
from slimdiff.errors import UserError
from slimdiff.models import load_model
from slimdiff.models.fingerprint import module_digest
from slimdiff.recipe import CalibrationSpec, Recipe
from tests.unit.compress.pass_contract import PassContract

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LEARN = {"iterations": 2, "prompts_per_iteration": 1, "checkpoint_every": 1}


class TestMagnitudeSDXL(PassContract):
    pass_name = "prune.ecodiff"
    config: ClassVar[dict] = {"sparsity": 0.3, "method": "magnitude"}
    family = "sdxl"


class TestLearnedSDXLWithRecovery(PassContract):
    pass_name = "prune.ecodiff"
    config: ClassVar[dict] = {
        "sparsity": 0.4,
        "scope": "local",
        **LEARN,
        "recover": {"steps": 2, "batch": 2},
    }
    family = "sdxl"


class TestLearnedSD3(PassContract):
    pass_name = "prune.ecodiff"
    config: ClassVar[dict] = {"sparsity": 0.3, **LEARN}
    family = "sd3"


class TestMagnitudeFLUX(PassContract):
    pass_name = "prune.ecodiff"
    config: ClassVar[dict] = {"sparsity": 0.5, "method": "magnitude", "mask": "sigmoid"}
    family = "flux"


def _apply(family: str, config: dict, calib: bool = True):
    model = load_model(f"tiny:{family}")
    groups = unit_groups(model.arch, model.denoiser)
    before = sum(p.numel() for p in model.denoiser.parameters())
    cls = get_pass("prune.ecodiff")
    p = cls(cls.Config.model_validate(config))
    spec = CalibrationSpec(num_prompts=2, steps=2, size=(64, 64))
    c = Calibration(model.pipe, model.arch, spec) if calib else None
    report = p.apply(model.pipe, c)
    after = sum(p.numel() for p in model.denoiser.parameters())
    return model, groups, before - after, report


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
@pytest.mark.parametrize("method", ["magnitude", "ecodiff"])
def test_the_parameters_removed_are_the_requested_fraction_of_the_maskable(family, method):
    model, groups, removed, report = _apply(family, {"sparsity": 0.2, "method": method, **LEARN})
    maskable = maskable_params(groups)
    assert abs(removed - 0.2 * maskable) <= 0.01 * maskable, (removed, maskable)
    s = report.summary
    assert s["maskable_params"] == maskable
    assert s["params_before"] - s["params_after"] == removed
    # The unit count, plus an emptied attention's q/k norms (FLUX), which belong to no head.
    assert s["achieved_sparsity"] == pytest.approx(removed / maskable, abs=1e-3)
    assert s["achieved_sparsity"] == pytest.approx(0.2, abs=0.01)
    assert len(report.edits) > 0 and all(e.component == model.arch.denoiser for e in report.edits)
    if method == "ecodiff":
        assert s["masks"]["iterations"] == 2 and s["masks"]["prompts"] == 2
    else:
        assert s["masks"].startswith("off")


def test_magnitude_needs_no_calibration_and_learning_refuses_to_run_without():
    cls = get_pass("prune.ecodiff")
    assert not cls(cls.Config(method="magnitude")).needs_calibration
    assert cls(cls.Config(method="magnitude", recover={"steps": 1})).needs_calibration
    assert cls(cls.Config()).needs_calibration
    _, _, removed, _ = _apply("sdxl", {"method": "magnitude"}, calib=False)
    assert removed > 0
    # `slimdiff inspect --recipe` runs passes without calibration: a labelled preview.
    _, _, preview, report = _apply("sdxl", {"method": "ecodiff"}, calib=False)
    assert preview == removed and report.summary["masks"].startswith("preview without")


def test_zero_sparsity_changes_nothing():
    _, _, removed, report = _apply("sdxl", {"sparsity": 0.0, "method": "magnitude"})
    assert removed == 0 and report.edits == []


@pytest.mark.parametrize(
    "bad",
    [
        {"sparsity": 0.99},
        {"sparsity": -0.1},
        {"scope": "layer"},
        {"method": "random"},
        {"mask": "binary"},
        {"iterations": -1},
        {"lr": 0},
        {"recover": {"steps": 0}},
    ],
)
def test_bad_configs_are_refused_by_the_recipe(bad):
    key = next(iter(bad))
    with pytest.raises(UserError, match=rf"passes\[0\] \(prune.ecodiff\).*{key}"):
        Recipe(model="tiny:sdxl", passes=[{"pass": "prune.ecodiff", **bad}])


def test_a_recipe_resolves_the_typed_config_and_stage_order():
    r = Recipe(
        model="tiny:sdxl",
        passes=[
            {"pass": "blocks.remove", "preset": "ssd-1b"},
            {"pass": "prune.ecodiff", "sparsity": 0.3, "recover": {"steps": 5}},
        ],
    )
    cfg = r.passes[1].config
    assert (cfg.sparsity, cfg.recover.steps, cfg.method) == (0.3, 5, "ecodiff")
    with pytest.raises(UserError, match=r"structural pass cannot follow prune\.ecodiff"):
        Recipe(
            model="tiny:sdxl",
            passes=[{"pass": "prune.ecodiff"}, {"pass": "blocks.remove", "preset": "ssd-1b"}],
        )


def test_a_selection_that_leaves_no_head_reading_the_prompt_is_refused(monkeypatch):
    """SD1.5's cross-attention heads (attn2) scored lowest: at 0.9 global the heads' 90%
    takes every one of them, and the model would no longer read its prompt. Local scope
    keeps 10% of each module's heads."""
    from slimdiff.compress.prune import magnitude

    real = magnitude.magnitude_scores

    def cross_attention_last(groups, denoiser, *args, **kwargs):
        scores = real(groups, denoiser, *args, **kwargs)
        return {k: v - 1e3 * ("attn2" in k) for k, v in scores.items()}

    monkeypatch.setattr(magnitude, "magnitude_scores", cross_attention_last)
    with pytest.raises(UserError, match=r"sparsity 0.9 \(global\) removes every attention head"):
        _apply("sd15", {"sparsity": 0.9, "method": "magnitude"}, calib=False)
    *_, report = _apply(
        "sd15", {"sparsity": 0.9, "method": "magnitude", "scope": "local"}, calib=False
    )
    assert 0 < report.summary["heads"][1] < report.summary["heads"][0]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_joint_attention_keeps_prompt_reading_heads_at_high_sparsity(family):
    """SD3's and FLUX's heads all read the prompt (joint attention); ranked among
    themselves, the heads keep 10% of their parameters at 0.9, so some stay (tiny SD3's 8
    heads lose all at 0.95, which is refused as above)."""
    *_, report = _apply(family, {"sparsity": 0.9, "method": "magnitude"}, calib=False)
    assert 0 < report.summary["heads"][1] < report.summary["heads"][0]


def test_learned_masks_resume_from_a_shared_work_folder(tmp_path):
    """Recipes that differ only in sparsity reuse the learned masks (the checkpoint key
    leaves sparsity, scope and recover out); the pruned models then differ only there."""
    model = load_model("tiny:sdxl")
    spec = CalibrationSpec(num_prompts=2, steps=2, size=(64, 64))
    calib = Calibration(model.pipe, model.arch, spec, work_dir=tmp_path)
    cls = get_pass("prune.ecodiff")
    digest = module_digest(model.denoiser)
    a = cls(cls.Config(sparsity=0.2, **LEARN))._checkpoint(calib, digest)
    b = cls(cls.Config(sparsity=0.4, scope="local", **LEARN))._checkpoint(calib, digest)
    c = cls(cls.Config(sparsity=0.2, beta=0.1, **LEARN))._checkpoint(calib, digest)
    assert a == b != c
    # masks learned on another denoiser (an earlier pass distilled longer) are not reused
    other = copy.deepcopy(model.denoiser)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    assert cls(cls.Config(sparsity=0.2, **LEARN))._checkpoint(calib, module_digest(other)) != a
    assert a.parent.parent == tmp_path / "checkpoints"
    report = cls(cls.Config(sparsity=0.2, **LEARN)).apply(model.pipe, calib)
    assert report.summary["masks"]["resumed_from"] == 0 and a.is_file()
    again = load_model("tiny:sdxl")
    calib2 = Calibration(again.pipe, again.arch, spec, work_dir=tmp_path)
    report2 = cls(cls.Config(sparsity=0.4, **LEARN)).apply(again.pipe, calib2)
    assert report2.summary["masks"]["resumed_from"] == 2  # learned once, not twice
    assert report2.summary["achieved_sparsity"] > report.summary["achieved_sparsity"]
    assert torch.isfinite(torch.cat([p.flatten() for p in again.denoiser.parameters()])).all()


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_a_pruned_model_can_be_pruned_again(family):
    """Two prune.ecodiff passes in one recipe (or pruning a pruned artifact): the second
    sees the widths the first left, emptied modules included."""
    model, _, _, _ = _apply(family, {"sparsity": 0.6, "method": "magnitude", "scope": "local"})
    groups = unit_groups(model.arch, model.denoiser)
    cls = get_pass("prune.ecodiff")
    before = sum(p.numel() for p in model.denoiser.parameters())
    cls(cls.Config(sparsity=0.5, method="magnitude")).apply(model.pipe, None)
    after = sum(p.numel() for p in model.denoiser.parameters())
    assert abs((before - after) - 0.5 * maskable_params(groups)) <= 0.01 * maskable_params(groups)
