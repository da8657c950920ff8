"""EDMEulerScheduler: Euler's method in the EDM formulation, as diffusers implements it.

Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models"
(arXiv:2206.00364): the sample is x = x0 + sigma * n in the variance-exploding
parametrisation, and the denoiser is preconditioned (their Table 1): it sees
c_in * x with c_in = 1 / sqrt(sigma^2 + sigma_data^2) and the timestep
c_noise = log(sigma) / 4, and its output F gives the data estimate
D = c_skip * x + c_out * F. Sigmas follow their rho schedule (eq. 5, "karras") or are
log-uniform ("exponential", CosXL). The step is their Algorithm 2 without churn.
Port of diffusers.EDMEulerScheduler (scheduling_edm_euler.py): diffusers' `step` takes
s_churn/s_tmin/s_tmax/s_noise as call arguments, default 0 (no churn); the runtime never
passes them, so only the deterministic step is ported.

The module also holds the EDM pieces that edm_dpm_solver.py shares: the schedules and the
preconditioning, in float32 like diffusers' torch (the Karras ramp in the ramp's dtype).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._common import F32, ONE, SigmaNoise, as_f32, check_step, choice, reject_args


def linspace_f32(start: float, end: float, num: int) -> np.ndarray:
    """torch.linspace in float32, bit for bit: its CPU kernel steps from both ends with a
    float32 step, and its compiler fuses `start + step * i` into one rounding (FMA);
    float64 here, rounded once to float32, does the same. np.linspace(...).astype(float32)
    is an ulp off at a third of the points, which moves Karras sigmas by ~1.5e-6."""
    start32, end32 = F32(start), F32(end)
    if num == 1:
        return np.array([start32], dtype=F32)
    step = np.float64((end32 - start32) / F32(num - 1))
    i = np.arange(num)
    from_start = np.float64(start32) + step * i
    from_end = np.float64(end32) - step * (num - 1 - i)
    return np.where(i < num // 2, from_start, from_end).astype(F32)


def edm_sigmas(
    schedule: str, ramp: np.ndarray, sigma_min: float, sigma_max: float, rho: float
) -> np.ndarray:
    """Descending sigmas at `ramp` positions in [0, 1] (0: sigma_max, 1: sigma_min).

    "karras" is computed in the ramp's dtype (float64 for EDM Euler, float32 for EDM
    DPM-Solver, as in diffusers). "exponential" uses only len(ramp), as diffusers does:
    a float32 linspace of log-sigmas (torch's default dtype), exponentiated and flipped.
    """
    if schedule == "karras":
        kind = ramp.dtype.type
        min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        return (kind(max_inv_rho) + ramp * kind(min_inv_rho - max_inv_rho)) ** kind(rho)
    logs = linspace_f32(math.log(sigma_min), math.log(sigma_max), len(ramp))
    return np.exp(logs)[::-1].copy()


def precondition_noise(sigmas: np.ndarray) -> np.ndarray:
    """c_noise = log(sigma) / 4: what the denoiser receives as its timestep."""
    return (F32(0.25) * np.log(as_f32(sigmas))).astype(F32)


def precondition_inputs(sample: np.ndarray, sigma: np.float32, sigma_data: float) -> np.ndarray:
    """c_in * x, c_in = 1 / sqrt(sigma^2 + sigma_data^2)."""
    c_in = ONE / np.sqrt(sigma * sigma + F32(sigma_data**2))
    return as_f32(sample) * c_in


def precondition_outputs(
    sample: np.ndarray,
    model_output: np.ndarray,
    sigma: np.float32,
    sigma_data: float,
    prediction_type: str,
) -> np.ndarray:
    """D = c_skip * x + c_out * F, the data estimate (float32 scalars like diffusers)."""
    norm = sigma * sigma + F32(sigma_data**2)
    # torch evaluates `sigma_data**2 / t` as t.reciprocal() * sigma_data**2: two roundings
    c_skip = (ONE / norm) * F32(sigma_data**2)
    signed = sigma if prediction_type == "epsilon" else -sigma  # v_prediction: c_out < 0
    c_out = (signed * F32(sigma_data)) / np.sqrt(norm)
    return c_skip * as_f32(sample) + c_out * as_f32(model_output)


class EDMSchedule(SigmaNoise):
    """What the EDM schedulers share: their config, sigma tables and input scaling."""

    def _edm_config(
        self,
        sigma_min: float,
        sigma_max: float,
        sigma_data: float,
        sigma_schedule: str,
        prediction_type: str,
        rho: float,
        final_sigmas_type: str,
    ) -> None:
        name = type(self).__name__
        self.sigma_schedule = choice(
            name, "sigma_schedule", sigma_schedule, ("karras", "exponential")
        )
        # diffusers lists "sample" too, but its precondition_outputs raises for it
        self.prediction_type = choice(
            name, "prediction_type", prediction_type, ("epsilon", "v_prediction")
        )
        self.final_sigmas_type = choice(
            name, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min")
        )
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.sigma_data, self.rho = float(sigma_data), float(rho)

    @property
    def init_noise_sigma(self) -> float:
        # diffusers' value: sqrt(sigma_max^2 + 1), although EDM starts from sigma_max itself
        return (self.sigma_max**2 + 1) ** 0.5

    def _set_tables(self, ramp: np.ndarray, last: np.float32 | None) -> None:
        """Sigmas on `ramp`, then `last` (None: the last scheduled sigma again)."""
        sig = edm_sigmas(self.sigma_schedule, ramp, self.sigma_min, self.sigma_max, self.rho)
        sig = sig.astype(F32)
        self.timesteps = precondition_noise(sig)
        self.sigmas = np.concatenate([sig, [sig[-1] if last is None else last]]).astype(F32)

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        """c_in * x: the denoiser was trained on unit-variance inputs."""
        check_step(type(self).__name__, step_index, len(self.timesteps))
        return precondition_inputs(sample, self.sigmas[step_index], self.sigma_data)


class EDMEulerScheduler(EDMSchedule):
    """diffusers.EDMEulerScheduler, deterministic (s_churn = 0, diffusers' default)."""

    order = 1
    stochastic = False

    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        sigma_schedule: str = "karras",
        num_train_timesteps: int = 1000,
        prediction_type: str = "epsilon",
        rho: float = 7.0,
        final_sigmas_type: str = "zero",
        **config: Any,  # keys of other schedulers' configs: ignored, as diffusers does
    ) -> None:
        self._edm_config(
            sigma_min,
            sigma_max,
            sigma_data,
            sigma_schedule,
            prediction_type,
            rho,
            final_sigmas_type,
        )
        # before set_timesteps diffusers exposes num_train_timesteps + 1 sigmas; so do we
        self._set_ramp(np.arange(num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps)
        self.num_inference_steps: int | None = None

    def _set_ramp(self, ramp: np.ndarray) -> None:
        # "sigma_min" ends on the last scheduled sigma: the last step has length zero
        self._set_tables(ramp, None if self.final_sigmas_type == "sigma_min" else F32(0))

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        mu: float | None = None,
        sigmas: np.ndarray | None = None,
    ) -> None:
        """`sigmas`, as in diffusers, are not sigma values but positions on the Karras ramp:
        0 is sigma_max, 1 is sigma_min, one model call each, the final sigma appended.
        Departure: values outside [0, 1] (which give sigmas outside the range, or NaN
        timesteps) and `sigmas` under the exponential schedule (which diffusers ignores
        but for their count) raise ValueError instead of sampling the wrong schedule."""
        name = type(self).__name__
        reject_args(name, mu=mu)
        if sigmas is not None:
            ramp = np.asarray(sigmas, dtype=np.float64).reshape(-1)
            if self.sigma_schedule != "karras":
                raise ValueError(f"{name}: `sigmas` need sigma_schedule='karras'")
            if ramp.size == 0 or not (ramp.min() >= 0 and ramp.max() <= 1):
                raise ValueError(f"{name}: `sigmas` are ramp positions in [0, 1] (diffusers)")
        elif num_inference_steps is None or num_inference_steps < 1:
            raise ValueError("pass num_inference_steps (1 or more) or sigmas")
        else:
            ramp = np.linspace(0, 1, num_inference_steps)  # float64, like diffusers
        self._set_ramp(ramp)
        self.num_inference_steps = len(self.timesteps)
        self._new_schedule()

    def step(self, model_output: np.ndarray, step_index: int, sample: np.ndarray) -> np.ndarray:
        """Euler from sigmas[i] to sigmas[i + 1] along (x - D) / sigma, in float32."""
        check_step(type(self).__name__, step_index, len(self.timesteps))
        sample = as_f32(sample)
        sigma = self.sigmas[step_index]
        denoised = precondition_outputs(
            sample, model_output, sigma, self.sigma_data, self.prediction_type
        )
        derivative = (sample - denoised) / sigma
        return as_f32(sample + derivative * (self.sigmas[step_index + 1] - sigma))
