"""The numpy DEISMultistepScheduler against diffusers' own, over whole trajectories.

Same harness and tolerance as tests/unit/test_schedulers.py (`_run`: a denoiser that
depends on its input, every intermediate sample within 1e-5 of the latent's magnitude).

DEIS's float32 coefficients are ill-conditioned: each is the difference of two values of
the Lagrange antiderivative (diffusers' ind_fn), which grow like (steps)^(order - 1) while
their difference stays O(1), so diffusers' own float32 result departs from its float64
evaluation by ~1e-5 of the latent at order 3 and 10-25 steps, 1e-4 to 1e-3 at 50-100
(order 2: ~1e-5 at 100 steps), measured with this harness's denoiser. The port evaluates the
same expressions, but torch's float32 sqrt on this CPU is not correctly rounded (<= 0.75
ulp), so the sigma tables differ by an ulp or two and the noise differs: those cases are
checked given diffusers' sigma table (`SHARED_CASES`, after checking the two tables agree
to 1e-6), and the closed forms against a float64 quadrature of the Lagrange basis.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from slimdiff.runtime.schedulers import deis  # noqa: E402
from slimdiff.runtime.schedulers.deis import DEISMultistepScheduler  # noqa: E402

from tests.unit.test_schedulers import SD15, SD_BETAS, SDXL_EULER, SHAPE, TOL, _run  # noqa: E402

VPRED = {"prediction_type": "v_prediction"}
CASES = {  # our own schedule: orders 1-2 to 30 steps, order 3 to 10
    "sd15-leading-offset": (SD15, 30),
    "sdxl-leading": (SDXL_EULER, 25),
    "linspace": (SD_BETAS, 20),
    "trailing-vpred": ({**SD_BETAS, **VPRED, "timestep_spacing": "trailing"}, 20),
    "leading-vpred": ({**SD_BETAS, **VPRED, "timestep_spacing": "leading"}, 14),
    "karras": ({**SD_BETAS, "use_karras_sigmas": True}, 25),
    "karras-few-steps-vpred": ({**SD_BETAS, **VPRED, "use_karras_sigmas": True}, 8),
    # sigma_min / sigma_max are Euler's keys: diffusers' Karras conversion reads them
    "karras-sigma-bounds": (
        {**SD_BETAS, "use_karras_sigmas": True, "sigma_min": 0.05, "sigma_max": 10.0},
        10,
    ),
    "sample-prediction": ({**SD_BETAS, "prediction_type": "sample"}, 12),
    "order1": ({**SD_BETAS, "solver_order": 1}, 20),
    "order1-trailing-vpred": (
        {**SD_BETAS, **VPRED, "solver_order": 1, "timestep_spacing": "trailing"},
        12,
    ),
    # lower_order_final acts below 15 steps only: 14 ends at order 1, 15 at order 2
    "14-steps": (SD_BETAS, 14),
    "15-steps": (SD_BETAS, 15),
    "no-lower_order_final": ({**SD_BETAS, "lower_order_final": False}, 10),
    "order3-few-steps": ({**SD_BETAS, "solver_order": 3}, 8),
    "order3-trailing-vpred": (
        {**SD_BETAS, **VPRED, "solver_order": 3, "timestep_spacing": "trailing"},
        6,
    ),
    "order3-one-step": ({**SD_BETAS, "solver_order": 3}, 1),
    "order3-two-steps": ({**SD_BETAS, "solver_order": 3, "lower_order_final": False}, 2),
    "cosine": ({"beta_schedule": "squaredcos_cap_v2"}, 10),
    "linear-betas": ({}, 10),
    "trained_betas": ({"trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()}, 5),
}
ORDER3 = {**SD_BETAS, "solver_order": 3}
SHARED_CASES = {  # given diffusers' sigma table (module docstring)
    "order3-linspace": (ORDER3, 25),
    "order3-leading-offset": ({**ORDER3, "timestep_spacing": "leading", "steps_offset": 1}, 30),
    "order3-trailing-vpred": ({**ORDER3, **VPRED, "timestep_spacing": "trailing"}, 20),
    "order3-15-steps-vpred": ({**ORDER3, **VPRED}, 15),
    "order3-no-lower_order_final": ({**ORDER3, "lower_order_final": False}, 12),
    "order3-karras-vpred": ({**ORDER3, **VPRED, "use_karras_sigmas": True}, 50),
    "order3-linspace-100": (ORDER3, 100),
    "order2-trailing-vpred-100": ({**SD_BETAS, **VPRED, "timestep_spacing": "trailing"}, 100),
}


def _pair(config: dict):
    """diffusers' scheduler and ours from the same (complete) config."""
    ref = diffusers.DEISMultistepScheduler.from_config(config)
    ours = DEISMultistepScheduler(**{k: v for k, v in ref.config.items() if not k.startswith("_")})
    return ref, ours


@pytest.mark.parametrize("case", CASES)
def test_deis_trajectory(case):
    config, steps = CASES[case]
    assert _run(*_pair(config), steps, seed=21) < TOL


@pytest.mark.parametrize("case", SHARED_CASES)
def test_deis_trajectory_given_diffusers_sigmas(case):
    config, steps = SHARED_CASES[case]
    ref, ours = _pair(config)
    set_timesteps = ours.set_timesteps

    def with_refs_sigmas(*args, **kwargs):
        set_timesteps(*args, **kwargs)
        np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=0)
        ours.sigmas = ref.sigmas.numpy().copy()

    ours.set_timesteps = with_refs_sigmas
    assert _run(ref, ours, steps, seed=22) < TOL


def test_dpm_solver_names_are_deis():
    """diffusers rewrites DPM-Solver's algorithm and solver types to deis / logrho."""
    config = {**SD_BETAS, "algorithm_type": "dpmsolver++", "solver_type": "midpoint"}
    ref, _ = _pair(config)
    assert (ref.config.algorithm_type, ref.config.solver_type) == ("deis", "logrho")
    ours = DEISMultistepScheduler(**config)  # the raw names, as a copied config has them
    assert _run(ref, ours, 12, seed=23) < TOL


def test_foreign_keys_are_ignored_like_diffusers(tmp_path):
    """DEIS has no rescale_betas_zero_snr, final_sigmas_type or lambda_min_clipped: from a
    DPM-Solver config carrying them diffusers builds its plain schedule, and so do we."""
    saved = {
        **SD_BETAS,
        **VPRED,
        "timestep_spacing": "trailing",
        "rescale_betas_zero_snr": True,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -5.1,
        "euler_at_final": True,
    }
    diffusers.DPMSolverMultistepScheduler.from_config(saved).save_config(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    ref = diffusers.DEISMultistepScheduler.from_config(saved)
    ours = DEISMultistepScheduler(**{k: v for k, v in saved.items() if not k.startswith("_")})
    assert ours.sigmas[-1] < 15  # not the zero-SNR table's 4096
    assert _run(ref, ours, 12, seed=24) < TOL


def _lagrange_integral(k: int, rho_t: float, rhos: list[float]) -> float:
    """float64 Gauss-Legendre quadrature of basis polynomial k (in log rho) over rho."""
    nodes, weights = np.polynomial.legendre.leggauss(20)
    a, b = rhos[0], rho_t
    rho = (b - a) / 2 * nodes + (b + a) / 2
    basis = np.ones_like(rho)
    for j, r in enumerate(rhos):
        if j != k:
            basis *= (np.log(rho) - np.log(r)) / (np.log(rhos[k]) - np.log(r))
    return float((b - a) / 2 * np.sum(weights * basis))


@pytest.mark.parametrize("rhos", [[3.0, 3.5, 4.2], [0.02, 0.05, 0.09], [14.6, 20.0, 31.0]])
def test_coefficients_are_lagrange_integrals(rhos):
    """The closed forms (diffusers' ind_fn) integrate DEIS's log-rho Lagrange basis."""
    rho_t = rhos[0] * 0.7
    rhos64 = [np.float64(r) for r in rhos]
    for k in range(2):
        others = rhos64[k + 1 : 2] + rhos64[:k]
        coef = deis._ind2(rho_t, rhos64[k], *others) - deis._ind2(rhos64[0], rhos64[k], *others)
        assert coef == pytest.approx(_lagrange_integral(k, rho_t, rhos[:2]), rel=1e-9)
    for k in range(3):
        others = rhos64[k + 1 :] + rhos64[:k]
        coef = deis._ind3(rho_t, rhos64[k], *others) - deis._ind3(rhos64[0], rhos64[k], *others)
        assert coef == pytest.approx(_lagrange_integral(k, rho_t, rhos), rel=1e-9)


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"thresholding": True}, "thresholding"),
        ({"use_flow_sigmas": True, "prediction_type": "flow_prediction"}, "use_flow_sigmas"),
        ({"use_dynamic_shifting": True}, "use_dynamic_shifting"),
        ({"prediction_type": "flow_prediction"}, "prediction_type"),
        ({"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
        ({"solver_type": "bh3"}, "solver_type"),
        ({"solver_order": 4}, "solver_order"),
        ({"timestep_spacing": "karras"}, "timestep_spacing"),
        ({"beta_schedule": "sqrt"}, "beta_schedule"),
    ],
)
def test_unsupported_values_raise(config, key):
    with pytest.raises(ValueError, match=key):
        DEISMultistepScheduler(**config)


def test_misuse_raises():
    sched = DEISMultistepScheduler(**SD_BETAS)
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


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing", "karras"])
@pytest.mark.parametrize("steps", [1, 7, 30, 1000])
def test_timesteps_length_and_dtype(spacing, steps):
    karras = spacing == "karras"
    config = {**SD15, "timestep_spacing": "linspace" if karras else spacing}
    ref, ours = _pair({**config, "use_karras_sigmas": karras})
    ref.set_timesteps(steps)
    if steps == 1000 and spacing in ("linspace", "leading"):
        # timesteps repeat at 1000 there: two equal sigmas, a step by zero (NaN in diffusers)
        assert len(set(ref.timesteps.tolist())) < steps
        with pytest.raises(ValueError, match=r"a step of size 0.*where diffusers fails"):
            ours.set_timesteps(steps)
        return
    ours.set_timesteps(steps)
    assert len(ours.timesteps) == steps == ours.num_inference_steps
    assert ours.timesteps.dtype == np.float32 and ours.sigmas.dtype == np.float32
    assert len(ours.sigmas) == steps + 1
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy().astype(np.float32))


def _trajectory(sched: DEISMultistepScheduler, start, noise, steps: int) -> np.ndarray:
    x = start
    for i in range(steps):
        x = sched.step(np.float32(0.5) * x + noise, i, x)
    return x


def test_history_restarts_at_step_zero():
    """Step 0 restarts the history: an abandoned run, then two whole ones on one instance
    without set_timesteps in between, equal a fresh instance's run exactly."""
    rng = np.random.default_rng(25)
    start, noise = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    fresh = DEISMultistepScheduler(**ORDER3)
    fresh.set_timesteps(8)
    expected = _trajectory(fresh, start, noise, 8)
    sched = DEISMultistepScheduler(**ORDER3)
    sched.set_timesteps(8)
    _trajectory(sched, noise, start, 3)  # other inputs, abandoned after 3 steps
    for _ in range(2):
        np.testing.assert_array_equal(_trajectory(sched, start, noise, 8), expected)
    assert np.abs(expected - start).max() > 0.1  # the run did move the latent


def test_scale_model_input_is_identity_and_init_noise_sigma_one():
    sched = DEISMultistepScheduler(**SD_BETAS)
    sched.set_timesteps(10)
    x = np.random.default_rng(26).standard_normal(SHAPE).astype(np.float32)
    assert sched.init_noise_sigma == 1.0 and sched.stochastic is False
    np.testing.assert_array_equal(sched.scale_model_input(x, 4), x)
    assert sched.scale_model_input(x.astype(np.float64), 4).dtype == np.float32
