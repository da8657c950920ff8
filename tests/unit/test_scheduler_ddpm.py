"""The numpy DDPMScheduler against diffusers' own, over whole trajectories.

Same harness and tolerance as tests/unit/test_schedulers.py (`_run`: a denoiser that
depends on its input, every intermediate sample within 1e-5 of the latent's magnitude);
DDPM is stochastic, so both sides get the same fresh noise (diffusers' through its module's
randn_tensor, which it calls only for steps from t > 0). Where the port departs from
diffusers on purpose its own tests check it: "fixed_large_log", NaN in diffusers (the
port: the fixed_large trajectory), and "trailing" step counts for which diffusers
schedules a timestep -1 (the port drops it).
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from slimdiff.runtime.schedulers.ddpm import DDPMScheduler  # noqa: E402

from tests.unit.test_schedulers import SD15, SD_BETAS, SDXL_EULER, SHAPE, TOL, _run  # noqa: E402

SD = {**SD_BETAS, "clip_sample": False}
CASES = {
    # leading + steps_offset 1: the last step is from t = 1 and adds noise
    "sd15-leading": (SD15, 30),
    "sdxl-leading": (SDXL_EULER, 25),
    # Ho et al.'s setup (linear betas, x0 clipped to [-1, 1]): the last step is from t = 0
    "defaults-clip": ({}, 20),
    "defaults-200-steps": ({}, 200),  # 1000: test_1000_steps_drift_like_diffusers_float32
    "many-steps-sd": (SD15, 250),
    "one-step": (SD15, 1),
    "trailing-vpred": (
        {**SD, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
        20,
    ),
    "linspace-fixed_large": (
        {**SD, "timestep_spacing": "linspace", "variance_type": "fixed_large"},
        20,
    ),
    "fixed_small_log": ({**SD15, "variance_type": "fixed_small_log"}, 20),
    "sample-pred-clip-range": (
        {**SD_BETAS, "prediction_type": "sample", "clip_sample_range": 1.5},
        10,
    ),
    "vpred-clip-range": (
        {**SD_BETAS, "prediction_type": "v_prediction", "clip_sample_range": 2.0},
        12,
    ),
    "zero-snr-trailing-vpred": (
        {
            **SD,
            "rescale_betas_zero_snr": True,
            "timestep_spacing": "trailing",
            "prediction_type": "v_prediction",
        },
        20,
    ),
    "zero-snr-leading-fixed_large": (
        {
            **SD15,
            "rescale_betas_zero_snr": True,
            "prediction_type": "v_prediction",
            "variance_type": "fixed_large",
        },
        15,
    ),
    "cosine": ({"beta_schedule": "squaredcos_cap_v2"}, 10),
    "trained_betas": ({"trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()}, 6),
}


def _pair(config: dict):
    """diffusers' scheduler and ours from the same (complete) config."""
    ref = diffusers.DDPMScheduler.from_config(config)
    ours = DDPMScheduler(**{k: v for k, v in ref.config.items() if not k.startswith("_")})
    return ref, ours


@pytest.mark.parametrize("case", CASES)
def test_ddpm_trajectory(case):
    config, steps = CASES[case]
    ref, ours = _pair(config)
    assert ours.stochastic
    assert _run(ref, ours, steps, seed=sum(map(ord, case))) < TOL
    assert len(ours.timesteps) == steps


def _diffusers_path(dtype, latent, eps, fresh) -> list[np.ndarray]:
    """diffusers' DDPM defaults over len(fresh) steps, its latents and alpha-bars in dtype."""
    ref = diffusers.DDPMScheduler()
    ref.set_timesteps(len(fresh))
    ref.alphas_cumprod, ref.one = ref.alphas_cumprod.to(dtype), ref.one.to(dtype)
    x, e = torch.from_numpy(latent).to(dtype), torch.from_numpy(eps).to(dtype)
    draws = iter(torch.from_numpy(fresh).to(dtype))  # drawn only from t > 0: all but the last
    path = []
    with mock.patch(f"{type(ref).__module__}.randn_tensor", lambda *a, **k: next(draws)):
        for t in ref.timesteps:
            x = ref.step(0.5 * x + e, t, x).prev_sample
            path.append(x.double().numpy())
    return path


def test_1000_steps_drift_like_diffusers_float32():
    """Ho et al.'s 1000 steps: float32 rounding random-walks through them (the fake
    denoiser does not contract as a real one does), to ~1e-5 of the latent near the end,
    past TOL for some seeds. diffusers' own float32 trajectory is several times further from
    the same steps in float64 than ours is from it."""
    steps = 1000
    rng = np.random.default_rng(35)
    latent, eps = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    fresh = rng.standard_normal((steps, *SHAPE)).astype(np.float32)
    ours = DDPMScheduler()
    ours.set_timesteps(steps)
    x, path = latent, []
    for i in range(steps):
        x = ours.step(np.float32(0.5) * x + eps, i, x, noise=fresh[i])
        path.append(x)
    ref32, ref64 = (_diffusers_path(d, latent, eps, fresh) for d in (torch.float32, torch.float64))

    def worst(a, b):
        return max(float(np.abs(u - v).max() / np.abs(v).max()) for u, v in zip(a, b, strict=True))

    assert worst(path, ref32) < 2 * TOL
    assert worst(ref32, ref64) > 3 * worst(path, ref32)


def test_fixed_large_log_is_fixed_large():
    """diffusers' step takes sqrt(log(beta)) for "fixed_large_log": NaN. Ours uses the
    standard deviation exp(log(beta) / 2), so its trajectory is diffusers' "fixed_large"."""
    config = {**SD15, "variance_type": "fixed_large_log"}
    ref, _ = _pair(config)
    ref.set_timesteps(10)
    x = torch.zeros(SHAPE)
    assert torch.isnan(ref.step(x, ref.timesteps[0], x).prev_sample).all()
    ref, _ = _pair({**config, "variance_type": "fixed_large"})
    ours = DDPMScheduler(**config)
    assert _run(ref, ours, 15, seed=31) < TOL


@pytest.mark.parametrize("steps", [61, 103])
def test_trailing_drops_the_spurious_timestep(steps):
    """np.arange(1000, 0, -1000 / n) keeps a 1e-13 for these n: diffusers schedules n + 1
    timesteps, the last -1. Ours has the n others, and its steps are diffusers' first n
    (diffusers' n-th step already goes to alpha-bar 1, as ours)."""
    ref, ours = _pair({**SD, "timestep_spacing": "trailing"})
    set_timesteps = ref.set_timesteps

    def without_last(*args, **kwargs):
        set_timesteps(*args, **kwargs)
        assert len(ref.timesteps) == steps + 1 and int(ref.timesteps[-1]) == -1
        ref.timesteps = ref.timesteps[:-1]

    ref.set_timesteps = without_last
    assert _run(ref, ours, steps, seed=32) < TOL
    assert len(ours.timesteps) == steps and ours.timesteps[-1] >= 0


def test_noise_at_the_last_step():
    """A step from t = 0 adds no noise (noise may be omitted); from t = 1 it does."""
    x = np.random.default_rng(33).standard_normal(SHAPE).astype(np.float32)
    sched = DDPMScheduler()  # leading, offset 0: the last timestep is 0
    sched.set_timesteps(10)
    assert sched.timesteps[-1] == 0
    np.testing.assert_array_equal(sched.step(x, 9, x), sched.step(x, 9, x, noise=x))
    sched = DDPMScheduler(**SD15, variance_type="fixed_large")  # offset 1: last is 1
    sched.set_timesteps(10)
    assert sched.timesteps[-1] == 1
    with pytest.raises(ValueError, match="noise"):
        sched.step(x, 9, x)
    zero = np.zeros(SHAPE, np.float32)
    assert np.abs(sched.step(x, 9, x, noise=x) - sched.step(x, 9, x, noise=zero)).max() > 0.01


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"variance_type": "learned"}, "variance_type"),
        ({"variance_type": "learned_range"}, "variance_type"),
        ({"thresholding": True}, "thresholding"),
        ({"beta_schedule": "sigmoid"}, "beta_schedule"),
        ({"beta_schedule": "laplace"}, "beta_schedule"),
        ({"prediction_type": "flow_prediction"}, "prediction_type"),
        ({"timestep_spacing": "karras"}, "timestep_spacing"),
    ],
)
def test_unsupported_values_raise(config, key):
    with pytest.raises(ValueError, match=key):
        DDPMScheduler(**config)


def test_misuse_raises():
    sched = DDPMScheduler(**SD15)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(x, 0, x, noise=x)
    with pytest.raises(ValueError, match="sigmas"):
        sched.set_timesteps(10, sigmas=np.ones(10))
    with pytest.raises(ValueError, match="mu"):
        sched.set_timesteps(10, mu=0.5)
    for n in (None, 0, 1001):
        with pytest.raises(ValueError, match="num_inference_steps"):
            sched.set_timesteps(n)
    with pytest.raises(ValueError, match="steps_offset"):  # timestep 1000: IndexError there
        sched.set_timesteps(1000)
    sched.set_timesteps(5)
    assert len(sched.timesteps) == 5 and sched.timesteps.dtype == np.float32
    with pytest.raises(ValueError, match="noise"):
        sched.step(x, 0, x)
    with pytest.raises(ValueError, match="noise"):
        sched.step(x, 0, x, noise=np.zeros((1, 4, 4, 4), np.float32))
    with pytest.raises(IndexError):
        sched.step(x, 5, x, noise=x)
    with pytest.raises(IndexError):  # numpy would silently wrap -1 to the last timestep
        sched.step(x, -1, x, noise=x)
    sched.step(x, 3, x, noise=x)  # no history: any step, in any order
    sched.step(x, 1, x, noise=x)


def test_scale_model_input_is_identity_and_init_noise_sigma_one():
    sched = DDPMScheduler(**SD15)
    sched.set_timesteps(10)
    x = np.random.default_rng(34).standard_normal(SHAPE).astype(np.float32)
    assert sched.init_noise_sigma == 1.0
    np.testing.assert_array_equal(sched.scale_model_input(x, 4), x)
    assert sched.scale_model_input(x.astype(np.float64), 4).dtype == np.float32
