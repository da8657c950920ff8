"""blocks.remove's distillation: it brings the student closer to the teacher, a killed run
resumes bit-identical, trajectories are cached, feature pairs line up, configs are checked.

Everything runs on tiny:sdxl at 64x64 (8x8 latents) with 4-step trajectories, on one thread.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import pydantic
import pytest
import torch
from slimdiff.compress import build_passes, get_pass
from slimdiff.compress.blocks import PRESETS
from slimdiff.compress.blocks.plan import Settings, make_plan, read_structure
from slimdiff.compress.blocks.student import build_student
from slimdiff.compress.distill import SEGMIND, DistillConfig
from slimdiff.compress.distill import train as distill_train
from slimdiff.compress.distill.features import capture, feature_pairs

from slimdiff.calib import Calibration
from slimdiff.errors import UserError
from slimdiff.models import load_model
from slimdiff.recipe import CalibrationSpec, load_recipe, validate_recipe
from slimdiff.trainstate import read_train_state
from tests.unit.compress.pass_contract import PassContract

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[3]
SIZE = (64, 64)
PROMPTS = [
    "a red circle on the left",
    "a blue square at the top",
    "a green triangle at the bottom",
    "a yellow cross on the right",
]
SPEC = CalibrationSpec(prompts=PROMPTS, num_prompts=4, steps=4, size=SIZE)
# SSD-1B-style depth halving at tiny scale (recipes/toy-shapes-ssd.yaml): deepest stage 4 -> 2
# transformer blocks down and up, mid-block one ResNet.
HALVING = {"down_depths": [1, 2, 2], "up_depths": [2, 2, 1], "mid": "resnet_only"}


class TestBlocksRemoveDistilled(PassContract):
    """The pass contract with distillation on: never-compress modules stay frozen."""

    pass_name = "blocks.remove"
    config: ClassVar[dict] = {"preset": "vega", "distill": {"steps": 2, "batch": 1, "lr": 1e-4}}
    family = "sdxl"


def _pass(**config):
    cls = get_pass("blocks.remove")
    return cls(cls.Config.model_validate(config))


def _final(pipe, prompt: str, seed: int) -> torch.Tensor:
    g = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        out = pipe(
            prompt,
            num_inference_steps=SPEC.steps,
            height=SIZE[0],
            width=SIZE[1],
            generator=g,
            output_type="latent",
        )
    return out.images


def _rel_error(pipe, cases, references) -> float:
    errors = [
        ((_final(pipe, p, s) - ref).norm() / ref.norm()).item()
        for (p, s), ref in zip(cases, references, strict=True)
    ]
    return sum(errors) / len(errors)


def test_distillation_brings_final_latents_closer_to_the_teacher(tmp_path):
    teacher = load_model("tiny:sdxl")
    teacher.pipe.set_progress_bar_config(disable=True)
    # The calibration prompts with the calibration's seeds (same initial noise), and two
    # prompts and seeds distillation never saw.
    seen = [(p, SPEC.seed + i) for i, p in enumerate(PROMPTS)]
    unseen = [("a purple circle at the top", 100), ("an orange square on the left", 101)]
    refs = {
        k: [_final(teacher.pipe, p, s) for p, s in v]
        for k, v in (("seen", seen), ("unseen", unseen))
    }

    errors = {}
    for steps in (0, 30):
        model = load_model("tiny:sdxl")
        model.pipe.set_progress_bar_config(disable=True)
        calib = Calibration(model.pipe, model.arch, SPEC, work_dir=tmp_path)
        # lr 5e-5: Adam's per-weight step is lr, and these weights are ~1e-2; 1e-3 diverges.
        report = _pass(**HALVING, distill={"steps": steps, "lr": 5e-5}).apply(model.pipe, calib)
        errors[steps] = {
            "seen": _rel_error(model.pipe, seen, refs["seen"]),
            "unseen": _rel_error(model.pipe, unseen, refs["unseen"]),
        }
    summary = report.summary["distill"]
    assert summary["iterations"] == 30 and summary["hooks"] == "sub_block"  # Segmind default
    assert summary["losses"]["out"] < summary["first_losses"]["out"]
    # Measured: seen 0.064 -> 0.027 (0.43x), unseen 0.061 -> 0.040 (0.65x). The random tiny
    # UNet leans on its skip paths, so removal moves final latents only ~6%; distillation
    # fits the student to the teacher on the states it was shown, and partly beyond them.
    assert errors[30]["seen"] <= 0.7 * errors[0]["seen"], errors
    assert errors[30]["unseen"] <= 0.85 * errors[0]["unseen"], errors


def _student(work: Path):
    """A fresh tiny:sdxl teacher, its depth-halved student, the trajectories and pairs."""
    model = load_model("tiny:sdxl")
    teacher = model.pipe.unet
    settings = Settings(down_depths=(1, 2, 2), up_depths=(2, 2, 1), mid="resnet_only")
    student, mapping = build_student(teacher, make_plan(read_structure(teacher), settings))
    data = Calibration(model.pipe, model.arch, SPEC, work_dir=work).record()
    return teacher, student, data, feature_pairs(mapping, "sub_block", student, teacher)


class _Killed(Exception):
    pass


def _kill_after(n: int):
    def hook(done: int) -> None:
        if done == n:
            raise _Killed

    return hook


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_a_killed_distillation_resumes_from_its_checkpoint_bit_identical(tmp_path, ema):
    settings = replace(SEGMIND, steps=6, lr=1e-4, batch=2, checkpoint_every=2, ema_decay=ema)
    never = load_model("tiny:sdxl").arch.frozen
    run = functools.partial(distill_train.distill, settings=settings, frozen=never)

    teacher, reference, data, pairs = _student(tmp_path / "work")
    run(reference, teacher, data, pairs, checkpoint=tmp_path / "reference.safetensors")

    ckpt = tmp_path / "run" / "distill.safetensors"
    teacher, student, data, pairs = _student(tmp_path / "work")
    with pytest.raises(_Killed):  # killed after iteration 3: the last checkpoint is at 2
        run(student, teacher, data, pairs, checkpoint=ckpt, on_iteration=_kill_after(3))
    assert read_train_state(ckpt)[0] == 2

    teacher, student, data, pairs = _student(tmp_path / "work")  # as a new process would
    report = run(student, teacher, data, pairs, checkpoint=ckpt)
    assert (report.resumed_from, report.iterations) == (2, 6)
    want = reference.state_dict()
    for name, got in student.state_dict().items():
        assert torch.equal(got, want[name]), name


def test_the_ema_of_the_trained_weights_replaces_them_at_the_end(tmp_path):
    """BK-SDM's --use_ema: after each optimizer step the average moves toward the weights
    at diffusers' EMAModel decay, min(decay, (1 + n) / (10 + n)) at step n + 1 (0 at the
    first: the average starts as the first step's weights); the student ends as it."""
    settings = replace(SEGMIND, steps=4, lr=1e-3, batch=2, ema_decay=0.3)
    never = load_model("tiny:sdxl").arch.frozen
    teacher, student, data, pairs = _student(tmp_path)
    snapshots = []

    def keep(_done):
        snapshots.append({n: p.detach().clone() for n, p in student.named_parameters()})

    distill_train.distill(student, teacher, data, pairs, settings, frozen=never, on_iteration=keep)
    average = dict(snapshots[0])
    for n, weights in enumerate(snapshots[1:], start=1):  # optimizer step n + 1
        decay = min(0.3, (1 + n) / (10 + n))  # 2/11, 3/12, then the cap
        for name, w in weights.items():
            average[name] = average[name] - (1 - decay) * (average[name] - w)
    moved = 0
    for name, p in student.named_parameters():
        torch.testing.assert_close(p.detach(), average[name], rtol=1e-5, atol=1e-7)
        moved += not torch.equal(p.detach(), snapshots[-1][name])
    assert moved > 0  # the average is not the last step's weights


def test_gradient_accumulation_gives_the_whole_batch_gradient(tmp_path):
    # The promise is the gradient: compared after AdamW steps instead, float-order noise in
    # near-zero gradients is amplified to whole update steps (AdamW's first is ~lr*sign(g)),
    # and AdamW is blind to a wrongly scaled gradient anyway.
    grads, losses = [], []
    for accumulate in (1, 2):
        settings = replace(SEGMIND, batch=4, accumulate=accumulate)
        teacher, student, data, pairs = _student(tmp_path)
        student.train().requires_grad_(True)  # as distill() sets it up (nothing frozen)
        teacher.eval()
        losses.append(distill_train._iteration(student, teacher, data, pairs, settings, 0))
        grads.append({n: p.grad for n, p in student.named_parameters() if p.grad is not None})
    assert len(grads[0]) == len(list(student.parameters())) and grads[0].keys() == grads[1].keys()
    assert losses[0].keys() == losses[1].keys() == {"total", "out", "feat"}
    for k, v in losses[0].items():
        assert losses[1][k] == pytest.approx(v, rel=1e-5), k
    for name, g in grads[0].items():
        scale = g.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-5 * scale)


def test_the_pass_resumes_a_killed_run_from_the_work_folder(tmp_path, monkeypatch):
    config = {**HALVING, "distill": {"steps": 4, "lr": 1e-4, "batch": 2, "checkpoint_every": 2}}

    def run(work: Path, kill_after: int | None = None):
        model = load_model("tiny:sdxl")
        calib = Calibration(model.pipe, model.arch, SPEC, work_dir=work)
        if kill_after is not None:
            hooked = functools.partial(distill_train.distill, on_iteration=_kill_after(kill_after))
            monkeypatch.setattr(distill_train, "distill", hooked)
        try:
            return _pass(**config).apply(model.pipe, calib), model.pipe.unet
        finally:
            monkeypatch.undo()

    _, reference = run(tmp_path / "straight")
    with pytest.raises(_Killed):
        run(tmp_path / "killed", kill_after=3)
    (ckpt,) = (tmp_path / "killed" / "checkpoints").glob("blocks.remove-*/distill.safetensors")
    assert read_train_state(ckpt)[0] == 2
    report, student = run(tmp_path / "killed")
    assert report.summary["distill"]["resumed_from"] == 2
    want = reference.state_dict()
    for name, got in student.state_dict().items():
        assert torch.equal(got, want[name]), name


def test_trajectories_are_recorded_once_and_reused_from_disk(tmp_path):
    def unet_calls(spec: CalibrationSpec) -> tuple[int, object]:
        model = load_model("tiny:sdxl")
        calls = []
        model.pipe.unet.register_forward_pre_hook(lambda *_: calls.append(1))
        data = Calibration(model.pipe, model.arch, spec, work_dir=tmp_path).record()
        return len(calls), data

    n, first = unet_calls(SPEC)
    assert n == len(PROMPTS) * SPEC.steps  # one CFG-batched call per step and prompt
    n, again = unet_calls(SPEC)
    assert n == 0 and again.key == first.key
    for got, want in zip(again.tensors, first.tensors, strict=True):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    n, other = unet_calls(SPEC.model_copy(update={"steps": 3}))  # other settings: recorded
    assert n == len(PROMPTS) * 3 and other.key != first.key
    assert len(list((tmp_path / "trajectories").iterdir())) == 2


def test_the_cache_key_is_the_same_in_another_process():
    # A resumed `slimdiff compress` is a new process: its key must find the old work folder.
    code = (
        "from slimdiff.calib import Calibration\n"
        "from slimdiff.models import load_model\n"
        "from slimdiff.recipe import CalibrationSpec\n"
        f"spec = CalibrationSpec.model_validate({SPEC.model_dump()!r})\n"
        "m = load_model('tiny:sdxl')\n"
        "print(Calibration(m.pipe, m.arch, spec).key)"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    model = load_model("tiny:sdxl")
    assert out.stdout.strip().splitlines()[-1] == Calibration(model.pipe, model.arch, SPEC).key


def test_compress_keeps_trajectories_and_drops_checkpoints_once_the_artifact_is_written(tmp_path):
    from slimdiff.compress.runner import compress_model

    recipe = validate_recipe(
        {
            "model": "tiny:sdxl",
            "calibration": SPEC.model_dump(),
            "passes": [{"pass": "blocks.remove", **HALVING, "distill": {"steps": 2, "lr": 1e-4}}],
        }
    )
    compress_model(load_model("tiny:sdxl"), recipe, tmp_path / "artifact")
    work = tmp_path / "artifact.work"
    assert len(list((work / "trajectories").iterdir())) == 1
    assert not (work / "checkpoints").exists()
    report = json.loads((tmp_path / "artifact" / "report.json").read_text())
    assert report["passes"][0]["summary"]["distill"]["iterations"] == 2


# ------------------------------------------------------------------ feature pairs


@pytest.mark.parametrize("preset", list(PRESETS))
def test_feature_pairs_compare_tensors_of_the_same_shape(preset):
    model = load_model(f"tiny:{PRESETS[preset].family}")
    teacher = model.pipe.unet
    plan = make_plan(read_structure(teacher), PRESETS[preset].settings("first"))
    student, mapping = build_student(teacher, plan)
    pairs = {
        lv: feature_pairs(mapping, lv, student, teacher)
        for lv in ("block", "sub_block", "self_attn")
    }
    everything = [p for lv in pairs.values() for p in lv]
    inputs = _dummy_inputs(teacher)
    with torch.no_grad():
        with capture(teacher, [t for _, t in everything]) as t_feats:
            teacher(*inputs[0], **inputs[1])
        with capture(student, [s for s, _ in everything]) as s_feats:
            student(*inputs[0], **inputs[1])
    for s, t in everything:
        assert s_feats[s].shape == t_feats[t].shape, (s, t)
    n_blocks = len(student.down_blocks) + len(student.up_blocks)
    assert len(pairs["block"]) == n_blocks
    assert len(pairs["self_attn"]) == sum(
        1 for n, _ in student.named_modules() if n.endswith("attn1")
    )
    assert ("mid_block", "mid_block") in pairs["sub_block"] or student.mid_block is None


def test_bk_sdm_tiny_pairs_the_downsampler_free_block_before_the_teacher_downsamples():
    # BK-SDM's own KD for Tiny: teacher down_blocks.2's last layer against the student's.
    model = load_model("tiny:sd15")
    teacher = model.pipe.unet
    plan = make_plan(read_structure(teacher), PRESETS["bk-sdm-tiny"].settings("first"))
    student, mapping = build_student(teacher, plan)
    pairs = dict(feature_pairs(mapping, "block", student, teacher))
    assert pairs["down_blocks.2"] == "down_blocks.2.attentions.1"
    assert pairs["down_blocks.0"] == "down_blocks.0"
    assert pairs["up_blocks.0"] == "up_blocks.1"  # the innermost up stage is gone


def test_sub_block_pairs_skip_removed_modules_and_match_the_mid_blocks():
    model = load_model("tiny:sdxl")
    teacher = model.pipe.unet
    plan = make_plan(read_structure(teacher), PRESETS["ssd-1b"].settings("first"))
    student, mapping = build_student(teacher, plan)
    pairs = feature_pairs(mapping, "sub_block", student, teacher)
    teachers = {t for _, t in pairs}
    # Segmind's middle_truncate: SDXL's whole mid-block against SSD-1B's single ResNet.
    assert ("mid_block", "mid_block") in pairs
    assert not any(t.startswith("mid_block.") for t in teachers)
    assert all(s == t for s, t in pairs)  # SSD-1B keeps every ResNet and Transformer2DModel


def _dummy_inputs(unet):
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    context = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    kwargs = {"encoder_hidden_states": context}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pooled, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2),
        }
    return [sample, torch.tensor([500, 500])], kwargs


# ------------------------------------------------------------------ config and reports


@pytest.mark.parametrize(
    ("distill", "message"),
    [
        ({"steps": -1}, "greater than or equal to 0"),
        ({"steps": 10, "learning_rate": 1e-4}, "Extra inputs"),
        ({"hooks": "layer"}, "Input should be 'block', 'sub_block' or 'self_attn'"),
        ({"lr": 0}, "greater than 0"),
        ({"batch": 0}, "greater than or equal to 1"),
        ({"task_weight": 1.0}, "task_weight needs training images"),
    ],
)
def test_bad_distill_configs_fail_validation(distill, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        get_pass("blocks.remove").Config.model_validate({"preset": "ssd-1b", "distill": distill})


def test_a_checkpoint_of_other_settings_or_an_oversplit_batch_is_refused(tmp_path):
    from slimdiff.trainstate import save_train_state

    linear = torch.nn.Linear(2, 2)
    ckpt = tmp_path / "distill.safetensors"
    save_train_state(ckpt, {"student": linear}, None, 3, {"settings": {"lr": 1.0}})
    settings = replace(SEGMIND, steps=5)
    with pytest.raises(UserError, match="checkpoint of other distillation settings; delete it"):
        distill_train.distill(linear, linear, None, [], settings, checkpoint=ckpt)
    with pytest.raises(UserError, match=r"accumulate \(4\) splits a batch of 2"):
        distill_train.distill(linear, linear, None, [], replace(settings, batch=2, accumulate=4))


def test_a_bad_distill_key_in_a_recipe_names_the_pass_and_field():
    data = {
        "model": "tiny:sdxl",
        "passes": [{"pass": "blocks.remove", "preset": "vega", "distill": {"step": 5}}],
    }
    with pytest.raises(UserError, match=r"passes\[0\] \(blocks\.remove\): field 'distill\.step'"):
        validate_recipe(data, "r.yaml")


def test_calibration_is_needed_only_when_distilling(tmp_path):
    from slimdiff.compress.runner import compress_model

    assert not _pass(preset="ssd-1b").needs_calibration
    assert _pass(preset="ssd-1b", distill={"steps": 5}).needs_calibration
    # The runner records the teacher's trajectories for a pass that needs them, only then.
    for steps in (0, 1):
        entry = {"pass": "blocks.remove", **HALVING, "distill": {"steps": steps, "lr": 1e-4}}
        recipe = validate_recipe(
            {"model": "tiny:sdxl", "calibration": SPEC.model_dump(), "passes": [entry]}
        )
        compress_model(load_model("tiny:sdxl"), recipe, tmp_path / f"a{steps}")
        assert (tmp_path / f"a{steps}.work" / "trajectories").is_dir() == (steps > 0)


def test_preset_defaults_are_the_papers_and_recipe_keys_override_them():
    bk = DistillConfig(steps=10).resolve(PRESETS["bk-sdm-small"].distill)
    assert (bk.out_weight, bk.feat_weight, bk.hooks, bk.lr) == (1.0, 1.0, "block", 5e-5)
    assert bk.ema_decay == 0.9999  # kd_train.sh --use_ema
    assert DistillConfig(ema_decay=0).resolve(PRESETS["bk-sdm-small"].distill).ema_decay == 0
    ssd = DistillConfig(steps=10, lr=3e-4).resolve(PRESETS["ssd-1b"].distill)
    assert (ssd.out_weight, ssd.feat_weight, ssd.hooks, ssd.lr) == (0.5, 0.5, "sub_block", 3e-4)
    koala = DistillConfig(hooks="block").resolve(PRESETS["koala-700m"].distill)
    assert (koala.hooks, koala.steps) == ("block", 0)
    assert PRESETS["koala-1b"].distill.hooks == "self_attn"


def test_without_calibration_the_student_is_built_and_distillation_reported_skipped():
    model = load_model("tiny:sdxl")
    report = _pass(preset="ssd-1b", distill={"steps": 100}).apply(model.pipe, None)
    assert report.summary["distill"].startswith("skipped: 100 steps asked, but no calibration")
    assert report.summary["params_after"] < report.summary["params_before"]


def test_toy_distillation_calibrates_on_training_prompts_not_held_out_ones():
    from slimdiff.toy.heldout import heldout_prompts, is_heldout
    from slimdiff.toy.scenes import parse_prompt

    recipe = load_recipe(ROOT / "recipes" / "toy-shapes-ssd.yaml")
    prompts = recipe.calibration.prompts
    assert isinstance(prompts, list) and len(prompts) >= 4
    assert build_passes(recipe)[0].config.distill.steps > 0
    assert not set(prompts) & set(heldout_prompts())
    assert not any(is_heldout(parse_prompt(p)) for p in prompts)
    plain = load_recipe(ROOT / "recipes" / "toy-shapes-ssd-nodistill.yaml")
    assert build_passes(plain)[0].config.distill.steps == 0

    def structure(r):
        return {k: v for k, v in r.passes[0].options().items() if k != "distill"}

    assert structure(recipe) == structure(plain)
