"""The numpy EDM schedulers (EDM Euler, EDM DPM-Solver++) against diffusers' own.

Same harness and tolerance as tests/unit/test_schedulers.py (`_run`: a denoiser that
depends on its input, every intermediate sample within 1e-5 of the latent's magnitude;
stochastic ones get the same noise on both sides). Where the port departs from diffusers
on purpose, its own tests check it: the h = 0 last step of final_sigmas_type="sigma_min",
NaN in diffusers for Heun and order 3 (the port: the identity, the h -> 0 limit), and EDM
Euler's `sigmas` (ramp positions in diffusers) outside [0, 1] or under the exponential
schedule (rejected).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from slimdiff.runtime.schedulers import edm_dpm_solver, edm_euler  # noqa: E402
from slimdiff.runtime.schedulers.edm_dpm_solver import EDMDPMSolverMultistepScheduler  # noqa: E402
from slimdiff.runtime.schedulers.edm_euler import EDMEulerScheduler  # noqa: E402

from tests.unit.test_schedulers import SHAPE, _run  # noqa: E402

DPM = "EDMDPMSolverMultistepScheduler"
EULER = "EDMEulerScheduler"
OURS = {DPM: EDMDPMSolverMultistepScheduler, EULER: EDMEulerScheduler}

# playgroundai/playground-v2.5-1024px-aesthetic, scheduler/scheduler_config.json
PLAYGROUND = {
    "algorithm_type": "dpmsolver++",
    "euler_at_final": False,
    "final_sigmas_type": "zero",
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "rho": 7.0,
    "sigma_data": 0.5,
    "sigma_max": 80.0,
    "sigma_min": 0.002,
    "solver_order": 2,
    "solver_type": "midpoint",
    "thresholding": False,
}
SDE = {**PLAYGROUND, "algorithm_type": "sde-dpmsolver++"}
# CosXL-like: v-prediction on an exponential schedule, other sigma range and sigma_data
COSXL = {
    "sigma_schedule": "exponential",
    "prediction_type": "v_prediction",
    "sigma_min": 0.002,
    "sigma_max": 120.0,
    "sigma_data": 1.0,
}

CASES = {
    DPM: {
        "playground-25": (PLAYGROUND, 25),
        "playground-50": (PLAYGROUND, 50),
        "heun": ({**PLAYGROUND, "solver_type": "heun"}, 25),
        "order1": ({**PLAYGROUND, "solver_order": 1}, 20),
        "order3": ({**PLAYGROUND, "solver_order": 3}, 20),
        "order3-few-steps": ({**PLAYGROUND, "solver_order": 3}, 8),
        "exponential": ({**PLAYGROUND, "sigma_schedule": "exponential"}, 20),
        "sigma_min-few-steps": ({**PLAYGROUND, "final_sigmas_type": "sigma_min"}, 10),
        # 15+ steps to sigma_min: the last step stays second order, with h = 0 (identity)
        "sigma_min-midpoint-16": ({**PLAYGROUND, "final_sigmas_type": "sigma_min"}, 16),
        "sigma_min-euler_at_final-heun": (
            {
                **PLAYGROUND,
                "final_sigmas_type": "sigma_min",
                "euler_at_final": True,
                "solver_type": "heun",
            },
            20,
        ),
        "vpred": ({**PLAYGROUND, "prediction_type": "v_prediction"}, 25),
        "few-steps": (PLAYGROUND, 6),
        "few-steps-no-lower_order_final": ({**PLAYGROUND, "lower_order_final": False}, 6),
        "one-step": (PLAYGROUND, 1),
        "cosxl-like": ({**PLAYGROUND, **COSXL}, 15),
        "sigma_data-rho": ({**PLAYGROUND, "sigma_data": 0.75, "rho": 5.0, "sigma_max": 40.0}, 12),
        "sde-playground": (SDE, 25),
        "sde-heun-sigma_min": (
            {**SDE, "solver_type": "heun", "final_sigmas_type": "sigma_min"},
            10,
        ),
        "sde-order1-vpred": ({**SDE, "solver_order": 1, "prediction_type": "v_prediction"}, 12),
        "sde-exponential-few": ({**SDE, "sigma_schedule": "exponential"}, 8),
    },
    EULER: {
        "karras": ({}, 25),
        "exponential": ({"sigma_schedule": "exponential"}, 20),
        "vpred": ({"prediction_type": "v_prediction"}, 15),
        "sigma_min": ({"final_sigmas_type": "sigma_min"}, 10),
        "cosxl-like": (COSXL, 20),
        "sigma_data-rho": ({"sigma_data": 0.75, "rho": 5.0, "sigma_max": 40.0}, 12),
        "one-step": ({}, 1),
    },
}


def _pair(cls_name: str, config: dict):
    ref = getattr(diffusers, cls_name).from_config(config)
    ours = OURS[cls_name](**{k: v for k, v in ref.config.items() if not k.startswith("_")})
    return ref, ours


@pytest.mark.parametrize(
    ("cls_name", "case"),
    [pytest.param(c, k, id=f"{c}-{k}") for c, cases in CASES.items() for k in cases],
)
def test_trajectory(cls_name, case):
    config, steps = CASES[cls_name][case]
    ref, ours = _pair(cls_name, config)
    assert ours.stochastic == case.startswith("sde")
    worst = _run(ref, ours, steps, seed=sum(map(ord, case)))
    assert 0 <= worst < 1e-5


@pytest.mark.parametrize(
    "config",
    [
        {**PLAYGROUND, "solver_type": "heun", "final_sigmas_type": "sigma_min"},
        {**PLAYGROUND, "solver_order": 3, "final_sigmas_type": "sigma_min"},
        {**SDE, "solver_type": "heun", "final_sigmas_type": "sigma_min"},
    ],
    ids=["heun", "order3", "sde-heun"],
)
def test_zero_length_last_step_is_identity(config):
    """20 steps to sigma_min: diffusers' last step (sigma_min -> sigma_min, h = 0) is 0/0 =
    NaN for these; the port returns the sample, and matches diffusers up to there."""
    ref, ours = _pair(DPM, config)
    ref.set_timesteps(20)
    ours.set_timesteps(20)
    # Karras' last sigma is 0.0019999996 in float32, sigma_min 0.002: the same log
    assert ours.sigmas[-1] == np.float32(0.002)
    assert np.log(ours.sigmas[-2]) == np.log(ours.sigmas[-1])
    rng = np.random.default_rng(3)
    x = rng.standard_normal(SHAPE).astype(np.float32) * np.float32(ours.init_noise_sigma)
    bias, zeros = rng.standard_normal(SHAPE).astype(np.float32), np.zeros(SHAPE, np.float32)
    x_ref = torch.from_numpy(x)
    extra = {"noise": zeros} if ours.stochastic else {}
    edm = "diffusers.schedulers.scheduling_edm_dpmsolver_multistep.randn_tensor"
    with pytest.MonkeyPatch.context() as patch:  # the SDE's noise: zero on both sides
        patch.setattr(edm, lambda shape, **kw: torch.zeros(shape))
        for i, t in enumerate(ref.timesteps):
            eps = np.float32(0.5) * ours.scale_model_input(x, i) + bias
            x_next = ours.step(eps, i, x, **extra)
            out = 0.5 * ref.scale_model_input(x_ref, t) + torch.from_numpy(bias)
            x_ref = ref.step(out, t, x_ref).prev_sample
            if i < 19:
                scale = float(x_ref.abs().max())
                assert np.abs(x_next - x_ref.numpy()).max() / scale < 1e-5
            x_last, x = x, x_next
    assert torch.isnan(x_ref).all()  # diffusers
    ratio = ours.sigmas[-1] / ours.sigmas[-2]  # 1 + an ulp: diffusers' first-order result
    np.testing.assert_array_equal(x, ratio * x_last)
    assert np.isfinite(x).all() and 0 < np.abs(x).max() < 10


class _TorchSigmas(diffusers.EDMEulerScheduler):
    """diffusers' EDM Euler calls sigmas.to(): it takes tensors only."""

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None):
        sigmas = None if sigmas is None else torch.from_numpy(np.asarray(sigmas))
        super().set_timesteps(num_inference_steps, device, sigmas)


def test_euler_custom_sigmas_are_ramp_positions():
    ref = _TorchSigmas()
    ours = EDMEulerScheduler(**{k: v for k, v in ref.config.items() if not k.startswith("_")})
    ramp = np.array([0.0, 0.1, 0.3, 0.5, 0.8, 0.9, 1.0])
    _run(ref, ours, len(ramp), seed=11, sigmas=ramp)
    assert ours.num_inference_steps == 7 and len(ours.sigmas) == 8
    assert ours.sigmas[0] == np.float32(80.0) and ours.sigmas[-1] == 0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ours.set_timesteps(sigmas=np.array([14.0, 2.0, 0.0]))  # sigma values, not positions
    exponential = EDMEulerScheduler(sigma_schedule="exponential")
    with pytest.raises(ValueError, match="karras"):  # diffusers would use only their count
        exponential.set_timesteps(sigmas=ramp)


@pytest.mark.parametrize("cls_name", [DPM, EULER])
@pytest.mark.parametrize("schedule", ["karras", "exponential"])
def test_schedule_scaling_and_init_noise_sigma(cls_name, schedule):
    config = {**(PLAYGROUND if cls_name == DPM else {}), "sigma_schedule": schedule}
    ref, ours = _pair(cls_name, config)
    # before set_timesteps: the training-length schedule diffusers exposes
    assert ours.timesteps.shape == tuple(ref.timesteps.shape)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=2e-6)
    for steps in (1, 7, 25, 50):
        ref.set_timesteps(steps)
        ours.set_timesteps(steps)
        assert ours.timesteps.dtype == ours.sigmas.dtype == np.float32
        assert ours.timesteps.shape == (steps,) and ours.sigmas.shape == (steps + 1,)
        np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=2e-6, atol=1e-6)
        np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=2e-6)
    # c_noise = log(sigma) / 4: sigma_max = 80 gives ~1.0955, sigma_min = 0.002 ~-1.5537
    assert ours.timesteps[0] == pytest.approx(np.log(80.0) / 4, rel=1e-6)
    assert ours.timesteps[-1] == pytest.approx(np.log(0.002) / 4, rel=1e-6)
    assert ours.init_noise_sigma == float(ref.init_noise_sigma) == (80.0**2 + 1) ** 0.5
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32) * 80
    for i in (0, 24, 49):
        ref._step_index = i  # diffusers keeps its index; set it per probe
        expected = ref.scale_model_input(torch.from_numpy(x), ref.timesteps[i]).numpy()
        np.testing.assert_allclose(ours.scale_model_input(x, i), expected, rtol=2e-6)
    sigma = float(ours.sigmas[0])  # c_in = 1 / sqrt(sigma^2 + sigma_data^2)
    expected = x / np.sqrt(sigma**2 + 0.25)
    np.testing.assert_allclose(ours.scale_model_input(x, 0), expected, rtol=1e-6)


def test_aliases_as_diffusers():
    config = {**PLAYGROUND, "algorithm_type": "deis", "solver_type": "bh2"}
    with pytest.raises(ValueError, match="final_sigmas_type"):  # as diffusers refuses it
        EDMDPMSolverMultistepScheduler(**config)
    with pytest.raises(ValueError, match="final_sigmas_type"):
        diffusers.EDMDPMSolverMultistepScheduler(**config)
    config["final_sigmas_type"] = "sigma_min"
    ref, ours = _pair(DPM, config)
    assert ref.config.algorithm_type == "dpmsolver++" and ref.config.solver_type == "midpoint"
    assert not ours.stochastic and ours.solver_type == "midpoint"
    _run(ref, ours, 10, seed=12)


@pytest.mark.parametrize(
    ("cls_name", "config", "key"),
    [
        (DPM, {"thresholding": True}, "thresholding"),
        (DPM, {"algorithm_type": "dpmsolver"}, "algorithm_type"),
        (DPM, {"algorithm_type": "sde-dpmsolver"}, "algorithm_type"),
        (DPM, {"solver_order": 4}, "solver_order"),
        (DPM, {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, "solver_order"),
        (DPM, {"solver_type": "bh3"}, "solver_type"),
        (DPM, {"sigma_schedule": "linear"}, "sigma_schedule"),
        (DPM, {"prediction_type": "sample"}, "prediction_type"),
        (DPM, {"final_sigmas_type": "denoise_to_zero"}, "final_sigmas_type"),
        (EULER, {"sigma_schedule": "beta"}, "sigma_schedule"),
        (EULER, {"prediction_type": "sample"}, "prediction_type"),
        (EULER, {"final_sigmas_type": "denoise_to_zero"}, "final_sigmas_type"),
    ],
)
def test_unsupported_values_raise(cls_name, config, key):
    with pytest.raises(ValueError, match=key):
        OURS[cls_name](**config)


def test_foreign_and_inert_keys_accepted():
    """Keys that do not change these code paths are ignored, as diffusers ignores them."""
    extra = {"dynamic_thresholding_ratio": 0.9, "sample_max_value": 2.0, "steps_offset": 1}
    dpm = EDMDPMSolverMultistepScheduler(**PLAYGROUND, **extra)
    euler = EDMEulerScheduler(**extra, timestep_spacing="leading")
    for sched in (dpm, euler):
        sched.set_timesteps(4)
        assert len(sched.timesteps) == 4


def test_misuse_raises():
    x = np.zeros(SHAPE, np.float32)
    dpm = EDMDPMSolverMultistepScheduler(**PLAYGROUND)
    with pytest.raises(ValueError, match="set_timesteps"):
        dpm.step(x, 0, x)
    for kwargs in ({"mu": 0.5}, {"sigmas": np.ones(3)}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            dpm.set_timesteps(10, **kwargs)
    with pytest.raises(ValueError, match="mu"):
        EDMEulerScheduler().set_timesteps(10, mu=0.5)
    for sched in (dpm, EDMEulerScheduler()):
        with pytest.raises(ValueError, match="num_inference_steps"):
            sched.set_timesteps(0)
    dpm.set_timesteps(5)
    dpm.step(x, 0, x)
    with pytest.raises(ValueError, match="history"):
        dpm.step(x, 2, x)
    with pytest.raises(IndexError):
        dpm.step(x, 5, x)
    with pytest.raises(IndexError):  # numpy would silently wrap -1 to the last sigma
        EDMEulerScheduler().step(x, -1, x)
    sde = EDMDPMSolverMultistepScheduler(**SDE)
    sde.set_timesteps(4)
    assert sde.stochastic and not dpm.stochastic and not EDMEulerScheduler.stochastic
    with pytest.raises(ValueError, match="noise"):
        sde.step(x, 0, x)
    with pytest.raises(ValueError, match="noise"):
        sde.step(x, 0, x, noise=np.zeros((1, 4, 4, 4), np.float32))


@pytest.mark.parametrize("config", [PLAYGROUND, {**PLAYGROUND, "solver_order": 3}])
def test_history_restarts_at_step_zero(config):
    """A second pass from step 0 without set_timesteps repeats the first exactly."""
    sched = EDMDPMSolverMultistepScheduler(**config)
    sched.set_timesteps(8)
    rng = np.random.default_rng(8)
    start, noise = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    runs = []
    for stop in (5, 8, 8):  # the first pass is abandoned halfway
        x = start * np.float32(sched.init_noise_sigma)
        for i in range(stop):
            x = sched.step(np.float32(0.5) * sched.scale_model_input(x, i) + noise, i, x)
        runs.append(x)
    np.testing.assert_array_equal(runs[1], runs[2])
    assert np.isfinite(runs[1]).all()


def test_imports_only_numpy_and_stdlib():
    """The runtime is torch-free: no torch, diffusers or transformers, even lazily."""
    for module in (edm_euler, edm_dpm_solver):
        for node in ast.walk(ast.parse(Path(module.__file__).read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # sibling modules only
                    assert node.level == 1 and node.module in ("_common", "edm_euler")
                    continue
                roots = {node.module.split(".")[0]}
            else:
                continue
            for root in roots:
                assert root == "numpy" or root in sys.stdlib_module_names, (module, root)
