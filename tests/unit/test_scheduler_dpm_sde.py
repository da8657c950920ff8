"""The numpy DPMSolverSDEScheduler ("DPM++ SDE") against diffusers', whole trajectories.

diffusers draws both halves of a step from one torchsde Brownian tree: the first half's
noise is W's increment over [s, sigma], the second's over [sigma', sigma], which contains
it. Here diffusers' noise sampler is replaced by one that builds exactly those increments
from independent standard-normal draws (z1 over [s, sigma], z2 over [sigma', s]), and the
port gets the same draws as `noise=`, one per call that takes noise; every step must agree
within the harness's 1e-5 of the latent magnitude (tests/unit/test_schedulers.py).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchsde")  # diffusers' DPMSolverSDEScheduler needs it
diffusers = pytest.importorskip("diffusers")

from slimdiff.runtime import schedulers  # noqa: E402

from tests.unit.test_schedulers import SD15, SD_BETAS, SDXL_EULER, SHAPE, TOL, _pair  # noqa: E402

CASES = {
    "sd15-leading": (SD15, 12),
    "sdxl-leading": (SDXL_EULER, 8),
    "karras": ({**SD_BETAS, "use_karras_sigmas": True}, 10),
    "karras-few": ({**SD_BETAS, "use_karras_sigmas": True}, 3),
    "linspace-vpred": ({**SD_BETAS, "prediction_type": "v_prediction"}, 8),
    "trailing": ({**SD_BETAS, "timestep_spacing": "trailing"}, 6),
    "exponential": ({**SD_BETAS, "use_exponential_sigmas": True}, 7),
    "beta": ({**SD_BETAS, "use_beta_sigmas": True, "sigma_min": 0.05}, 7),
    "class-defaults": ({}, 5),
    "one-step": (SD_BETAS, 1),
}


class BrownianFromDraws:
    """diffusers' noise_sampler(sigma, sigma_next), from the draws the port gets."""

    def __init__(self, draws: list[np.ndarray]):
        self.draws, self.first = draws, None

    def __call__(self, sigma, sigma_next):
        hi, lo = float(sigma), float(sigma_next)
        if self.first is None:  # first half: the increment over [s, sigma]
            self.first = (hi, lo, self.draws[-1])
            return torch.from_numpy(self.draws[-1])
        top, s, z1 = self.first
        self.first = None
        assert top == pytest.approx(hi, rel=1e-6)  # one step's two halves
        z = (np.sqrt(hi - s) * z1 + np.sqrt(s - lo) * self.draws[-1]) / np.sqrt(hi - lo)
        return torch.from_numpy(z.astype(np.float32))


def _trajectory(config, steps: int, seed: int) -> float:
    ref, ours = _pair("DPMSolverSDEScheduler", config)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-6, atol=1e-4)
    assert len(ours.timesteps) == 2 * steps - 1
    rng = np.random.default_rng(seed)
    latent, fake_eps = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    x_ref = torch.from_numpy(latent) * ref.init_noise_sigma
    x_ours = latent * np.float32(ours.init_noise_sigma)
    draws: list[np.ndarray] = []
    ref.noise_sampler = BrownianFromDraws(draws)
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        in_ref = ref.scale_model_input(x_ref, t)
        in_ours = ours.scale_model_input(x_ours, i)
        np.testing.assert_allclose(
            ours.scale_model_input(x_ref.numpy(), i), in_ref.numpy(), rtol=1e-6, atol=1e-6
        )
        extra = {}
        if schedulers.takes_noise(ours, i):
            draws.append(rng.standard_normal(SHAPE).astype(np.float32))
            extra["noise"] = draws[-1]
        x_ours = ours.step(np.float32(0.5) * in_ours + fake_eps, i, x_ours, **extra)
        x_ref = ref.step(0.5 * in_ref + torch.from_numpy(fake_eps), t, x_ref).prev_sample
        ref_np = x_ref.numpy()
        scale = max(float(np.abs(ref_np).max()), float(np.abs(in_ref.numpy()).max()))
        err = float(np.abs(x_ours - ref_np).max()) / scale
        assert err < TOL, f"call {i}: relative error {err:.3g}"
        worst = max(worst, err)
    # noise on every call but the last step's (Euler to sigma = 0)
    assert len(draws) == 2 * steps - 2
    return worst


@pytest.mark.parametrize("case", CASES)
def test_trajectory(case):
    config, steps = CASES[case]
    _trajectory(config, steps, seed=sum(map(ord, case)))


def test_second_half_noise_is_the_brownian_increment():
    """Given z1 and z2, the second half's noise has unit variance and correlation
    sqrt((sigma - s) / (sigma - sigma')) with the first's: what the tree's increments give."""
    sched = schedulers.DPMSolverSDEScheduler(**SD_BETAS)
    sched.set_timesteps(4)
    rng = np.random.default_rng(0)
    n = 200_000
    x, eps = np.zeros((n,), np.float32), np.zeros((n,), np.float32)
    z1, z2 = rng.standard_normal(n), rng.standard_normal(n)
    first = sched.step(eps, 0, x, noise=z1.astype(np.float32))
    sigma, sigma_next = map(float, sched.sigmas[:2])
    s = float(sched._midpoint(*sched.sigmas[:2]))
    # an output whose x0 is 0 at the midpoint: with the start at 0 too, what each half
    # returns is its noise times its sigma_up
    second = sched.step(first / np.float32(s), 1, first, noise=z2.astype(np.float32))
    noise1 = first / first.std()
    noise2 = second / second.std()
    assert np.corrcoef(noise1, noise2)[0, 1] == pytest.approx(
        np.sqrt((sigma - s) / (sigma - sigma_next)), abs=0.01
    )


def test_misuse():
    sched = schedulers.DPMSolverSDEScheduler(**SD_BETAS)
    sched.set_timesteps(3)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match="noise"):
        sched.step(x, 0, x)
    with pytest.raises(ValueError, match="needs call 0 just before"):
        sched.step(x, 1, x, noise=x)
    assert sched.step(x, 4, x).shape == SHAPE  # the last call: Euler, no noise
    with pytest.raises(ValueError, match="prediction_type"):
        schedulers.DPMSolverSDEScheduler(prediction_type="sample")
    with pytest.raises(ValueError, match="mu"):
        sched.set_timesteps(3, mu=0.5)
    assert [schedulers.takes_noise(sched, i) for i in range(5)] == [True] * 4 + [False]
