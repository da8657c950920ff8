"""DPMSolverSDEScheduler ("DPM++ SDE"): the stochastic DPM-Solver++ of k-diffusion.

Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models" (2022, arXiv:2211.01095), as k-diffusion's `sample_dpmpp_sde` with r = 1/2 and
diffusers' DPMSolverSDEScheduler (scheduling_dpmsolver_sde.py) run it: each step from
sigma to sigma' first goes, ancestrally, to the midpoint s = sqrt(sigma sigma') in
log-sigma (a second denoiser call there), then redoes the whole step from sigma with the
midpoint's x0; both halves add noise, the last step (to sigma = 0) is plain Euler. Like
Heun, its schedule interleaves the midpoints' timesteps: [t0, t_mid0, t1, ..., t_(n-1)],
2n - 1 calls for n steps, so the runtime's loop runs it unchanged.

The noise is Brownian: diffusers draws each half's from one torchsde Brownian tree over
sigma, as the increment of W over [s, sigma] for the first half and over [sigma', sigma]
for the second, which *contains* the first; the two are correlated. Here every call takes
fresh standard-normal `noise` (the runtime's seeded draws), and the second half rebuilds
the increment over [sigma', sigma] from the first half's part and an independent part over
[sigma', s]: z = (sqrt(sigma - s) z1 + sqrt(s - sigma') z2) / sqrt(sigma - sigma'), the
same joint distribution as the tree's without torchsde. The images differ from diffusers'
for the same seed, as with every stochastic sampler here; given diffusers' noise they agree
(tests/unit/test_scheduler_dpm_sde.py). Scalars are float32 like diffusers' 0-d tensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._common import (
    F32,
    ONE,
    SigmaNoise,
    alphas_cumprod_f32,
    as_f32,
    check_noise,
    check_second_half,
    check_step,
    check_steppable,
    check_steps,
    choice,
    reject_args,
    sigma_to_t,
    spaced_timesteps,
)
from ._sigmas import converted_sigmas, sigma_schedule


def second_half_noise(z1: np.ndarray, z2: np.ndarray, hi: float, s: float, lo: float):
    """The second half-step's normalized noise, W's increment over [lo, hi], from the first
    half's `z1` (over [s, hi]) and an independent `z2` (over [lo, s]): W over [lo, hi] = W
    over [s, hi] + W over [lo, s]. bench's torch reference builds diffusers' Brownian
    increments with it too (slimdiff/app/reference_noise.py)."""
    return (np.sqrt(hi - s) * z1 + np.sqrt(s - lo) * z2) / np.sqrt(hi - lo)


class DPMSolverSDEScheduler(SigmaNoise):
    """diffusers.DPMSolverSDEScheduler ("DPM++ SDE", with Karras sigmas "DPM++ SDE Karras")."""

    order = 2
    stochastic = True

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,  # diffusers' defaults for this class
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        **config: Any,  # noise_sampler_seed: the runtime's seed draws the noise
    ) -> None:
        name = type(self).__name__
        self.prediction_type = choice(
            name, "prediction_type", prediction_type, ("epsilon", "v_prediction")
        )
        self.timestep_spacing = choice(
            name, "timestep_spacing", timestep_spacing, ("linspace", "leading", "trailing")
        )
        self.sigma_schedule = sigma_schedule(
            name, use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas
        )
        # diffusers' Karras conversion reads the ends of the interpolated schedule; its
        # exponential and Beta ones a sigma_min/max that a converted config carries
        carried = self.sigma_schedule in ("exponential", "beta")
        self._bounds = (
            (config.get("sigma_min"), config.get("sigma_max")) if carried else (None,) * 2
        )
        self.num_train_timesteps, self.steps_offset = num_train_timesteps, steps_offset
        ac = alphas_cumprod_f32(
            name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, False
        )
        self._train_sigmas = np.sqrt((ONE - ac) / ac)
        # diffusers' table before set_timesteps, unchecked (never stepped through)
        self._set_schedule(num_train_timesteps)
        self._scheduled = False  # img2img needs the run's own schedule

    @property
    def init_noise_sigma(self) -> float:
        top = self.sigmas.max()
        if self.timestep_spacing in ("linspace", "trailing"):
            return float(top)
        return float(np.sqrt(top * top + ONE))

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        mu: float | None = None,
        sigmas: np.ndarray | None = None,
    ) -> None:
        reject_args(type(self).__name__, mu=mu, sigmas=sigmas)
        n, n_train = num_inference_steps, self.num_train_timesteps
        check_steps(n, n_train)
        if not self.sigma_schedule:
            # two equal sigmas (a timestep past the range is clamped to the last one's)
            # make the Brownian step's interval 0: NaN, in diffusers too
            check_steppable(self.timestep_spacing, n_train, n, self.steps_offset)
        self._set_schedule(n)

    def _set_schedule(self, n: int) -> None:
        """The schedule of `n` steps, as diffusers' set_timesteps (unchecked)."""
        n_train = self.num_train_timesteps
        t = spaced_timesteps(self.timestep_spacing, n_train, n, self.steps_offset).astype(float)
        train, log_train = self._train_sigmas, np.log(self._train_sigmas)
        sig = np.interp(t, np.arange(len(train)), train)  # float64, as diffusers
        if self.sigma_schedule:
            sig = converted_sigmas(
                self.sigma_schedule, float(sig[-1]), float(sig[0]), n, *self._bounds
            )
            t = sigma_to_t(sig, log_train)
        # the midpoints in log sigma between consecutive sigmas, float64 as diffusers
        log_sig = -np.log(sig)
        t_mid = sigma_to_t(np.exp(-(log_sig[:-1] + np.diff(log_sig) * 0.5)), log_train)
        s = np.concatenate([sig, [0.0]]).astype(F32)
        self.sigmas = np.concatenate([s[:1], np.repeat(s[1:-1], 2), s[-1:]]).astype(F32)
        calls = np.concatenate([t[:1], np.repeat(t[1:], 2)])
        calls[1::2] = t_mid
        self.timesteps = calls.astype(F32)
        self.num_inference_steps = n
        self._first: tuple[int, np.ndarray, np.ndarray] | None = None
        self._new_schedule()

    def _pair(self, k: int) -> tuple[np.float32, np.float32]:
        """(sigma, sigma') of the step call k belongs to."""
        return (self.sigmas[k], self.sigmas[k + 1]) if k % 2 == 0 else self.sigmas[k - 1 : k + 1]

    def _midpoint(self, sigma: np.float32, sigma_next: np.float32) -> np.float32:
        # diffusers: t = -log sigma, halfway in t, back with exp(-t), in float32
        t, t_next = -np.log(sigma), -np.log(sigma_next)
        return np.exp(-(t + (t_next - t) * F32(0.5)))

    def takes_noise(self, step_index: int) -> bool:
        """Every call adds noise but the last step's, to sigma = 0 (plain Euler)."""
        return bool(self._pair(step_index)[1] > 0)

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        check_step(type(self).__name__, step_index, len(self.timesteps))
        sigma = self.sigmas[step_index]
        if step_index % 2 == 1:  # the second call runs at the midpoint
            sigma = self._midpoint(*self._pair(step_index))
        return as_f32(sample) / np.sqrt(sigma * sigma + ONE)

    def step(
        self,
        model_output: np.ndarray,
        step_index: int,
        sample: np.ndarray,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        """Even calls: to the midpoint (or, at the last step, Euler to 0). Odd calls: the
        whole step again from the even call's sample with the midpoint's x0."""
        name, k = type(self).__name__, step_index
        check_step(name, k, len(self.timesteps))
        sigma, sigma_next = self._pair(k)
        x = np.asarray(sample, dtype=np.float64)
        if sigma_next == 0:  # the last step: Euler, no noise
            x0 = self._x0(model_output, x, sigma)
            return as_f32(x + (x - x0) / float(sigma) * (0.0 - float(sigma)))
        check_noise(name, noise, sample)
        # diffusers' float32 path: t = -log sigma, the midpoint halfway in t
        t, t_next = -np.log(sigma), -np.log(sigma_next)
        mid = self._midpoint(sigma, sigma_next)
        x0 = self._x0(model_output, x, sigma if k % 2 == 0 else mid)
        z = np.asarray(noise, dtype=np.float64)
        sigma_from = np.exp(-t)
        if k % 2 == 0:
            self._first = (k, x, z)
            start, sigma_to = x, mid
        else:
            check_second_half(name, k, None if self._first is None else self._first[0])
            _, start, z1 = self._first
            self._first = None
            sigma_to = np.exp(-t_next)
            z = second_half_noise(z1, z, float(sigma_from), float(mid), float(sigma_to))
        # sigma_up caps at the target; sigma_down is the deterministic rest
        square = sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to)
        up = min(sigma_to, np.sqrt(square / (sigma_from * sigma_from)))
        down = np.sqrt(sigma_to * sigma_to - up * up)
        t_down = -np.log(down)
        ratio, weight = float(np.exp(-t_down) / np.exp(-t)), float(-np.expm1(t - t_down))
        return as_f32(ratio * start + weight * x0 + z * float(up))

    def _x0(self, model_output: np.ndarray, sample: np.ndarray, sigma: np.float32) -> np.ndarray:
        out, s = np.asarray(model_output, dtype=np.float64), float(sigma)
        if self.prediction_type == "epsilon":
            return sample - s * out
        return out * (-s / (s * s + 1) ** 0.5) + sample / (s * s + 1)
