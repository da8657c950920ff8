"""Exponential and Beta sigma schedules (`use_exponential_sigmas`, `use_beta_sigmas`)
against diffusers, over whole trajectories with the harness of test_schedulers.py, and the
scipy-free Beta quantiles behind them against scipy's."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
scipy_stats = pytest.importorskip("scipy.stats")
scipy_special = pytest.importorskip("scipy.special")

from slimdiff.runtime import schedulers  # noqa: E402
from slimdiff.runtime.schedulers._sigmas import beta_ppf, betainc, converted_sigmas  # noqa: E402

from slimdiff.models.kinds import calculate_shift  # noqa: E402
from tests.unit.test_schedulers import (  # noqa: E402
    FLUX_DEV,
    SD3,
    SD15,
    SD_BETAS,
    SDXL_EULER,
    _pair,
    _run,
)

CLASSES = (
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "LMSDiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
)
CONFIGS = {
    "exponential-sd15": ({**SD15, "use_exponential_sigmas": True}, 20),
    "beta-sdxl": ({**SDXL_EULER, "use_beta_sigmas": True}, 12),
    "beta-vpred-trailing": (
        {
            **SD_BETAS,
            "use_beta_sigmas": True,
            "prediction_type": "v_prediction",
            "timestep_spacing": "trailing",
        },
        8,
    ),
    "exponential-sigma-range": (
        {**SD_BETAS, "use_exponential_sigmas": True, "sigma_min": 0.05, "sigma_max": 10.0},
        10,
    ),
    # an Euler config's sigma range, carried over by from_config: every class honours it
    "karras-sigma-range": (
        {**SD_BETAS, "use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 8.0},
        9,
    ),
}


@pytest.mark.parametrize("cls_name", CLASSES)
@pytest.mark.parametrize("case", CONFIGS)
def test_trajectory(cls_name, case):
    config, steps = CONFIGS[case]
    ref, ours = _pair(cls_name, config)
    expected = next(k for k in ("karras", "exponential", "beta") if config.get(f"use_{k}_sigmas"))
    assert ours.sigma_schedule == expected
    _run(ref, ours, steps, seed=sum(map(ord, case + cls_name)))
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)


def test_schedules_span_the_range():
    """n sigmas from hi down to lo: exponential evenly in log sigma, Beta denser at ends."""
    exp = converted_sigmas("exponential", 0.03, 14.6, 7)
    assert exp[0] == pytest.approx(14.6) and exp[-1] == pytest.approx(0.03)
    np.testing.assert_allclose(np.diff(np.log(exp)), np.log(0.03 / 14.6) / 6, rtol=1e-12)
    beta = converted_sigmas("beta", 0.03, 14.6, 9)
    assert beta[0] == pytest.approx(14.6) and beta[-1] == pytest.approx(0.03)
    gaps = -np.diff(beta)
    assert np.all(gaps > 0) and gaps[4] > gaps[0] and gaps[4] > gaps[-1]
    karras = converted_sigmas("karras", 0.03, 14.6, 5)
    assert karras[0] == pytest.approx(14.6) and karras[-1] == pytest.approx(0.03)


@pytest.mark.parametrize(("a", "b"), [(0.6, 0.6), (2.0, 5.0), (0.3, 3.0), (10.0, 0.5)])
def test_beta_quantiles_match_scipy(a, b):
    xs = np.linspace(0.001, 0.999, 41)
    for x in xs:
        assert betainc(a, b, float(x)) == pytest.approx(scipy_special.betainc(a, b, x), abs=1e-13)
        assert beta_ppf(float(x), a, b) == pytest.approx(scipy_stats.beta.ppf(x, a, b), abs=1e-12)
    assert beta_ppf(0.0, a, b) == 0.0 and beta_ppf(1.0, a, b) == 1.0
    with pytest.raises(ValueError, match="outside"):
        beta_ppf(1.5, a, b)


@pytest.mark.parametrize("cls_name", CLASSES)
def test_one_schedule_at_most(cls_name):
    config = {"_class_name": cls_name, "use_karras_sigmas": True, "use_beta_sigmas": True}
    with pytest.raises(ValueError, match="use_karras_sigmas, use_beta_sigmas are all set"):
        schedulers.scheduler_from_config(config)


def test_switch_carries_the_schedule():
    """`run --scheduler` keeps the bundle's sigma schedule, as diffusers' from_config."""
    euler = {"_class_name": "EulerDiscreteScheduler", **SD_BETAS, "use_beta_sigmas": True}
    dpm = schedulers.scheduler_from_config(schedulers.switch_scheduler(euler, "dpm++2m"))
    assert dpm.sigma_schedule == "beta"
    # a "-karras" name replaces the bundle's schedule instead of clashing with it
    karras = schedulers.switch_scheduler(euler, "dpm++2m-karras")
    assert schedulers.scheduler_from_config(karras).sigma_schedule == "karras"
    assert "use_beta_sigmas" not in karras


FLOW_CASES = {  # config, steps, FLUX's image sequence length (None: SD3's static shift)
    "sd3-karras": ({**SD3, "use_karras_sigmas": True}, 12, None),
    "sd3-beta": ({**SD3, "use_beta_sigmas": True}, 10, None),
    "sd3-shift_terminal": ({**SD3, "shift_terminal": 0.05}, 10, None),
    "flux-exponential-shift_terminal": (
        {**FLUX_DEV, "use_exponential_sigmas": True, "shift_terminal": 0.1},
        8,
        1024,
    ),
    "flux-karras-sigma-range": (
        {**FLUX_DEV, "use_karras_sigmas": True, "sigma_min": 0.02, "sigma_max": 0.98},
        8,
        4096,
    ),
}


@pytest.mark.parametrize("case", FLOW_CASES)
def test_flow_match_trajectory(case):
    config, steps, seq_len = FLOW_CASES[case]
    ref, ours = _pair("FlowMatchEulerDiscreteScheduler", config)
    kwargs = {}
    if seq_len is not None:  # as the FLUX pipeline calls it
        kwargs = {
            "sigmas": np.linspace(1.0, 1 / steps, steps),
            "mu": calculate_shift(seq_len, 256, 4096, 0.5, 1.15),
        }
    _run(ref, ours, steps, seed=sum(map(ord, case)), **kwargs)
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    if config.get("shift_terminal") and not config.get("use_exponential_sigmas"):
        assert ours.sigmas[-2] == pytest.approx(config["shift_terminal"], rel=1e-5)


def test_flow_match_shift_terminal_range():
    with pytest.raises(ValueError, match="shift_terminal must be in"):
        schedulers.FlowMatchEulerDiscreteScheduler(shift_terminal=1.0)


@pytest.mark.parametrize(
    "cls_name",
    [
        "EulerDiscreteScheduler",
        "DDIMScheduler",
        "DPMSolverMultistepScheduler",
        "UniPCMultistepScheduler",
        "DEISMultistepScheduler",
        "PNDMScheduler",
        "DDPMScheduler",
    ],
)
def test_trailing_step_counts_keep_n_points(cls_name):
    """diffusers schedules n + 1 trailing timesteps, the last -1, for 62 step counts
    (61, 103, ...): a negative index into the noisiest alpha-bar. The port keeps n, equal
    to diffusers' first n."""
    config = {**SD_BETAS, "timestep_spacing": "trailing", "skip_prk_steps": True}
    ref, ours = _pair(cls_name, config)
    ref.set_timesteps(61)
    ours.set_timesteps(61)
    theirs = ref.timesteps.numpy().astype(np.float32)
    extra = 1 if cls_name == "PNDMScheduler" else 0  # PLMS repeats its first timestep
    assert len(ours.timesteps) == 61 + extra and ours.timesteps.min() >= 0
    assert len(theirs) == 62 + extra and theirs.min() == -1
    np.testing.assert_allclose(ours.timesteps, theirs[: 61 + extra], rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize(("shift", "steps"), [(3.0, 10), (1.0, 6), (3.0, 1)])
def test_flow_match_heun_trajectory(shift, steps):
    """SD3's flow-match Heun: 2n - 1 calls, the second halves interleaved."""
    config = {**SD3, "shift": shift}
    ref, ours = _pair("FlowMatchHeunDiscreteScheduler", config)
    _run(ref, ours, steps, seed=int(shift * 10) + steps)
    assert len(ours.timesteps) == 2 * steps - 1
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)


def test_flow_match_heun_cannot_sample_flux():
    """FLUX's pipeline passes sigmas and mu, which diffusers' flow-match Heun does not take:
    refused as diffusers refuses it, naming what is missing."""
    switched = schedulers.switch_scheduler(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", **FLUX_DEV}, "flow-heun"
    )
    heun = schedulers.scheduler_from_config(switched)  # FLUX's keys are ignored, as there
    with pytest.raises(ValueError, match="does not take `mu`"):
        heun.set_timesteps(4, mu=0.8)
    with pytest.raises(ValueError, match="euler-a cannot replace"):
        schedulers.switch_scheduler(switched, "euler-a")
