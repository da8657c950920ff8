"""KDPM2AncestralDiscreteScheduler ("DPM2 a"): DPM2 with fresh noise at every step.

Karras et al. (2022, arXiv:2206.00364)'s DPM-Solver-2 step made ancestral, as k-diffusion's
`sample_dpm_2_ancestral`: each step from sigma_i to sigma_{i+1} goes deterministically down
to sigma_down = sqrt(sigma_{i+1}^2 - sigma_up^2), with
sigma_up = sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2), through the
geometric midpoint sqrt(sigma_i * sigma_down) (an Euler half step there, a second denoiser
call, the whole step with that slope), then adds N(0, sigma_up^2) noise; the last step, to
sigma = 0, stays Euler. Exactly, sigma_down = sigma_{i+1}^2 / sigma_i and the midpoint is
sigma_{i+1} itself; diffusers gets both by float32 cancellation, which we mirror (up to
~80-fold amplified rounding at 3-4 steps: there torch's float32 sqrt, not correctly
rounded, moves the midpoints by up to ~3e-5 relative), except where it breaks down (below).

Port of diffusers.KDPM2AncestralDiscreteScheduler (scheduling_k_dpm_2_ancestral_discrete.py):
as for DPM2 its schedule interleaves the midpoints' timesteps,
[t0, t_mid0, t1, ..., t_mid(n-2), t_(n-1)] (2n - 1 calls for n steps). The tables are
Euler's (this subclasses the DPM2 port); sigma_up/down and the midpoints are float32 as
diffusers' torch computes them; the step arithmetic is float64, cast to float32.

Stochastic: the second half of each step (the odd calls) takes the standard-normal `noise`
(diffusers draws it there with randn_tensor, its only draw); the even calls need none and
ignore what they are given. diffusers draws it from a torch generator, so the same seed
gives other images.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._common import (
    F32,
    as_f32,
    check_noise,
    check_second_half,
    check_step,
    reject_args,
    sigma_to_t,
)
from .euler import EulerDiscreteScheduler
from .kdpm2 import KDPM2DiscreteScheduler


class KDPM2AncestralDiscreteScheduler(KDPM2DiscreteScheduler):
    """diffusers.KDPM2AncestralDiscreteScheduler ("DPM2 a"; diffusers' gamma is 0)."""

    order = 2
    stochastic = True

    def __init__(
        self,
        beta_start: float = 0.00085,  # diffusers' defaults for this class, not Euler's
        beta_end: float = 0.012,
        prediction_type: str = "epsilon",  # "sample" raises NotImplementedError there
        **config: Any,
    ) -> None:
        # keys this class lacks in diffusers (from a converted Euler config: zero-SNR, final
        # sigma, interpolation type) are ignored here as there: the DPM2 port drops them
        super().__init__(
            beta_start=beta_start, beta_end=beta_end, prediction_type=prediction_type, **config
        )

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        mu: float | None = None,
        sigmas: np.ndarray | None = None,
    ) -> None:
        reject_args(type(self).__name__, mu=mu, sigmas=sigmas)
        EulerDiscreteScheduler.set_timesteps(self, num_inference_steps)
        s, t = self.sigmas, self.timesteps  # n + 1 float32 sigmas (the last 0), n timesteps
        if self.sigma_schedule == "karras":
            t = np.round(t).astype(F32)  # diffusers rounds DPM2's Karras timesteps
        s_next = np.concatenate([s[1:], [0]]).astype(F32)
        with np.errstate(divide="ignore", invalid="ignore"):  # the last entries: 0/0, log 0
            # float32, in diffusers' torch order; up[n] = NaN there too (never used)
            up = np.sqrt(s_next * s_next * (s * s - s_next * s_next) / (s * s))
            down_sq = s_next * s_next - up * up  # = s_next^4 / s^2, by cancellation
            down = np.sqrt(down_sq)
            down[-1] = 0
            # float32 cannot resolve that difference once s_next / s < 2^-10: diffusers'
            # sigma_down is then rounding noise (NaN; 0, so a NaN trajectory; or off by
            # percents), as from the cosine schedule's sigma_max ~2e4, or at 2 steps of the
            # linear 1e-4..0.02 one. There we take the exact s_next^2 / s; elsewhere
            # diffusers' rounded value, for parity.
            s64, next64 = s.astype(np.float64), s_next.astype(np.float64)
            broken = (s_next > 0) & (~(down_sq > 0) | ((next64 / s64) ** 2 < 2.0**-20))
            exact = next64 * next64 / s64
            down = np.where(broken, exact, down).astype(F32)
            # torch.lerp(start, end, 0.5) = end - (end - start) * 0.5
            log_s, log_down = np.log(s), np.log(down)
            mid = np.exp(log_down - (log_down - log_s) * F32(0.5)).astype(F32)
        mid[-2:] = 0  # the last step (to sigma 0) is Euler: no midpoint
        t_mid = sigma_to_t(mid[:-2], np.log(self._train_sigmas)).astype(F32)
        # per step i: sigmas[2i] = s_i (even calls); _mid[2i + 1] = the midpoint (odd calls)
        self.sigmas = np.concatenate([s[:1], np.repeat(s[1:], 2), s[-1:]]).astype(F32)
        self._mid = np.repeat(mid, 2)
        self._up, self._down = up, down
        interleaved = np.stack([t_mid, t[1:]], axis=-1).reshape(-1)
        self.timesteps = np.concatenate([t[:1], interleaved]).astype(F32)
        self.num_inference_steps = num_inference_steps
        self._start = None

    def takes_noise(self, step_index: int) -> bool:
        """Only the odd calls (the second halves) add noise: the runtime draws it for them
        alone, so its draws line up with diffusers' for the same stream."""
        return step_index % 2 == 1

    def step(
        self,
        model_output: np.ndarray,
        step_index: int,
        sample: np.ndarray,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        """Even calls 2i: Euler from s_i to the midpoint (no noise). Odd calls 2i + 1: from
        the previous call's sample to sigma_down with the midpoint's slope, plus
        `noise` * sigma_up."""
        name = type(self).__name__
        k = step_index
        check_step(name, k, len(self.timesteps))
        i = k // 2  # the step (sigma pair) this call belongs to
        x = np.asarray(sample, dtype=np.float64)
        if k % 2 == 0:
            sigma, mid = float(self.sigmas[k]), float(self._mid[k])
            self._start = (k, x)
            return as_f32(x + (x - self._x0(model_output, x, sigma)) / sigma * (mid - sigma))
        check_noise(name, noise, sample)
        check_second_half(name, k, None if self._start is None else self._start[0])
        _, start = self._start
        self._start = None
        sigma, mid = float(self.sigmas[k - 1]), float(self._mid[k])
        slope = (x - self._x0(model_output, x, mid)) / mid
        prev = start + slope * (float(self._down[i]) - sigma)
        return as_f32(prev + np.asarray(noise, dtype=F32) * self._up[i])
