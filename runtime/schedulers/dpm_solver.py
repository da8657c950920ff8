"""DPMSolverMultistepScheduler as "DPM++ 2M" and "DPM++ 2M SDE", as diffusers has it.

Multistep DPM-Solver++ of Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models" (arXiv:2211.01095), Algorithm 2: an exponential
integrator in log-SNR lambda on the data prediction x0, second order from the previous
step's x0. algorithm_type="sde-dpmsolver++" is its SDE form (section 5 of the paper; the
"DPM++ 2M SDE" of k-diffusion): each step shrinks the deterministic part by e^-h and adds
fresh noise of std sigma_t sqrt(1 - e^-2h), so it is stochastic (`step(..., noise=)`).
Port of diffusers.DPMSolverMultistepScheduler (scheduling_dpmsolver_multistep.py) for
those two algorithm types, solver_order 1 or 2; the coefficient scalars are float32 like
diffusers' 0-d tensors (h = lambda_t - lambda_s is a float32 difference).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._common import (
    F32,
    ONE,
    alpha_sigma_lambda,
    as_f32,
    check_step,
    choice,
    reject_args,
    reject_non_default,
    restarts,
)
from ._sigmas import (
    MultistepTables,
    multistep_sigmas,
    multistep_timesteps,
    sigma_schedule,
)


class DPMSolverMultistepScheduler(MultistepTables):
    """diffusers.DPMSolverMultistepScheduler as "DPM++ 2M" (algorithm_type="dpmsolver++")."""

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
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        **config: Any,
    ) -> None:
        name = type(self).__name__
        reject_non_default(
            name,
            config,
            thresholding=False,
            variance_type=None,
            use_lu_lambdas=False,
            use_flow_sigmas=False,
            use_dynamic_shifting=False,
        )
        # diffusers silently maps these aliases (configs copied from DEIS/UniPC)
        algorithm_type = "dpmsolver++" if algorithm_type == "deis" else algorithm_type
        solver_type = "midpoint" if solver_type in ("logrho", "bh1", "bh2") else solver_type
        algorithm = choice(
            name, "algorithm_type", algorithm_type, ("dpmsolver++", "sde-dpmsolver++")
        )
        self.stochastic = algorithm == "sde-dpmsolver++"  # per instance: the config decides
        self.solver_order = choice(name, "solver_order", solver_order, (1, 2))
        self.solver_type = choice(name, "solver_type", solver_type, ("midpoint", "heun"))
        self.prediction_type = choice(
            name, "prediction_type", prediction_type, ("epsilon", "v_prediction")
        )
        self.timestep_spacing = choice(
            name, "timestep_spacing", timestep_spacing, ("linspace", "leading", "trailing")
        )
        self.final_sigmas_type = choice(
            name, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min")
        )
        self.lower_order_final, self.euler_at_final = bool(lower_order_final), bool(euler_at_final)
        self.sigma_schedule = sigma_schedule(
            name, use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas
        )
        # not DPM keys, but diffusers honours them when a config (e.g. Euler's) carries them
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.num_train_timesteps, self.steps_offset = num_train_timesteps, steps_offset
        self.lambda_min_clipped = lambda_min_clipped
        self._round_karras = beta_schedule != "squaredcos_cap_v2"
        self._init_tables(
            name,
            num_train_timesteps,
            beta_start,
            beta_end,
            beta_schedule,
            trained_betas,
            rescale_betas_zero_snr,
        )
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
        n_train = self.num_train_timesteps
        # lambda_min_clipped trims the noisiest end (cosine schedules); -inf keeps it all
        clipped = int(np.searchsorted(self._lambda_t[::-1], self.lambda_min_clipped))
        t = multistep_timesteps(
            self.timestep_spacing,
            n_train,
            num_inference_steps,
            self.steps_offset,
            n_train - clipped,
        )
        train = self._train_sigmas
        # diffusers rounds the Karras timesteps except for cosine betas
        t, sig = multistep_sigmas(
            t, train, self.sigma_schedule, self.sigma_min, self.sigma_max, self._round_karras
        )
        last_sigma = train[0] if self.final_sigmas_type == "sigma_min" else 0.0
        self._set_tables(t, sig, last_sigma)
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
        """`noise`: standard normal of the sample's shape, for the SDE form only."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        i, n = step_index, self.num_inference_steps
        check_step(type(self).__name__, i, n)
        if self.stochastic and (noise is None or np.shape(noise) != np.shape(sample)):
            raise ValueError(
                "sde-dpmsolver++ steps need standard-normal `noise` of the sample's shape"
            )
        if restarts("DPM-Solver++", i, self._last_step):
            self._reset_history()
        self._last_step = i
        sample, model_output = as_f32(sample), as_f32(model_output)
        alpha_s0, sigma_s0, lambda_s0 = alpha_sigma_lambda(self.sigmas[i])
        if self.prediction_type == "epsilon":
            x0 = (sample - sigma_s0 * model_output) / alpha_s0
        else:  # v_prediction
            x0 = alpha_s0 * sample - sigma_s0 * model_output
        self._model_outputs = [*self._model_outputs, x0][-self.solver_order :]

        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(self.sigmas[i + 1])
        h = lambda_t - lambda_s0
        phi = alpha_t * (np.exp(-h) - ONE)  # alpha_t (e^-h - 1): -> -alpha_t when sigma_t -> 0
        # the last step is first order whenever its target sigma is 0 (or when asked)
        lower_final = i == n - 1 and (
            self.euler_at_final
            or (self.lower_order_final and n < 15)
            or self.final_sigmas_type == "zero"
        )
        first_order = self.solver_order == 1 or self._lower_order_nums < 1 or lower_final
        d1 = None
        if not first_order:
            m0, m1 = self._model_outputs[-1], self._model_outputs[-2]
            _, _, lambda_s1 = alpha_sigma_lambda(self.sigmas[i - 1])
            r0 = (lambda_s0 - lambda_s1) / h
            d1 = (ONE / r0) * (m0 - m1)
        if self.stochastic:
            prev = self._sde_update(sample, x0, d1, alpha_t, sigma_t, sigma_s0, h, noise)
        elif first_order:
            prev = (sigma_t / sigma_s0) * sample - phi * x0  # DPM-Solver++(1) = DDIM
        elif self.solver_type == "midpoint":  # Lu et al. Algorithm 2
            prev = (sigma_t / sigma_s0) * sample - phi * x0 - (F32(0.5) * phi) * d1
        else:  # heun
            prev = (
                (sigma_t / sigma_s0) * sample
                - phi * x0
                + (alpha_t * ((np.exp(-h) - ONE) / h + ONE)) * d1
            )
        self._lower_order_nums = min(self._lower_order_nums + 1, self.solver_order)
        return as_f32(prev)

    def _sde_update(self, sample, x0, d1, alpha_t, sigma_t, sigma_s0, h, noise) -> np.ndarray:
        """SDE-DPM-Solver++ (first order, or 2M from the previous x0's difference d1), in
        diffusers' expressions: x0 weight alpha_t (1 - e^-2h), noise std sigma_t sqrt(1 - e^-2h)."""
        decay = np.exp(-h)
        pull = alpha_t * (ONE - np.exp(F32(-2.0) * h))
        prev = (sigma_t / sigma_s0 * decay) * sample + pull * x0
        if d1 is not None:
            if self.solver_type == "midpoint":
                prev = prev + (F32(0.5) * pull) * d1
            else:  # heun
                heun = alpha_t * ((ONE - np.exp(F32(-2.0) * h)) / (F32(-2.0) * h) + ONE)
                prev = prev + heun * d1
        return prev + sigma_t * np.sqrt(ONE - np.exp(F32(-2) * h)) * as_f32(noise)
