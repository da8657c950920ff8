"""HeunDiscreteScheduler: Heun's second-order method on the probability-flow ODE.

Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models" (2022,
arXiv:2206.00364), Algorithm 1 without churn: an Euler step from sigma_i to sigma_{i+1},
then a second denoiser call there, and the step redone from sigma_i with the mean of the
two slopes; the last step, to sigma = 0, stays Euler. Port of
diffusers.HeunDiscreteScheduler (scheduling_heun_discrete.py): its schedule lists the
second calls' timesteps interleaved, [t0, t1, t1, ..., t_{n-1}, t_{n-1}] (2n - 1 calls for
n steps), so the runtime's loop (one denoiser call per timestep) runs it unchanged. The
tables are Euler's (this subclasses the Euler port); the step arithmetic is float64, as the
Euler port's, cast to float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._common import F32, as_f32, check_second_half, check_step, choice, reject_args
from .euler import EulerDiscreteScheduler


def drop_euler_only(config: dict[str, Any]) -> dict[str, Any]:
    """`config` without the Euler options Heun's and DPM2's configs lack (final_sigmas_type,
    zero-SNR rescaling, interpolation and timestep types): diffusers ignores such keys from
    another class's config, and so do these subclasses of the Euler port. sigma_min/max
    stay: diffusers' converted schedules (Karras, exponential, Beta) read them from any
    config that carries them."""
    drop = ("final_sigmas_type", "rescale_betas_zero_snr", "interpolation_type", "timestep_type")
    return {k: v for k, v in config.items() if k not in drop}


class HeunDiscreteScheduler(EulerDiscreteScheduler):
    """diffusers.HeunDiscreteScheduler (deterministic: diffusers' gamma is 0)."""

    order = 2
    stochastic = False

    def __init__(
        self,
        beta_start: float = 0.00085,  # diffusers' defaults for Heun and DPM2, not Euler's
        beta_end: float = 0.012,
        prediction_type: str = "epsilon",
        clip_sample: bool | None = False,
        clip_sample_range: float = 1.0,
        **config: Any,
    ) -> None:
        super().__init__(beta_start=beta_start, beta_end=beta_end, **drop_euler_only(config))
        name = type(self).__name__
        self.prediction_type = choice(
            name, "prediction_type", prediction_type, ("epsilon", "v_prediction", "sample")
        )
        self.clip_sample, self.clip_sample_range = bool(clip_sample), float(clip_sample_range)
        self._first: tuple[int, np.ndarray, float, np.ndarray] | None = None

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        mu: float | None = None,
        sigmas: np.ndarray | None = None,
    ) -> None:
        reject_args(type(self).__name__, mu=mu, sigmas=sigmas)
        super().set_timesteps(num_inference_steps)
        s, t = self.sigmas, self.timesteps
        self.sigmas = np.concatenate([s[:1], np.repeat(s[1:-1], 2), s[-1:]]).astype(F32)
        self.timesteps = np.concatenate([t[:1], np.repeat(t[1:], 2)]).astype(F32)
        self.num_inference_steps = num_inference_steps
        self._first = None

    def step(self, model_output: np.ndarray, step_index: int, sample: np.ndarray) -> np.ndarray:
        """Even calls: Euler from sigmas[k] to sigmas[k + 1] (kept for the next call).
        Odd calls: the previous call's step again with the two slopes' mean."""
        name = type(self).__name__
        k = step_index
        check_step(name, k, len(self.timesteps))
        sample64 = np.asarray(sample, dtype=np.float64)
        if k % 2 == 0:
            sigma, sigma_next = float(self.sigmas[k]), float(self.sigmas[k + 1])
            slope = (sample64 - self._x0(model_output, sample64, sigma)) / sigma
            dt = sigma_next - sigma
            self._first = (k, slope, dt, sample64)
            return as_f32(sample64 + slope * dt)
        check_second_half(name, k, None if self._first is None else self._first[0])
        _, first_slope, dt, start = self._first
        self._first = None
        sigma_next = float(self.sigmas[k])  # the first half's target, where this call ran
        slope = (sample64 - self._x0(model_output, sample64, sigma_next)) / sigma_next
        return as_f32(start + (first_slope + slope) / 2 * dt)

    def _x0(self, model_output: np.ndarray, sample: np.ndarray, sigma: float) -> np.ndarray:
        out = np.asarray(model_output, dtype=np.float64)
        if self.prediction_type == "epsilon":
            x0 = sample - sigma * out
        elif self.prediction_type == "v_prediction":
            x0 = out * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        else:  # sample
            x0 = out
        if self.clip_sample:
            x0 = np.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        return x0
