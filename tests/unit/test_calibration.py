"""Calibration: the teacher's trajectories (inputs, noise, final latents, timesteps), replayed
exactly, rerun step by step with the stateless sampler, recorded before any pass runs, and
cached by the model's content."""

from __future__ import annotations

import pytest
import torch

from slimdiff.calib import Calibration
from slimdiff.models import load_model
from slimdiff.recipe import CalibrationSpec, validate_recipe
from slimdiff.sampler import StepNoise
from tests.unit.test_scheduler_edm import PLAYGROUND
from tests.unit.test_schedulers import STOCHASTIC

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = CalibrationSpec(prompts=["a red circle", "a blue square"], num_prompts=2, steps=3)
SIZES = {"sd15": (64, 64), "sdxl": (64, 64), "sd3": (64, 64), "flux": (64, 64)}


@pytest.fixture(scope="module")
def calibrated():
    cache = {}

    def get(family):
        if family not in cache:
            model = load_model(f"tiny:{family}")
            spec = SPEC.model_copy(update={"size": SIZES[family]})
            calib = Calibration(model.pipe, model.arch, spec)
            cache[family] = (model, calib, calib.record())
        return cache[family]

    return get


def test_trajectories_are_stored_by_keyword_with_noise_final_and_timesteps(calibrated):
    _, calib, data = calibrated("sdxl")
    t = data.tensors[0]
    assert t["step.kwargs.sample"].shape == (3, 2, 4, 8, 8)  # (steps, CFG batch, C, h, w)
    assert t["step.kwargs.timestep"].shape == (3, 2)
    assert t["const.kwargs.encoder_hidden_states"].shape[0] == 2  # stored once per prompt
    assert data.noise(0).shape == (1, 4, 8, 8) and data.final(0).shape == (1, 4, 8, 8)
    assert len(data.timesteps) == 3 and data.step_of(data.timesteps[1]) == 1
    torch.testing.assert_close(data.noise(1), calib.noise(1), rtol=0, atol=0)
    assert not torch.equal(data.noise(0), data.noise(1))  # one seed per prompt
    with pytest.raises(KeyError, match="is not one of"):
        data.step_of(12345.0)


def test_replayed_inputs_reproduce_the_pipelines_denoiser_calls_exactly(calibrated):
    model, calib, data = calibrated("sdxl")
    unet = model.pipe.unet
    outputs = []
    handle = unet.register_forward_hook(lambda m, a, out: outputs.append(out[0].clone()))
    try:
        calib._run(1)  # prompt 1 again, as recorded
    finally:
        handle.remove()
    for step in range(data.steps):
        args, kwargs = data.inputs([(1, step)])
        with torch.no_grad():
            replayed = unet(*args, **kwargs, return_dict=False)[0]
        assert torch.equal(replayed, outputs[step]), step


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_the_stateless_loop_reproduces_diffusers_final_latents(calibrated, family):
    model, calib, data = calibrated(family)
    denoiser = model.denoiser
    loop = calib.loop(denoiser)
    for prompt in range(2):
        cond = calib.conditioning(prompt, denoiser)
        with torch.no_grad():
            final = loop.run(data.noise(prompt), cond)
        ref = data.final(prompt)
        rel = (final - ref).norm() / ref.norm()
        assert final.shape == ref.shape and rel < 1e-5, (family, float(rel))


def test_any_step_reruns_with_grad_from_stored_latents(calibrated):
    model, calib, data = calibrated("sdxl")
    unet = model.pipe.unet
    loop = calib.loop(unet)
    cond = calib.conditioning(0, unet)
    saved = []
    with torch.no_grad():
        x, state = loop.start(data.noise(0))
        for i in range(loop.steps):
            saved.append((x, state))
            x, state = loop.step(i, x, state, cond)
    x1, state1 = saved[1]
    x1 = x1.clone().requires_grad_(True)
    again, _ = loop.step(1, x1, state1, cond)
    torch.testing.assert_close(again.detach(), saved[2][0], rtol=0, atol=0)
    again.sum().backward()
    assert x1.grad is not None and x1.grad.abs().sum() > 0


def test_teacher_trajectories_are_recorded_before_any_pass(tmp_path):
    """A first pass that changes the denoiser cannot change which model is the teacher."""
    from slimdiff.compress import Pass, PassReport, Stage, register_pass, unregister_pass
    from slimdiff.compress.runner import compress_model

    seen = {}

    class Perturb(Pass):
        name = "test.perturb"
        stage = Stage.STRUCTURAL

        def apply(self, pipe, calib):
            with torch.no_grad():
                for p in pipe.unet.parameters():
                    p.mul_(0.5)
            return PassReport(self.name)

    class Watch(Pass):
        name = "test.watch"
        stage = Stage.PRUNING
        needs_calibration = True

        def apply(self, pipe, calib):
            seen["final"] = calib.record().final(0)
            return PassReport(self.name)

    register_pass(Perturb)
    register_pass(Watch)
    try:
        spec = SPEC.model_copy(update={"size": (64, 64)}).model_dump()
        recipe = validate_recipe(
            {
                "model": "tiny:sdxl",
                "calibration": spec,
                "passes": [{"pass": "test.perturb"}, {"pass": "test.watch"}],
            }
        )
        compress_model(load_model("tiny:sdxl"), recipe, tmp_path / "a")
    finally:
        unregister_pass("test.perturb")
        unregister_pass("test.watch")
    model = load_model("tiny:sdxl")
    teacher = Calibration(model.pipe, model.arch, CalibrationSpec(**spec)).record()
    assert torch.equal(seen["final"], teacher.final(0))


def test_cache_key_follows_the_weights_not_the_name(tmp_path):
    model = load_model("tiny:sdxl")
    model.pipe.save_pretrained(tmp_path / "m", safe_serialization=True)
    first = load_model(str(tmp_path / "m"))
    key = Calibration(first.pipe, first.arch, SPEC).key
    with torch.no_grad():
        first.pipe.unet.conv_out.bias.add_(1e-3)  # "retrained", saved at the same path
    first.pipe.save_pretrained(tmp_path / "m", safe_serialization=True)
    again = load_model(str(tmp_path / "m"))
    assert Calibration(again.pipe, again.arch, SPEC).key != key
    same = load_model("tiny:sdxl")
    assert (
        Calibration(same.pipe, same.arch, SPEC).key == Calibration(model.pipe, model.arch, SPEC).key
    )


def test_calibration_scheduler_replaces_one_without_a_torch_sampler(tmp_path):
    """A model shipping DEIS (no torch sampler) calibrates with calibration.scheduler
    instead: the trajectories, the stateless loop and the cache key use it, and the model
    keeps its own scheduler (the artifact and bundle ship that)."""
    import diffusers

    from slimdiff.errors import UserError

    model = load_model("tiny:sd15")
    pipe = model.pipe
    pipe.scheduler = diffusers.DEISMultistepScheduler.from_config(pipe.scheduler.config)
    spec = SPEC.model_copy(update={"size": (64, 64)})
    with pytest.raises(UserError, match=r"calibration\.scheduler"):
        Calibration(pipe, model.arch, spec).loop(model.denoiser)
    euler = spec.model_copy(update={"scheduler": "EulerDiscreteScheduler"})
    calib = Calibration(pipe, model.arch, euler, work_dir=tmp_path)
    data = calib.record()
    assert type(pipe.scheduler).__name__ == "DEISMultistepScheduler"
    assert type(calib.scheduler).__name__ == "EulerDiscreteScheduler"
    assert calib.scheduler.config["beta_schedule"] == pipe.scheduler.config["beta_schedule"]
    assert calib.key != Calibration(pipe, model.arch, spec).key
    loop = calib.loop(model.denoiser)
    with torch.no_grad():
        final = loop.run(data.noise(0), calib.conditioning(0, model.denoiser))
    rel = (final - data.final(0)).norm() / data.final(0).norm()
    assert rel < 1e-5, float(rel)  # the loop samples as the recorded pipeline did
    bad = spec.model_copy(update={"scheduler": "NoSuchScheduler"})
    with pytest.raises(UserError, match="not a diffusers scheduler class"):
        _ = Calibration(pipe, model.arch, bad).scheduler
    with pytest.raises(ValueError, match="scheduler"):
        CalibrationSpec(scheduler="euler")  # class names: the core has no alias table


# Schedulers that add noise at each step, the EDM pair (Playground v2.5's), UniPC, Heun and
# DPM2: the loop reproduces the recorded pipeline run only if it adds the same step noise
# (StepNoise, from the generator calibration gives the pipeline) and carries each solver's
# state as diffusers does.
STOCHASTIC_AND_EDM = [
    ("sd15", "EulerAncestralDiscreteScheduler", {}),
    ("sdxl", "LCMScheduler", {}),
    ("sd15", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("sdxl", "EDMDPMSolverMultistepScheduler", PLAYGROUND),
    ("sdxl", "EDMDPMSolverMultistepScheduler", {**PLAYGROUND, "algorithm_type": "sde-dpmsolver++"}),
    ("sdxl", "EDMEulerScheduler", {}),
    ("sd15", "UniPCMultistepScheduler", {"solver_order": 3}),
    ("sd15", "HeunDiscreteScheduler", {}),
    ("sd15", "KDPM2DiscreteScheduler", {}),
]


@pytest.mark.parametrize(
    ("family", "scheduler", "config"),
    STOCHASTIC_AND_EDM,
    ids=[f"{f}-{s}-{c.get('algorithm_type', '')}" for f, s, c in STOCHASTIC_AND_EDM],
)
def test_the_stateless_loop_reproduces_stochastic_and_edm_pipelines(family, scheduler, config):
    import diffusers

    model = load_model(f"tiny:{family}")
    cls = getattr(diffusers, scheduler)
    if scheduler.startswith("EDM"):  # another process: the model's VP config does not apply
        model.pipe.scheduler = cls(**config)
    else:
        model.pipe.scheduler = cls.from_config({**model.pipe.scheduler.config, **config})
    calib = Calibration(model.pipe, model.arch, SPEC.model_copy(update={"size": (64, 64)}))
    data = calib.record()
    loop = calib.loop(model.denoiser)
    stochastic = loop.sampler.stochastic
    assert stochastic == (scheduler in STOCHASTIC or "sde" in config.get("algorithm_type", ""))
    for prompt in range(2):
        cond = calib.conditioning(prompt, model.denoiser)
        with torch.no_grad():
            final = loop.run(data.noise(prompt), cond, calib.step_noise(prompt))
        rel = (final - data.final(prompt)).norm() / data.final(prompt).norm()
        assert rel < 1e-5, (scheduler, prompt, float(rel))
    if stochastic:  # the noise matters, and the recorded run is reproducible
        with torch.no_grad():
            other = loop.run(data.noise(0), calib.conditioning(0, model.denoiser), StepNoise(99))
        assert (other - data.final(0)).norm() > 1e-3 * data.final(0).norm()
        assert torch.equal(calib._run(0)[1], data.final(0))


def test_guidance_rescale_is_recorded_replayed_and_keyed():
    """calibration.guidance_rescale: the pipeline records with diffusers' rescale, the loop
    replays it (rescale_noise_cfg after the CFG mix), and it is part of the cache key."""
    model = load_model("tiny:sd15")
    spec = SPEC.model_copy(update={"size": (64, 64), "guidance_rescale": 0.7})
    calib = Calibration(model.pipe, model.arch, spec)
    data = calib.record()
    loop = calib.loop(model.denoiser)
    assert loop.guidance_rescale == 0.7
    cond = calib.conditioning(0, model.denoiser)
    with torch.no_grad():
        final = loop.run(data.noise(0), cond)
        loop.guidance_rescale = 0.0
        plain = loop.run(data.noise(0), cond)
    ref = data.final(0)
    assert float((final - ref).norm() / ref.norm()) < 1e-5
    assert float((plain - ref).norm() / ref.norm()) > 1e-3  # the rescale mattered
    plain_key = Calibration(model.pipe, model.arch, spec.model_copy(update={"guidance_rescale": 0}))
    assert calib.key != plain_key.key


def test_guidance_rescale_is_refused_where_the_pipeline_has_none():
    from slimdiff.errors import UserError

    model = load_model("tiny:sd3")
    spec = SPEC.model_copy(update={"guidance_rescale": 0.5})
    with pytest.raises(UserError, match=r"calibration\.guidance_rescale: StableDiffusion3Pipeline"):
        Calibration(model.pipe, model.arch, spec)
    with pytest.raises(ValueError, match="less than or equal to 1"):
        CalibrationSpec(guidance_rescale=1.5)


@pytest.mark.parametrize("eta", [0.0, 0.3])
def test_tcd_eta_is_recorded_replayed_and_keyed(eta):
    """calibration.eta (TCD's gamma): the pipeline records with it, the loop replays it
    (with the same step noise when it is > 0), and it is part of the cache key."""
    import diffusers

    model = load_model("tiny:sdxl")
    model.pipe.scheduler = diffusers.TCDScheduler.from_config(model.pipe.scheduler.config)
    spec = SPEC.model_copy(update={"size": (64, 64), "eta": eta})
    calib = Calibration(model.pipe, model.arch, spec)
    data = calib.record()
    loop = calib.loop(model.denoiser)
    assert loop.sampler.stochastic == (eta > 0)
    for prompt in range(2):
        with torch.no_grad():
            cond = calib.conditioning(prompt, model.denoiser)
            final = loop.run(data.noise(prompt), cond, calib.step_noise(prompt))
        assert torch.equal(final, data.final(prompt)), prompt
    other = Calibration(model.pipe, model.arch, spec.model_copy(update={"eta": 1.0 - eta}))
    assert other.key != calib.key


def test_calibration_eta_needs_a_tcd_scheduler():
    from slimdiff.errors import UserError

    model = load_model("tiny:sd15")
    with pytest.raises(
        UserError, match=r"calibration\.eta is TCD's gamma; EulerDiscreteScheduler takes none"
    ):
        Calibration(model.pipe, model.arch, SPEC.model_copy(update={"eta": 0.3}))
    spec = SPEC.model_copy(update={"eta": 0.3, "scheduler": "TCDScheduler"})
    assert Calibration(model.pipe, model.arch, spec).sampler().eta == 0.3


def test_a_killed_recording_resumes_at_the_next_prompt(tmp_path, monkeypatch):
    """Each prompt is saved as it is recorded: a run killed after the first of three
    prompts records two on the rerun, and the result equals an unbroken recording; a
    damaged cache is recorded again, with a warning."""
    spec = SPEC.model_copy(update={"prompts": ["a", "b", "c"], "num_prompts": 3, "size": (64, 64)})
    model = load_model("tiny:sd15")
    calib = Calibration(model.pipe, model.arch, spec, work_dir=tmp_path)
    real, ran = calib._run, []

    def killed_after_one(i):
        if ran:
            raise KeyboardInterrupt
        ran.append(i)
        return real(i)

    monkeypatch.setattr(calib, "_run", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        calib.record()
    again = Calibration(model.pipe, model.arch, spec, work_dir=tmp_path)
    reran = []
    monkeypatch.setattr(again, "_run", lambda i: reran.append(i) or real(i))
    resumed = again.record()
    assert reran == [1, 2]
    straight = Calibration(model.pipe, model.arch, spec).record()  # no work folder
    assert resumed.steps == straight.steps and resumed.timesteps == straight.timesteps
    for a, b in zip(resumed.tensors, straight.tensors, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    folder = tmp_path / "trajectories" / again.key
    assert not folder.with_name(f"{folder.name}.prompts").exists()  # folded into the cache
    first = folder / "prompt_0000.safetensors"
    first.write_bytes(first.read_bytes()[:100])  # damaged
    third = Calibration(model.pipe, model.arch, spec, work_dir=tmp_path)
    assert len(third.record().tensors) == 3  # recorded again, not a SafetensorError
