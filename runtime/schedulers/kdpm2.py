"""KDPM2DiscreteScheduler ("DPM2"): Karras et al.'s DPM-Solver-2 step on their sigmas.

Karras et al. (2022, arXiv:2206.00364), the second-order sampler k-diffusion calls
`sample_dpm_2`: from sigma_i, an Euler half step to the geometric midpoint
sqrt(sigma_i * sigma_{i+1}), a second denoiser call there, and the whole step from sigma_i
with that midpoint slope; the last step, to sigma = 0, stays Euler. Port of
diffusers.KDPM2DiscreteScheduler (scheduling_k_dpm_2_discrete.py): its schedule lists the
midpoints' timesteps interleaved, [t0, t_mid1, t1, ..., t_mid(n-1), t_(n-1)] (2n - 1 calls
for n steps), so the runtime's loop runs it unchanged. The tables are Euler's (this
subclasses the Euler port); the midpoints are computed in float32, as diffusers' torch
`log().lerp(..., 0.5).exp()`; the step arithmetic is float64, cast to float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._common import F32, as_f32, check_step, choice, reject_args, sigma_to_t
from .euler import EulerDiscreteScheduler
from .heun import drop_euler_only


class KDPM2DiscreteScheduler(EulerDiscreteScheduler):
    """diffusers.KDPM2DiscreteScheduler (deterministic: diffusers' gamma is 0)."""

    order = 2
    stochastic = False

    def __init__(
        self,
        beta_start: float = 0.00085,  # diffusers' defaults for DPM2, not Euler's
        beta_end: float = 0.012,
        prediction_type: str = "epsilon",
        **config: Any,
    ) -> None:
        config = drop_euler_only(config)
        super().__init__(beta_start=beta_start, beta_end=beta_end, **config)
        self.prediction_type = choice(
            type(self).__name__, "prediction_type", prediction_type, ("epsilon", "v_prediction")
        )
        self._start: tuple[int, np.ndarray] | None = None

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        mu: float | None = None,
        sigmas: np.ndarray | None = None,
    ) -> None:
        reject_args(type(self).__name__, mu=mu, sigmas=sigmas)
        super().set_timesteps(num_inference_steps)
        s, t = self.sigmas, self.timesteps  # n + 1 sigmas (the last 0), n timesteps
        if self.sigma_schedule == "karras":
            t = np.round(t).astype(F32)  # diffusers rounds DPM2's Karras timesteps
        with np.errstate(divide="ignore", invalid="ignore"):  # log(0) = -inf, as torch
            log_s = np.log(s)
            end = np.roll(log_s, 1)
            # torch.lerp(start, end, 0.5) = end - (end - start) * 0.5
            mid = np.exp(end - (end - log_s) * F32(0.5)).astype(F32)
        t_mid = sigma_to_t(mid[1:-1], np.log(self._train_sigmas)).astype(F32)

        def pairs(v: np.ndarray) -> np.ndarray:
            return np.concatenate([v[:1], np.repeat(v[1:], 2), v[-1:]]).astype(F32)

        self.sigmas, self._mid = pairs(s), pairs(mid)
        interleaved = np.stack([t_mid, t[1:]], axis=-1).reshape(-1)
        self.timesteps = np.concatenate([t[:1], interleaved]).astype(F32)
        self.num_inference_steps = num_inference_steps
        self._start = None

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        check_step(type(self).__name__, step_index, len(self.timesteps))
        sigma = self.sigmas[step_index] if step_index % 2 == 0 else self._mid[step_index]
        return as_f32(sample) / np.sqrt(sigma * sigma + F32(1))

    def step(self, model_output: np.ndarray, step_index: int, sample: np.ndarray) -> np.ndarray:
        """Even calls: Euler from sigmas[k] to the midpoint. Odd calls: the whole step from
        the previous call's sample with the midpoint's slope."""
        name = type(self).__name__
        k = step_index
        check_step(name, k, len(self.timesteps))
        x = np.asarray(sample, dtype=np.float64)
        if k % 2 == 0:
            sigma, mid = float(self.sigmas[k]), float(self._mid[k + 1])
            self._start = (k, x)
            return as_f32(x + (x - self._x0(model_output, x, sigma)) / sigma * (mid - sigma))
        if self._start is None or self._start[0] != k - 1:
            raise ValueError(
                f"{name}: call {k} is a second half, and needs call {k - 1} just before"
            )
        _, start = self._start
        self._start = None
        sigma, mid, sigma_next = (
            float(v) for v in (self.sigmas[k - 1], self._mid[k], self.sigmas[k])
        )
        slope = (x - self._x0(model_output, x, mid)) / mid
        return as_f32(start + slope * (sigma_next - sigma))

    def _x0(self, model_output: np.ndarray, sample: np.ndarray, sigma: float) -> np.ndarray:
        out = np.asarray(model_output, dtype=np.float64)
        if self.prediction_type == "epsilon":
            return sample - sigma * out
        return out * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
