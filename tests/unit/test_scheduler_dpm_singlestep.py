"""The numpy DPMSolverSinglestepScheduler against diffusers' own, over whole trajectories.

Same harness and tolerance as tests/unit/test_schedulers.py (`_run`: a denoiser that
depends on its input, every intermediate sample within 1e-5 of the latent's magnitude;
the SDE form gets the same fresh noise on both sides through diffusers' randn_tensor).
Third-order Heun groups amplify float32 rounding (their second divided difference divides
by r0 - r1 and r1), most in the SDE form: there diffusers' own float32 trajectory is ~5e-6
from the same computation in float64, and ours agrees with diffusers to the same size
(`test_order3_heun_sde_is_ill_conditioned` shows it).
"""

from __future__ import annotations

import logging
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from slimdiff.runtime.schedulers.dpm_singlestep import DPMSolverSinglestepScheduler  # noqa: E402

from tests.unit.test_schedulers import SD15, SD_BETAS, SDXL_EULER, SHAPE, TOL, _run  # noqa: E402

SMIN = {**SD_BETAS, "final_sigmas_type": "sigma_min"}
DPM = {**SMIN, "algorithm_type": "dpmsolver"}  # DPM-Solver needs a nonzero final sigma
SDE = {**SD_BETAS, "algorithm_type": "sde-dpmsolver++"}
CASES = {
    "order2": (SD_BETAS, 20),
    "order2-odd-steps": (SD_BETAS, 15),
    "order2-few-steps": (SD_BETAS, 3),
    "order2-one-step": (SD_BETAS, 1),
    "order2-many-steps": (SD_BETAS, 100),
    "order3": ({**SD_BETAS, "solver_order": 3}, 20),
    "order3-heun": ({**SD_BETAS, "solver_order": 3, "solver_type": "heun"}, 21),
    "order1": ({**SD_BETAS, "solver_order": 1}, 10),
    # a nonzero final sigma and steps a multiple of the order: the last group is full order
    "order2-heun-sigma_min": ({**SMIN, "solver_type": "heun"}, 10),
    "order3-sigma_min": ({**SMIN, "solver_order": 3}, 12),
    "order3-heun-sigma_min": ({**SMIN, "solver_order": 3, "solver_type": "heun"}, 12),
    "order3-sigma_min-lower_order_final": (
        {**SMIN, "solver_order": 3, "lower_order_final": True},
        9,
    ),
    "order3-sigma_min-uneven": ({**SMIN, "solver_order": 3}, 10),  # lower_order_final forced
    "karras": ({**SD_BETAS, "use_karras_sigmas": True}, 25),
    "karras-few-steps": ({**SD_BETAS, "use_karras_sigmas": True}, 8),
    "karras-order3-sigma_min": ({**SMIN, "use_karras_sigmas": True, "solver_order": 3}, 9),
    "karras-sigma_min-max-keys": ({**SD_BETAS, "use_karras_sigmas": True, "sigma_min": 0.1}, 10),
    "vpred": ({**SD_BETAS, "prediction_type": "v_prediction"}, 20),
    "sample-pred": ({**SD_BETAS, "prediction_type": "sample"}, 10),
    "sd15-config": (SD15, 25),
    "sdxl-euler-config": (SDXL_EULER, 25),
    # keys diffusers' singlestep class does not have: ignored on both sides
    "foreign-keys-ignored": (
        {
            **SD_BETAS,
            "timestep_spacing": "trailing",
            "steps_offset": 1,
            "rescale_betas_zero_snr": True,
            "prediction_type": "v_prediction",
        },
        12,
    ),
    "cosine-lambda_min_clipped": (
        {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
        12,
    ),
    "linear-betas": ({}, 10),
    "trained_betas": ({"trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()}, 6),
    "dpmsolver-order2": (DPM, 10),
    "dpmsolver-order2-heun": ({**DPM, "solver_type": "heun"}, 10),
    "dpmsolver-order3-heun": ({**DPM, "solver_order": 3, "solver_type": "heun"}, 12),
    "dpmsolver-order3-vpred": ({**DPM, "solver_order": 3, "prediction_type": "v_prediction"}, 12),
    "dpmsolver-sample-pred-karras": (
        {**DPM, "prediction_type": "sample", "use_karras_sigmas": True},
        10,
    ),
    "sde-order2": (SDE, 20),
    "sde-order2-heun-karras": ({**SDE, "solver_type": "heun", "use_karras_sigmas": True}, 10),
    "sde-order3": ({**SDE, "solver_order": 3}, 14),
    "sde-order3-heun-sigma_min": (
        {**SDE, "solver_order": 3, "solver_type": "heun", "final_sigmas_type": "sigma_min"},
        12,
    ),
    "sde-order1-vpred": ({**SDE, "solver_order": 1, "prediction_type": "v_prediction"}, 8),
}


def _pair(config: dict):
    """diffusers' scheduler and ours from the same (complete) config."""
    ref = diffusers.DPMSolverSinglestepScheduler.from_config(config)
    ours = DPMSolverSinglestepScheduler(
        **{k: v for k, v in ref.config.items() if not k.startswith("_")}
    )
    return ref, ours


@pytest.fixture(autouse=True)
def _quiet_diffusers():
    """diffusers warns when it turns lower_order_final on; the tests check that it does."""
    logger = logging.getLogger("diffusers.schedulers.scheduling_dpmsolver_singlestep")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


@pytest.mark.parametrize("case", CASES)
def test_dpm_singlestep_trajectory(case):
    config, steps = CASES[case]
    ref, ours = _pair(config)
    assert ours.stochastic == ("sde" in case)
    assert _run(ref, ours, steps, seed=sum(map(ord, case))) < TOL
    assert len(ours.timesteps) == steps
    assert ours.order_list == ref.order_list
    assert ours.lower_order_final == ref.config.lower_order_final


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("lower_order_final", [False, True])
def test_order_list(order, final, lower_order_final):
    for steps in range(1, 14):
        config = {"solver_order": order, "final_sigmas_type": final}
        config["lower_order_final"] = lower_order_final
        ref, ours = _pair(config)
        ref.set_timesteps(steps)
        ours.set_timesteps(steps)
        assert ours.order_list == ref.order_list, steps
        assert len(ours.order_list) == steps


def test_lower_order_final_switch_persists():
    """diffusers turns lower_order_final on for good once steps are not a multiple of the
    order: a later even step count keeps the lower-order tail, on both sides."""
    ref, ours = _pair({**SMIN, "solver_order": 2})
    for steps in (8, 7, 8):
        ref.set_timesteps(steps)
        ours.set_timesteps(steps)
        assert ours.order_list == ref.order_list
    assert ours.order_list == [1, 2, 1, 2, 1, 2, 1, 1]


def test_aliases():
    """diffusers maps DEIS/UniPC names: algorithm "deis" -> "dpmsolver++" (which it then
    refuses with a zero final sigma; we do not), solver types logrho/bh1/bh2 -> midpoint."""
    with pytest.raises(ValueError, match="final_sigmas_type"):
        diffusers.DPMSolverSinglestepScheduler(algorithm_type="deis")
    ours = DPMSolverSinglestepScheduler(**SD_BETAS, algorithm_type="deis", solver_type="bh2")
    assert (ours.algorithm, ours.solver_type) == ("dpmsolver++", "midpoint")
    ref = diffusers.DPMSolverSinglestepScheduler(**SD_BETAS, solver_type="bh2")
    assert _run(ref, ours, 10, seed=21) < TOL


def test_order3_heun_sde_is_ill_conditioned():
    """diffusers' own float32 trajectory of the order-3 Heun SDE case, against the same
    steps on float64 latents, differs by more than 1e-6 of the latent: our ~5e-6 from
    diffusers in that case is rounding of this size, not another formula."""
    config, steps = CASES["sde-order3-heun-sigma_min"]
    rng = np.random.default_rng(22)
    latent, noise = (rng.standard_normal(SHAPE) for _ in range(2))
    fresh = [rng.standard_normal(SHAPE) for _ in range(steps)]
    ends = []
    for dtype in (torch.float32, torch.float64):
        ref, _ = _pair(config)
        ref.set_timesteps(steps)
        x, eps = torch.from_numpy(latent).to(dtype), torch.from_numpy(noise).to(dtype)
        for i, t in enumerate(ref.timesteps):
            draw = mock.Mock(return_value=torch.from_numpy(fresh[i]).to(dtype))
            with mock.patch(f"{type(ref).__module__}.randn_tensor", draw):
                x = ref.step(0.5 * x + eps, t, x).prev_sample
        ends.append(x.double().numpy())
    assert np.abs(ends[0] - ends[1]).max() / np.abs(ends[1]).max() > 1e-6


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"thresholding": True}, "thresholding"),
        ({"variance_type": "learned_range"}, "variance_type"),
        ({"use_flow_sigmas": True}, "use_flow_sigmas"),
        ({"use_dynamic_shifting": True}, "use_dynamic_shifting"),
        ({"prediction_type": "flow_prediction"}, "prediction_type"),
        ({"algorithm_type": "sde-dpmsolver"}, "algorithm_type"),
        ({"algorithm_type": "dpmsolver"}, "final_sigmas_type"),  # to sigma 0: diffusers too
        ({"solver_order": 4}, "solver_order"),
        ({"solver_type": "bh3"}, "solver_type"),
        ({"final_sigmas_type": "sigma_max"}, "final_sigmas_type"),
        ({"beta_schedule": "sqrt"}, "beta_schedule"),
    ],
)
def test_unsupported_values_raise(config, key):
    with pytest.raises(ValueError, match=key):
        DPMSolverSinglestepScheduler(**config)


def test_misuse_raises():
    sched = DPMSolverSinglestepScheduler(**SD_BETAS, solver_order=3)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(x, 0, x)
    with pytest.raises(ValueError, match="sigmas"):
        sched.set_timesteps(10, sigmas=np.ones(10))
    with pytest.raises(ValueError, match="mu"):
        sched.set_timesteps(10, mu=0.5)
    for n in (None, 0, 1001):
        with pytest.raises(ValueError, match="num_inference_steps"):
            sched.set_timesteps(n)
    sched.set_timesteps(6)
    assert len(sched.timesteps) == 6 and sched.timesteps.dtype == np.float32
    sched.step(x, 0, x)
    with pytest.raises(ValueError, match="history"):
        sched.step(x, 2, x)
    sched.step(x, 1, x)
    with pytest.raises(ValueError, match="history"):  # repeating a step
        sched.step(x, 1, x)
    with pytest.raises(IndexError):
        sched.step(x, 6, x)
    with pytest.raises(IndexError):  # numpy would silently wrap -1 to the last sigma
        sched.step(x, -1, x)


def test_sde_steps_need_noise():
    sched = DPMSolverSinglestepScheduler(**SDE)
    sched.set_timesteps(4)
    assert sched.stochastic and not DPMSolverSinglestepScheduler(**SD_BETAS).stochastic
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match="noise"):
        sched.step(x, 0, x)
    with pytest.raises(ValueError, match="noise"):
        sched.step(x, 0, x, noise=np.zeros((1, 4, 4, 4), np.float32))


def _trajectory(sched, start, noise, steps: int) -> np.ndarray:
    x = start
    for i in range(steps):
        x = sched.step(np.float32(0.5) * x + noise, i, x)
    return x


def test_history_restarts_at_step_zero():
    """Step 0 restarts the groups: an abandoned run, then two whole ones on one instance
    without set_timesteps in between, equal a fresh instance's run exactly."""
    config = {**SD_BETAS, "solver_order": 3}
    rng = np.random.default_rng(23)
    start, noise = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    fresh = DPMSolverSinglestepScheduler(**config)
    fresh.set_timesteps(9)
    expected = _trajectory(fresh, start, noise, 9)
    sched = DPMSolverSinglestepScheduler(**config)
    sched.set_timesteps(9)
    _trajectory(sched, noise, start, 5)  # other inputs, abandoned mid-group
    for _ in range(2):
        np.testing.assert_array_equal(_trajectory(sched, start, noise, 9), expected)
    assert np.abs(expected - start).max() > 0.1  # the run did move the latent


def test_scale_model_input_is_identity_and_init_noise_sigma_one():
    sched = DPMSolverSinglestepScheduler(**SD_BETAS)
    sched.set_timesteps(10)
    x = np.random.default_rng(24).standard_normal(SHAPE).astype(np.float32)
    assert sched.init_noise_sigma == 1.0
    np.testing.assert_array_equal(sched.scale_model_input(x, 4), x)
    assert sched.scale_model_input(x.astype(np.float64), 4).dtype == np.float32
