"""EDMDPMSolverMultistepScheduler: multistep DPM-Solver++ in the EDM formulation.

Playground v2.5 (SDXL architecture, EDM training) ships this scheduler. The denoiser is
preconditioned as in Karras et al., "Elucidating the Design Space of Diffusion-Based
Generative Models" (arXiv:2206.00364): input c_in * x, timestep log(sigma) / 4, data
estimate x0 = c_skip * x + c_out * F; sigmas follow their rho schedule ("karras") or are
log-uniform ("exponential"). The solver is multistep DPM-Solver++ of Lu et al.,
"DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models"
(arXiv:2211.01095), on x0 in the variance-exploding parametrisation: alpha_t = 1, so the
log-SNR is lambda = -log(sigma). algorithm_type="sde-dpmsolver++" is its SDE form (fresh
noise each step, `step(..., noise=)`). Port of diffusers.EDMDPMSolverMultistepScheduler
(scheduling_edm_dpmsolver_multistep.py), solver_order 1, 2 or 3 (3 for "dpmsolver++" only:
diffusers has no third-order SDE update). Scalars are float32 like diffusers' 0-d tensors.

Departure: with final_sigmas_type="sigma_min" the last scheduled sigma already is sigma_min
(to float32 rounding), so the last step has h = 0. diffusers then returns
(sigma_t / sigma_s) * sample at first order and with midpoint, but NaN (0/0) from Heun's
and the third-order coefficients (at 15+ steps, or without lower_order_final); the port
returns (sigma_t / sigma_s) * sample in every case, the h -> 0 limit.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._common import (
    F32,
    ONE,
    as_f32,
    check_noise,
    check_step,
    choice,
    reject_args,
    reject_non_default,
    restarts,
)
from .edm_euler import EDMSchedule, linspace_f32, precondition_outputs


class EDMDPMSolverMultistepScheduler(EDMSchedule):
    """diffusers.EDMDPMSolverMultistepScheduler as DPM++ 2M (Karras), e.g. Playground v2.5."""

    order = 1  # diffusers' value: one model call per step
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
        solver_order: int = 2,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        final_sigmas_type: str = "zero",
        **config: Any,  # dynamic_thresholding_ratio, sample_max_value: only with thresholding
    ) -> None:
        name = type(self).__name__
        reject_non_default(name, config, thresholding=False)
        # diffusers silently maps these aliases (configs copied from DEIS/UniPC)
        if algorithm_type == "deis" and final_sigmas_type == "zero":  # as diffusers refuses
            raise ValueError(f"{name}: final_sigmas_type='zero' needs another algorithm_type")
        algorithm_type = "dpmsolver++" if algorithm_type == "deis" else algorithm_type
        solver_type = "midpoint" if solver_type in ("logrho", "bh1", "bh2") else solver_type
        algorithm = choice(
            name, "algorithm_type", algorithm_type, ("dpmsolver++", "sde-dpmsolver++")
        )
        self.stochastic = algorithm == "sde-dpmsolver++"  # per instance: the config decides
        orders = (1, 2) if self.stochastic else (1, 2, 3)  # diffusers' SDE order 3 crashes
        self.solver_order = choice(name, "solver_order", solver_order, orders)
        self.solver_type = choice(name, "solver_type", solver_type, ("midpoint", "heun"))
        self._edm_config(
            sigma_min,
            sigma_max,
            sigma_data,
            sigma_schedule,
            prediction_type,
            rho,
            final_sigmas_type,
        )
        self.lower_order_final, self.euler_at_final = bool(lower_order_final), bool(euler_at_final)
        # before set_timesteps diffusers exposes a num_train_timesteps schedule ending in 0
        self._set_tables(linspace_f32(0, 1, num_train_timesteps), F32(0))
        self.num_inference_steps: int | None = None
        self._reset_history()

    def _reset_history(self) -> None:
        self._model_outputs: list[np.ndarray] = []  # data predictions x0, oldest first
        self._lower_order_nums = 0
        self._last_step = -1

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        mu: float | None = None,
        sigmas: np.ndarray | None = None,
    ) -> None:
        reject_args(type(self).__name__, mu=mu, sigmas=sigmas)
        if num_inference_steps is None or num_inference_steps < 1:
            raise ValueError("num_inference_steps (1 or more) is required")
        ramp = linspace_f32(0, 1, num_inference_steps)  # torch.linspace's float32 ramp
        last = F32(self.sigma_min) if self.final_sigmas_type == "sigma_min" else F32(0)
        self._set_tables(ramp, last)
        self.num_inference_steps = num_inference_steps
        self._reset_history()
        self._new_schedule()

    def step(
        self,
        model_output: np.ndarray,
        step_index: int,
        sample: np.ndarray,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        """`noise`: standard normal of the sample's shape, for the SDE form only."""
        i, n = step_index, self.num_inference_steps
        check_step(type(self).__name__, i, n)
        if self.stochastic:
            check_noise("sde-dpmsolver++", noise, sample)
        if restarts("DPM-Solver++", i, self._last_step, self._begin_index):
            self._reset_history()
        self._last_step = i
        sample = as_f32(sample)
        sigma_s0, sigma_t = self.sigmas[i], self.sigmas[i + 1]
        x0 = precondition_outputs(
            sample, model_output, sigma_s0, self.sigma_data, self.prediction_type
        )
        self._model_outputs = [*self._model_outputs, x0][-self.solver_order :]

        # the last step is first order whenever its target sigma is 0 (or when asked)
        lower_final = i == n - 1 and (
            self.euler_at_final
            or (self.lower_order_final and n < 15)
            or self.final_sigmas_type == "zero"
        )
        lower_second = i == n - 2 and self.lower_order_final and n < 15
        if self.solver_order == 1 or self._lower_order_nums < 1 or lower_final:
            order = 1
        elif self.solver_order == 2 or self._lower_order_nums < 2 or lower_second:
            order = 2
        else:
            order = 3
        self._lower_order_nums = min(self._lower_order_nums + 1, self.solver_order)
        with np.errstate(divide="ignore"):  # sigma_t = 0 at the end: lambda_t = inf, h = inf
            lambda_t, lambda_s0 = -np.log(sigma_t), -np.log(sigma_s0)
        h = lambda_t - lambda_s0
        if h == 0:  # see the module doc: every update tends to its first term as h -> 0
            return as_f32((sigma_t / sigma_s0) * sample)
        d1 = d2 = None
        if order >= 2:
            m0, m1 = self._model_outputs[-1], self._model_outputs[-2]
            r0 = (lambda_s0 + np.log(self.sigmas[i - 1])) / h  # h_0 / h
            d1 = (ONE / r0) * (m0 - m1)
        if order == 3:
            m2 = self._model_outputs[-3]
            r1 = (np.log(self.sigmas[i - 2]) - np.log(self.sigmas[i - 1])) / h  # h_1 / h
            d1_0, d1_1 = d1, (ONE / r1) * (m1 - m2)
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (ONE / (r0 + r1)) * (d1_0 - d1_1)

        if self.stochastic:
            return as_f32(self._sde_update(sample, x0, d1, sigma_t, sigma_s0, h, noise))
        phi = np.exp(-h) - ONE  # alpha_t (e^-h - 1) with alpha_t = 1: -1 when sigma_t = 0
        prev = (sigma_t / sigma_s0) * sample - phi * x0  # DPM-Solver++(1) = DDIM
        if order == 2 and self.solver_type == "midpoint":  # Lu et al. Algorithm 2
            prev = prev - (F32(0.5) * phi) * d1
        elif order >= 2:  # heun, and the first-order correction of order 3
            prev = prev + (phi / h + ONE) * d1
        if order == 3:
            prev = prev - ((np.exp(-h) - ONE + h) / (h * h) - F32(0.5)) * d2
        return as_f32(prev)

    def _sde_update(self, sample, x0, d1, sigma_t, sigma_s0, h, noise) -> np.ndarray:
        """SDE-DPM-Solver++ (first order, or 2M from the previous x0's difference d1), in
        diffusers' expressions: x0 weight 1 - e^-2h, noise std sigma_t sqrt(1 - e^-2h)."""
        pull = ONE - np.exp(F32(-2.0) * h)
        prev = (sigma_t / sigma_s0 * np.exp(-h)) * sample + pull * x0
        if d1 is not None:
            if self.solver_type == "midpoint":
                prev = prev + (F32(0.5) * pull) * d1
            else:  # heun
                prev = prev + (pull / (F32(-2.0) * h) + ONE) * d1
        return prev + sigma_t * np.sqrt(pull) * as_f32(noise)
