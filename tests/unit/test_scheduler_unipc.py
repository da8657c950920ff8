"""The numpy UniPCMultistepScheduler against diffusers' own, over whole trajectories.

Same harness and tolerance as tests/unit/test_schedulers.py (`_run`: a denoiser that
depends on its input, every intermediate sample within 1e-5 of the latent's magnitude).
Where the port departs from diffusers on purpose, its own tests check it: the order-1 last
step to sigma = 0, where diffusers 0.42 returns NaN for bh1 and for predict_x0=False (the
port returns the h -> inf limit, the data prediction); the h = 0 last step of Karras sigmas
with final "sigma_min", NaN in diffusers at order 3 (the port: the identity); and
lower_order_final=False towards sigma = 0, where diffusers returns inf (rejected).
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from slimdiff.runtime.schedulers import unipc  # noqa: E402
from slimdiff.runtime.schedulers.unipc import UniPCMultistepScheduler  # noqa: E402

from tests.unit.test_schedulers import SD15, SD_BETAS, SHAPE, TOL, _run  # noqa: E402

FLOW_SD3 = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}
CASES = {
    "sd-defaults-bh2-order2": (SD_BETAS, 20),
    "bh1-sigma_min": ({**SD_BETAS, "solver_type": "bh1", "final_sigmas_type": "sigma_min"}, 10),
    "order3": ({**SD_BETAS, "solver_order": 3}, 20),
    "order3-bh1-sigma_min": (
        {**SD_BETAS, "solver_order": 3, "solver_type": "bh1", "final_sigmas_type": "sigma_min"},
        10,
    ),
    "order1": ({**SD_BETAS, "solver_order": 1}, 15),
    # order 1 never extrapolates, so it may keep order 1 up to sigma = 0
    "order1-no-lower_order_final": ({**SD_BETAS, "solver_order": 1, "lower_order_final": False}, 8),
    "noise-prediction-sigma_min": (
        {**SD_BETAS, "predict_x0": False, "final_sigmas_type": "sigma_min"},
        12,
    ),
    "noise-prediction-order3-vpred": (
        {
            **SD_BETAS,
            "predict_x0": False,
            "solver_order": 3,
            "prediction_type": "v_prediction",
            "final_sigmas_type": "sigma_min",
        },
        12,
    ),
    "trailing-vpred": (
        {**SD_BETAS, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
        20,
    ),
    "karras": ({**SD_BETAS, "use_karras_sigmas": True}, 25),
    "karras-few-steps": ({**SD_BETAS, "use_karras_sigmas": True}, 8),
    "karras-sigma_min": (
        {**SD_BETAS, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min"},
        10,
    ),
    "sigma_min-16-steps": ({**SD_BETAS, "final_sigmas_type": "sigma_min"}, 16),
    "leading-offset": ({**SD_BETAS, "timestep_spacing": "leading", "steps_offset": 1}, 30),
    "disable_corrector-0": ({**SD_BETAS, "disable_corrector": [0]}, 10),
    "disable_corrector-0-1-2-order3": (
        {**SD_BETAS, "solver_order": 3, "disable_corrector": [0, 1, 2]},
        10,
    ),
    "no-lower_order_final-few-steps": (
        {
            **SD_BETAS,
            "solver_order": 3,
            "lower_order_final": False,
            "final_sigmas_type": "sigma_min",
        },
        6,
    ),
    "zero-snr-trailing-vpred": (
        {
            **SD_BETAS,
            "rescale_betas_zero_snr": True,
            "timestep_spacing": "trailing",
            "prediction_type": "v_prediction",
        },
        15,
    ),
    "zero-snr-karras-vpred": (
        {
            **SD_BETAS,
            "rescale_betas_zero_snr": True,
            "use_karras_sigmas": True,
            "prediction_type": "v_prediction",
        },
        12,
    ),
    "cosine": ({"beta_schedule": "squaredcos_cap_v2"}, 10),
    "linear-betas": ({}, 10),
    "trained_betas": ({"trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()}, 5),
    "sample-prediction": ({**SD_BETAS, "prediction_type": "sample"}, 10),
    "noise-prediction-sample": (
        {
            **SD_BETAS,
            "predict_x0": False,
            "prediction_type": "sample",
            "final_sigmas_type": "sigma_min",
        },
        10,
    ),
    # flow-matching sigmas: SD3 (static shift 3) and the variants diffusers offers
    "flow-sd3": (FLOW_SD3, 20),
    "flow-sd3-few-steps": (FLOW_SD3, 4),
    # bh1 to sigma 0 is NaN in diffusers (see test_last_step_to_sigma_zero_...): sigma_min
    "flow-order3-bh1": (
        {**FLOW_SD3, "solver_order": 3, "solver_type": "bh1", "final_sigmas_type": "sigma_min"},
        12,
    ),
    "flow-sigma_min": ({**FLOW_SD3, "final_sigmas_type": "sigma_min"}, 10),
    "flow-shift_terminal": ({**FLOW_SD3, "shift_terminal": 0.1}, 10),
    "flow-shift-1": ({**FLOW_SD3, "flow_shift": 1.0}, 8),  # the first sigma nudged off 1
    # Karras over the VP range mapped into flow sigmas s / (1 + s), no shift
    "flow-karras": ({**FLOW_SD3, "use_karras_sigmas": True}, 12),
    "flow-karras-sigma_min-order3": (
        {
            **FLOW_SD3,
            "use_karras_sigmas": True,
            "final_sigmas_type": "sigma_min",
            "solver_order": 3,
        },
        8,
    ),
}


def _pair(config: dict):
    """diffusers' scheduler and ours from the same (complete) config."""
    ref = diffusers.UniPCMultistepScheduler.from_config(config)
    ours = UniPCMultistepScheduler(**{k: v for k, v in ref.config.items() if not k.startswith("_")})
    return ref, ours


@pytest.mark.parametrize("case", CASES)
def test_unipc_trajectory(case):
    config, steps = CASES[case]
    worst = _run(*_pair(config), steps, seed=9)
    assert worst < TOL


@pytest.mark.parametrize("kind", ["exponential", "linear"])
def test_flow_sigmas_given_and_shifted_by_mu(kind):
    """FLUX's pipeline call: its own sigmas np.linspace(1, 1/n, n) and mu; diffusers takes
    them only with flow sigmas, and dynamic shifting needs mu."""
    config = {
        "use_flow_sigmas": True,
        "prediction_type": "flow_prediction",
        "use_dynamic_shifting": True,
        "time_shift_type": kind,
        "solver_order": 3,
    }
    steps = 9
    worst = _run(*_pair(config), steps, seed=4, mu=1.1, sigmas=np.linspace(1, 1 / steps, steps))
    assert worst < TOL
    with pytest.raises(ValueError, match="mu must be passed"):
        UniPCMultistepScheduler(**config).set_timesteps(steps)


def test_solver_type_aliases_are_bh2():
    """diffusers rewrites DPM-Solver's solver types (midpoint/heun/logrho) to bh2."""
    ref, _ = _pair({**SD_BETAS, "solver_type": "midpoint"})
    assert ref.config.solver_type == "bh2"
    ours = UniPCMultistepScheduler(**SD_BETAS, solver_type="heun")
    assert ours.solver_type == "bh2"
    assert _run(ref, ours, 10, seed=10) < TOL


def test_from_other_schedulers_saved_config(tmp_path):
    """An SD1.5 PNDM scheduler_config.json (foreign keys: skip_prk_steps, set_alpha_to_one)
    as diffusers' UniPCMultistepScheduler.from_config(pipe.scheduler.config) reads it."""
    diffusers.PNDMScheduler.from_config(SD15).save_config(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["skip_prk_steps"] is True
    ref = diffusers.UniPCMultistepScheduler.from_config(saved)
    ours = UniPCMultistepScheduler(**{k: v for k, v in saved.items() if not k.startswith("_")})
    assert _run(ref, ours, 25, seed=11) < TOL


def test_zero_snr_noise_prediction_with_shared_sigmas():
    """predict_x0=False on zero-SNR: the first step (from sigma 4096) cancels ~140-fold, so
    torch's float32 sqrt, which rounds sqrt(2**24 - 1) to 4096.0 where the correctly rounded
    value (numpy's) is 4095.9998, alone moves the step by ~5e-5. Given diffusers' sigmas the
    steps agree; the schedules differ by that one ulp."""
    config = {
        **SD_BETAS,
        "rescale_betas_zero_snr": True,
        "timestep_spacing": "trailing",
        "prediction_type": "v_prediction",
        "predict_x0": False,
        "final_sigmas_type": "sigma_min",
    }
    ref, ours = _pair(config)
    set_timesteps = ours.set_timesteps

    def with_refs_sigmas(*args, **kwargs):
        set_timesteps(*args, **kwargs)
        np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=0)
        assert ours.sigmas[0] == np.float32(np.sqrt(2.0**24 - 1))  # correctly rounded
        ours.sigmas = ref.sigmas.numpy().copy()

    ours.set_timesteps = with_refs_sigmas
    assert _run(ref, ours, 15, seed=12) < TOL


def _run_to_last_step(config: dict, steps: int, seed: int):
    """Both schedulers over a trajectory, compared (as `_run`) on every step but the last;
    returns diffusers' scheduler and both last outputs."""
    ref, ours = _pair(config)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    rng = np.random.default_rng(seed)
    latent, noise = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    x_ref, x_ours = torch.from_numpy(latent), latent
    for i, t in enumerate(ref.timesteps):
        scale = float(x_ref.abs().max())
        x_ref = ref.step(0.5 * x_ref + torch.from_numpy(noise), t, x_ref).prev_sample
        x_ours = ours.step(np.float32(0.5) * x_ours + noise, i, x_ours)
        if i < steps - 1:
            scale = max(scale, float(x_ref.abs().max()))
            assert float(np.abs(x_ours - x_ref.numpy()).max()) / scale < TOL, i
    assert np.isfinite(x_ours).all()
    return ref, x_ours, x_ref.numpy()


def _agrees_where_finite(ours: np.ndarray, expected: np.ndarray, ref_last: np.ndarray) -> None:
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL * scale)
    if np.isfinite(ref_last).all():  # where diffusers is finite (or once it is fixed)
        np.testing.assert_allclose(ours, ref_last, rtol=0, atol=TOL * scale)


@pytest.mark.parametrize(
    "config",
    [
        {"solver_type": "bh1"},
        {"predict_x0": False},
        {"predict_x0": False, "solver_type": "bh1", "prediction_type": "v_prediction"},
        {"solver_type": "bh1", "use_karras_sigmas": True, "solver_order": 3},
        {"solver_type": "bh1", **FLOW_SD3},
        {},  # bh2 with predict_x0: diffusers is finite here, and must agree
    ],
    ids=[
        "bh1",
        "noise-prediction",
        "noise-prediction-bh1-vpred",
        "bh1-karras-order3",
        "flow-bh1",
        "bh2",
    ],
)
def test_last_step_to_sigma_zero_is_the_data_prediction(config):
    """The order-1 step to sigma = 0 returns x0: diffusers 0.42 gives NaN for bh1 (B(h) = -inf
    times a zero residual) and for predict_x0=False (sigma_t = 0 times e^h - 1 = inf)."""
    ref, ours_last, ref_last = _run_to_last_step({**SD_BETAS, **config}, 8, seed=13)
    assert float(ref.sigmas[-1]) == 0
    # the limit, from diffusers' own state at the last step: its (converted) model output
    # and the corrected sample the prediction starts from
    m0, start = ref.model_outputs[-1].numpy(), ref.last_sample.numpy()
    if ref.predict_x0:
        expected = m0
    else:  # x0 from epsilon: (x - sigma_t eps) / alpha_t in the VP parametrisation
        sigma = float(ref.sigmas[-2])
        alpha = 1 / (sigma**2 + 1) ** 0.5
        expected = (start - sigma * alpha * m0) / alpha
    _agrees_where_finite(ours_last, expected, ref_last)


@pytest.mark.parametrize("order", [2, 3])
def test_karras_sigma_min_last_step_is_identity(order):
    """Karras sigmas with final "sigma_min" repeat the last sigma, so the last step (h = 0)
    returns the corrected sample; diffusers' order-3 step gets NaN there (0/0)."""
    config = {
        **SD_BETAS,
        "use_karras_sigmas": True,
        "final_sigmas_type": "sigma_min",
        "lower_order_final": False,
        "solver_order": order,
    }
    ref, ours_last, ref_last = _run_to_last_step(config, 10, seed=16)
    assert ref.sigmas[-1] == ref.sigmas[-2]
    _agrees_where_finite(ours_last, ref.last_sample.numpy(), ref_last)


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"thresholding": True}, "thresholding"),
        ({"shift_terminal": 0.02}, "shift_terminal"),  # without flow sigmas
        ({"use_flow_sigmas": True, "use_exponential_sigmas": True}, "use_exponential_sigmas"),
        ({"use_flow_sigmas": True, "use_beta_sigmas": True}, "use_beta_sigmas"),
        ({"prediction_type": "flow_prediction", "predict_x0": False}, "flow_prediction"),
        ({"time_shift_type": "cubic"}, "time_shift_type"),
        ({"solver_p": diffusers.DPMSolverMultistepScheduler()}, "solver_p"),
        ({"prediction_type": "x0"}, "prediction_type"),
        ({"timestep_spacing": "karras"}, "timestep_spacing"),
        ({"solver_order": 4}, "solver_order"),
        ({"solver_type": "bh3"}, "solver_type"),
        ({"final_sigmas_type": "sigma_max"}, "final_sigmas_type"),
        ({"beta_schedule": "sqrt"}, "beta_schedule"),
        ({"lower_order_final": False}, "lower_order_final"),  # to sigma 0: diffusers -> inf
        ({"lower_order_final": False, "solver_order": 3}, "lower_order_final"),
    ],
)
def test_unsupported_values_raise(config, key):
    with pytest.raises(ValueError, match=key):
        UniPCMultistepScheduler(**config)


def test_misuse_raises():
    sched = UniPCMultistepScheduler(**SD_BETAS)
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
    sched.set_timesteps(5)
    assert len(sched.timesteps) == 5 and sched.timesteps.dtype == np.float32
    sched.step(x, 0, x)
    with pytest.raises(ValueError, match="history"):
        sched.step(x, 2, x)
    sched.step(x, 1, x)
    with pytest.raises(ValueError, match="history"):  # repeating a step
        sched.step(x, 1, x)
    with pytest.raises(IndexError):
        sched.step(x, 5, x)
    with pytest.raises(IndexError):  # numpy would silently wrap -1 to the last sigma
        sched.step(x, -1, x)


def _trajectory(sched: UniPCMultistepScheduler, start, noise, steps: int) -> np.ndarray:
    x = start
    for i in range(steps):
        x = sched.step(np.float32(0.5) * x + noise, i, x)
    return x


def test_history_restarts_at_step_zero():
    """Step 0 restarts the history: an abandoned run, then two whole ones on one instance
    without set_timesteps in between, equal a fresh instance's run exactly."""
    config = {**SD_BETAS, "solver_order": 3}
    rng = np.random.default_rng(14)
    start, noise = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    fresh = UniPCMultistepScheduler(**config)
    fresh.set_timesteps(8)
    expected = _trajectory(fresh, start, noise, 8)
    sched = UniPCMultistepScheduler(**config)
    sched.set_timesteps(8)
    _trajectory(sched, noise, start, 3)  # other inputs, abandoned after 3 steps
    for _ in range(2):
        np.testing.assert_array_equal(_trajectory(sched, start, noise, 8), expected)
    assert np.abs(expected - start).max() > 0.1  # the run did move the latent


def test_scale_model_input_is_identity_and_init_noise_sigma_one():
    sched = UniPCMultistepScheduler(**SD_BETAS)
    sched.set_timesteps(10)
    x = np.random.default_rng(15).standard_normal(SHAPE).astype(np.float32)
    assert sched.init_noise_sigma == 1.0 and sched.stochastic is False
    np.testing.assert_array_equal(sched.scale_model_input(x, 4), x)
    assert sched.scale_model_input(x.astype(np.float64), 4).dtype == np.float32


def test_imports_only_numpy_and_stdlib():
    """unipc.py is torch-free: numpy, the standard library and its sibling modules only."""
    tree = ast.parse(Path(unipc.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level in (0, 1), node.module  # "from ._common import ..." at most
            if node.level == 0:
                roots.add(node.module.split(".")[0])
    assert "numpy" in roots
    for root in roots:
        assert root == "numpy" or root in sys.stdlib_module_names, root
