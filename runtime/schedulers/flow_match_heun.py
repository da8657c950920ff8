"""FlowMatchHeunDiscreteScheduler: Heun's method on the rectified-flow ODE (SD3).

Karras et al.'s Heun step (2022, arXiv:2206.00364, Algorithm 1 without churn) on the
velocity of Esser et al.'s rectified flow (SD3, 2024, arXiv:2403.03206): an Euler step from
sigma to sigma', a second denoiser call there, and the step redone with the mean of the two
velocities; the last step, to sigma = 0, stays Euler. Port of
diffusers.FlowMatchHeunDiscreteScheduler (scheduling_flow_match_heun_discrete.py): SD3's
static shift only (diffusers' class takes no `sigmas` or `mu`, so FLUX's pipeline cannot
use it, nor can the runtime), its schedule interleaving the second calls' timesteps,
[t0, t1, t1, ..., t_(n-1), t_(n-1)] (2n - 1 calls for n steps). Its tables are float32 as
diffusers'; the step is float64, cast to float32 (diffusers: float32).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._common import F32, FlowNoise, as_f32, check_second_half, check_step, check_steps, reject_args


class FlowMatchHeunDiscreteScheduler(FlowNoise):
    """diffusers.FlowMatchHeunDiscreteScheduler (deterministic: diffusers' s_churn is 0)."""

    order = 2
    stochastic = False
    init_noise_sigma = 1.0  # x_1 is plain N(0, I), as for flow-match Euler

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, **config: Any):
        # the other keys of a flow-match Euler config (dynamic shifting, shift_terminal, ...)
        # are not this class's: diffusers' from_config ignores them, and so do we
        self.num_train_timesteps, self.shift = num_train_timesteps, shift
        t = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=F32)[::-1]
        sig = t / F32(num_train_timesteps)
        sig = (shift * sig / (1 + (shift - 1) * sig)).astype(F32)
        # diffusers spaces its schedule between these already-shifted ends, then shifts
        # again in set_timesteps (as flow-match Euler does)
        self._sigma_min, self._sigma_max = float(sig[-1]), float(sig[0])
        self.sigmas = np.concatenate([sig, [0]]).astype(F32)
        self.timesteps = (sig * F32(num_train_timesteps)).astype(F32)
        self.num_inference_steps: int | None = None
        self._first: tuple[int, np.ndarray, float, np.ndarray] | None = None

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        mu: float | None = None,
        sigmas: np.ndarray | None = None,
    ) -> None:
        reject_args(type(self).__name__, mu=mu, sigmas=sigmas)
        n, n_train = num_inference_steps, self.num_train_timesteps
        check_steps(n, n_train)
        sig = np.linspace(self._sigma_max * n_train, self._sigma_min * n_train, n) / n_train
        sig = (self.shift * sig / (1 + (self.shift - 1) * sig)).astype(F32)
        t = sig * F32(n_train)
        self.timesteps = np.concatenate([t[:1], np.repeat(t[1:], 2)]).astype(F32)
        s = np.concatenate([sig, np.zeros(1, F32)])
        self.sigmas = np.concatenate([s[:1], np.repeat(s[1:-1], 2), s[-1:]]).astype(F32)
        self.num_inference_steps = n
        self._first = None
        self._new_schedule()

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        return as_f32(sample)

    def step(self, model_output: np.ndarray, step_index: int, sample: np.ndarray) -> np.ndarray:
        """Even calls: Euler from sigmas[k] to sigmas[k + 1] (kept for the next call). Odd
        calls: the previous call's step again with the two velocities' mean."""
        name, k = type(self).__name__, step_index
        check_step(name, k, len(self.timesteps))
        x = np.asarray(sample, dtype=np.float64)
        # the derivative (x - x0) / sigma with x0 = x - sigma v is the velocity v itself
        v = np.asarray(model_output, dtype=np.float64)
        if k % 2 == 0:
            dt = float(self.sigmas[k + 1]) - float(self.sigmas[k])
            self._first = (k, v, dt, x)
            return as_f32(x + v * dt)
        check_second_half(name, k, None if self._first is None else self._first[0])
        _, v_first, dt, start = self._first
        self._first = None
        return as_f32(start + 0.5 * (v_first + v) * dt)
