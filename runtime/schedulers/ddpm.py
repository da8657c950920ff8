"""DDPMScheduler: ancestral sampling of the DDPM reverse process, as diffusers has it.

Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models" (2020, arXiv:2006.11239):
each step predicts x0 (eq. 15), takes the mean of the posterior q(x_prev | x_t, x0) (eq. 7)
between the scheduled timestep t and the next one, prev (-1 after the last: alpha-bar 1),
and adds fresh noise of the chosen variance, so it is stochastic (`step(..., noise=)`):
"fixed_small" is the posterior's beta-tilde (Ho et al. section 3.2), "fixed_large" the
forward process's beta of the (t, prev) jump; the "_log" variants are the same variances
through their logs (diffusers' "fixed_small_log", from rl-diffuser; Glide's "max_log").
A step from timestep 0 adds no noise (its `noise` may be omitted); one from any t > 0
does, the last one of "leading" spacing with steps_offset=1 (t = 1) included.

Port of diffusers.DDPMScheduler (scheduling_ddpm.py), float32 like its torch tensors.
Departures, both where diffusers' result is unusable:
- variance_type="fixed_large_log": diffusers' step takes the square root of the *log*
  variance log(beta) < 0, NaN for every step; we use the standard deviation it stands for,
  exp(log(beta) / 2), as its "fixed_small_log" branch does.
- "trailing" spacing, for step counts (61, 103, ...) where np.arange(1000, 0, -1000 / n)
  keeps a float-rounding 1e-13 as an (n + 1)-th point: diffusers then schedules timestep
  -1, whose step reads alpha-bar[-1] (the noisiest) and blows the clean sample up; we drop
  that point, so n steps, which agree with diffusers' first n (_common.trailing_timesteps,
  for every scheduler here).
Not ported: the "learned"/"learned_range" variances (they need a model that predicts
its variance), thresholding, the "sigmoid"/"laplace" beta schedules, custom timesteps.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._common import (
    F32,
    ONE,
    AlphaBarNoise,
    alphas_cumprod_f32,
    as_f32,
    check_noise,
    check_step,
    check_steppable,
    check_steps,
    choice,
    reject_args,
    reject_non_default,
    spaced_timesteps,
)

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")


class DDPMScheduler(AlphaBarNoise):
    """diffusers.DDPMScheduler with a fixed variance (the DDPM ancestral sampler)."""

    order = 1
    stochastic = True
    init_noise_sigma = 1.0

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        variance_type: str | None = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        **config: Any,
    ) -> None:
        name = type(self).__name__
        reject_non_default(name, config, thresholding=False)
        # None (a DPM-Solver config's, carried over by from_config) falls through diffusers'
        # branches to the clamped posterior variance: fixed_small's
        variance_type = "fixed_small" if variance_type is None else variance_type
        self.variance_type = choice(name, "variance_type", variance_type, VARIANCE_TYPES)
        self.prediction_type = choice(
            name, "prediction_type", prediction_type, ("epsilon", "v_prediction", "sample")
        )
        self.timestep_spacing = choice(
            name, "timestep_spacing", timestep_spacing, ("linspace", "leading", "trailing")
        )
        self.num_train_timesteps, self.steps_offset = num_train_timesteps, steps_offset
        self.clip_sample, self.clip_sample_range = bool(clip_sample), F32(clip_sample_range)
        self.alphas_cumprod = alphas_cumprod_f32(
            name,
            num_train_timesteps,
            beta_start,
            beta_end,
            beta_schedule,
            trained_betas,
            rescale_betas_zero_snr,
        )
        self._t = np.arange(num_train_timesteps - 1, -1, -1, dtype=np.int64)
        self.timesteps = self._t.astype(F32)
        self.num_inference_steps: int | None = None

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        mu: float | None = None,
        sigmas: np.ndarray | None = None,
    ) -> None:
        reject_args(type(self).__name__, mu=mu, sigmas=sigmas)
        n_train, n = self.num_train_timesteps, num_inference_steps
        check_steps(n, n_train)
        # diffusers: an IndexError at the first step past the table
        check_steppable(self.timestep_spacing, n_train, n, self.steps_offset)
        t = spaced_timesteps(self.timestep_spacing, n_train, n, self.steps_offset)
        self._t = (t.round() if self.timestep_spacing == "linspace" else t).astype(np.int64)
        self.timesteps = self._t.astype(F32)
        self.num_inference_steps = len(self._t)
        self._new_schedule()

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        return as_f32(sample)  # DDPM's denoiser input is the sample itself

    def takes_noise(self, step_index: int) -> bool:
        """Every step adds noise but the one from t = 0, where diffusers draws none."""
        return int(self._t[step_index]) > 0

    def step(
        self,
        model_output: np.ndarray,
        step_index: int,
        sample: np.ndarray,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        """`noise`: standard normal of the sample's shape; unused (may be None) at t = 0."""
        name = type(self).__name__
        i, n = step_index, self.num_inference_steps
        check_step(name, i, n)
        t, noisy = int(self._t[i]), self.takes_noise(i)
        if noisy:
            check_noise(name, noise, sample)
        sample, model_output = as_f32(sample), as_f32(model_output)
        prev_t = int(self._t[i + 1]) if i + 1 < n else -1
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else ONE
        b_t, b_prev = ONE - a_t, ONE - a_prev
        current_alpha = a_t / a_prev
        current_beta = ONE - current_alpha
        # x0 from the model output (Ho et al. eq. 15; v: Salimans & Ho)
        if self.prediction_type == "epsilon":
            x0 = (sample - np.sqrt(b_t) * model_output) / np.sqrt(a_t)
        elif self.prediction_type == "v_prediction":
            x0 = np.sqrt(a_t) * sample - np.sqrt(b_t) * model_output
        else:  # sample
            x0 = model_output
        if self.clip_sample:
            x0 = np.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        # the posterior mean, eq. 7
        x0_coeff = (np.sqrt(a_prev) * current_beta) / b_t
        sample_coeff = np.sqrt(current_alpha) * b_prev / b_t
        prev = x0_coeff * x0 + sample_coeff * sample
        if noisy:
            prev = prev + self._std(a_t, a_prev, current_beta) * as_f32(noise)
        return as_f32(prev)

    def _std(self, a_t: np.float32, a_prev: np.float32, current_beta: np.float32) -> np.float32:
        """The added noise's standard deviation, in diffusers' float32 expressions."""
        if self.variance_type in ("fixed_large", "fixed_large_log"):
            if self.variance_type == "fixed_large":
                return np.sqrt(current_beta)
            return np.exp(F32(0.5) * np.log(current_beta))  # diffusers: sqrt(log) = NaN
        # beta-tilde, clamped as diffusers does (it takes logs of it)
        variance = np.maximum((ONE - a_prev) / (ONE - a_t) * current_beta, F32(1e-20))
        if self.variance_type == "fixed_small":
            return np.sqrt(variance)
        return np.exp(F32(0.5) * np.log(variance))  # fixed_small_log
