"""DPMSolverSinglestepScheduler: singlestep DPM-Solver(++) ("DPM++ 2S"), as diffusers has it.

Lu et al., "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in
Around 10 Steps" (arXiv:2206.00927), DPM-Solver-2 and -3 on the noise prediction
(algorithm_type="dpmsolver"), and Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling
of Diffusion Probabilistic Models" (arXiv:2211.01095), Algorithm 1, DPM-Solver++(2S) on the
data prediction x0 ("dpmsolver++", the default); "sde-dpmsolver++" is the latter's SDE
form (section 5), which adds fresh noise at every step and is stochastic (`step(...,
noise=)`). All are exponential integrators in log-SNR lambda.

"Singlestep" as diffusers implements it: `order_list` cuts the schedule into groups
([1, 2, 3, 1, 2, 3, ...] for solver_order 3). A group's first step is first order (DDIM)
from its start sample; each further step solves again from that start sample to the next
sigma, with the model outputs at the group's earlier (intermediate) points, so the group
ends at the full order. One model call per step; `timesteps` has num_inference_steps
entries. The timesteps are DPM-Solver's "linspace" (lambda_min_clipped trims the noisiest
end) or Karras sigmas; diffusers' class has no timestep_spacing, steps_offset or
rescale_betas_zero_snr and ignores those keys of a converted config, and so does this port.

Port of diffusers.DPMSolverSinglestepScheduler (scheduling_dpmsolver_singlestep.py) for
solver_order 1-3, solver_type "midpoint"/"heun", the three algorithm types; coefficients
are float32 like diffusers' 0-d tensors, the sigma schedule float64 until its float32 cast.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _dpm
from ._common import (
    F32,
    ONE,
    alpha_sigma_lambda,
    as_f32,
    check_noise,
    check_step,
    choice,
    reject_args,
    reject_learned_variance,
    reject_non_default,
    restarts,
)
from ._sigmas import (
    MultistepTables,
    multistep_sigmas,
    multistep_timesteps,
    sigma_schedule,
)

HALF = _dpm.HALF


def order_list(steps: int, order: int, lower_order_final: bool, final_zero: bool) -> list[int]:
    """diffusers' get_order_list: the solver order of each step (groups 1, 2, .., order)."""
    k = steps // order
    if lower_order_final and order == 3:
        tail = {0: [1, 2, 1], 1: [1], 2: [1, 2]}[steps % 3]
        orders = [1, 2, 3] * (k - 1 if steps % 3 == 0 else k) + tail
    elif lower_order_final and order == 2:
        orders = [1, 2] * (k - 1) + [1, 1] if steps % 2 == 0 else [1, 2] * k + [1]
    else:  # without lower_order_final, steps is a multiple of order (set_timesteps)
        orders = list(range(1, order + 1)) * k
    if final_zero:
        orders[-1] = 1  # the step to sigma = 0 is first order
    return orders


class DPMSolverSinglestepScheduler(MultistepTables):
    """diffusers.DPMSolverSinglestepScheduler ("DPM++ 2S", singlestep DPM-Solver(++))."""

    order = 1  # diffusers' value: one model call per step
    stochastic = False
    init_noise_sigma = 1.0

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = False,
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        **config: Any,
    ) -> None:
        name = type(self).__name__
        reject_non_default(
            name,
            config,
            thresholding=False,
            use_flow_sigmas=False,
            use_dynamic_shifting=False,
        )
        reject_learned_variance(name, config)
        # diffusers maps these aliases (configs copied from DEIS/UniPC); it then refuses
        # "deis" with final_sigmas_type "zero" (it checks the unmapped name), we do not
        algorithm_type = "dpmsolver++" if algorithm_type == "deis" else algorithm_type
        solver_type = "midpoint" if solver_type in ("logrho", "bh1", "bh2") else solver_type
        self.algorithm = choice(
            name, "algorithm_type", algorithm_type, ("dpmsolver++", "sde-dpmsolver++", "dpmsolver")
        )
        self.stochastic = self.algorithm == "sde-dpmsolver++"  # per instance: the config decides
        self.solver_order = choice(name, "solver_order", solver_order, (1, 2, 3))
        self.solver_type = choice(name, "solver_type", solver_type, ("midpoint", "heun"))
        self.prediction_type = choice(
            name, "prediction_type", prediction_type, ("epsilon", "v_prediction", "sample")
        )
        self.final_sigmas_type = choice(
            name, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min")
        )
        if self.algorithm == "dpmsolver" and final_sigmas_type == "zero":
            raise ValueError(
                f"{name}: final_sigmas_type='zero' does not work with algorithm_type="
                "'dpmsolver' (diffusers refuses it too); use 'sigma_min'"
            )
        self.lower_order_final = bool(lower_order_final)
        self.sigma_schedule = sigma_schedule(
            name, use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas
        )
        # not keys of this class, but diffusers honours them when a config carries them
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.num_train_timesteps = num_train_timesteps
        self.lambda_min_clipped = lambda_min_clipped
        self._init_tables(
            name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas
        )
        self.order_list: list[int] = []
        self._reset_history()

    def _reset_history(self) -> None:
        self._outputs: list[np.ndarray | None] = [None] * self.solver_order  # oldest first
        self._start: np.ndarray | None = None  # the sample the current group starts from
        self._last_step = -1

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        mu: float | None = None,
        sigmas: np.ndarray | None = None,
    ) -> None:
        reject_args(type(self).__name__, mu=mu, sigmas=sigmas)
        n, n_train = num_inference_steps, self.num_train_timesteps
        # lambda_min_clipped trims the noisiest end (cosine schedules); -inf keeps it all;
        # diffusers' singlestep class knows no other spacing than "linspace"
        clipped = int(np.searchsorted(self._lambda_t[::-1], self.lambda_min_clipped))
        t = multistep_timesteps("linspace", n_train, n, 0, n_train - clipped)
        train = self._train_sigmas
        t, sig = multistep_sigmas(t, train, self.sigma_schedule, self.sigma_min, self.sigma_max)
        last_sigma = train[0] if self.final_sigmas_type == "sigma_min" else 0.0
        self._set_tables(t, sig, last_sigma)
        # diffusers rewrites its config for good (later set_timesteps keep it): steps not a
        # multiple of the order, or a last step to sigma = 0, need the lower-order tail
        if n % self.solver_order or self.final_sigmas_type == "zero":
            self.lower_order_final = True
        self.order_list = order_list(
            n, self.solver_order, self.lower_order_final, self.final_sigmas_type == "zero"
        )
        self._reset_history()

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        return as_f32(sample)

    def step(
        self,
        model_output: np.ndarray,
        step_index: int,
        sample: np.ndarray,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        """`noise`: standard normal of the sample's shape, for sde-dpmsolver++ only."""
        name = type(self).__name__
        i = step_index
        check_step(name, i, self.num_inference_steps)
        if self.stochastic:
            check_noise(name, noise, sample)
        if restarts(name, i, self._last_step, self._begin_index):
            self._reset_history()
        self._last_step = i
        sample, model_output = as_f32(sample), as_f32(model_output)
        self._outputs = [*self._outputs[1:], self._convert(model_output, sample, i)]
        order = self.order_list[i]
        # diffusers' guard for a group cut at its start: from a begin index inside a group
        # (img2img) that group restarts there, at first order, and ends at its own order
        while self._outputs[-order] is None:
            order -= 1
        if order == 1:
            self._start = sample  # a new group: its later steps solve from here
        return as_f32(self._update(order, i, noise))

    def _convert(self, model_output: np.ndarray, sample: np.ndarray, i: int) -> np.ndarray:
        """The model output as the solver's quantity: x0 for DPM-Solver++, eps for DPM-Solver."""
        alpha_t, sigma_t, _ = alpha_sigma_lambda(self.sigmas[i])
        return _dpm.solver_quantity(
            self.algorithm, self.prediction_type, model_output, sample, alpha_t, sigma_t
        )

    def _update(self, order: int, i: int, noise: np.ndarray | None) -> np.ndarray:
        """From the group's start (index i + 1 - order) to sigmas[i + 1], in diffusers'
        expressions: x_t = k_x x_s + k0 D0 + k1 D1 (+ k2 D2) (+ noise), where D0 is the
        start's model output and D1, D2 the divided differences of the later ones."""
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(self.sigmas[i + 1])
        alpha_s, sigma_s, lambda_s = alpha_sigma_lambda(self.sigmas[i + 1 - order])
        h = lambda_t - lambda_s
        k_x, k0 = _dpm.base_coefficients(self.algorithm, h, alpha_s, sigma_s, alpha_t, sigma_t)
        m = self._outputs
        coefficient_args = (self.algorithm, h, alpha_t, sigma_t)
        prev = k_x * self._start + k0 * m[-order]
        if order == 2:
            r0 = (self._lambda(i) - lambda_s) / h
            d1 = (ONE / r0) * (m[-1] - m[-2])
            k1 = HALF * k0 if self.solver_type == "midpoint" else _dpm.phi2(*coefficient_args)
            prev = prev + k1 * d1
        elif order == 3:
            lambda_s0, lambda_s1 = self._lambda(i), self._lambda(i - 1)
            r0, r1 = (lambda_s0 - lambda_s) / h, (lambda_s1 - lambda_s) / h
            d1_0, d1_1 = (ONE / r1) * (m[-2] - m[-3]), (ONE / r0) * (m[-1] - m[-3])
            k1 = _dpm.phi2(*coefficient_args)
            if self.solver_type == "midpoint":
                prev = prev + k1 * d1_1
            else:  # heun: the full third-order expansion
                d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
                d2 = F32(2.0) * (d1_1 - d1_0) / (r0 - r1)
                prev = prev + k1 * d1 + _dpm.phi3(*coefficient_args) * d2
        if self.stochastic:
            prev = prev + _dpm.noise_std(self.algorithm, h, sigma_t) * as_f32(noise)
        return prev

    def _lambda(self, i: int) -> np.float32:
        """log-SNR at sigmas[i], one of the group's intermediate points."""
        return alpha_sigma_lambda(self.sigmas[i])[2]
