"""DPMSolverMultistepScheduler ("DPM++ 2M", "DPM++ 2M SDE", DPM-Solver), as diffusers has it.

Multistep DPM-Solver++ of Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models" (arXiv:2211.01095), Algorithm 2: an exponential
integrator in log-SNR lambda on the data prediction x0, of order 2 (or 3) from the
previous steps' x0. algorithm_type="sde-dpmsolver++" is its SDE form (section 5 of the
paper; the "DPM++ 2M SDE" of k-diffusion): each step shrinks the deterministic part by e^-h
and adds fresh noise of std sigma_t sqrt(1 - e^-2h), so it is stochastic (`step(...,
noise=)`). "dpmsolver" and "sde-dpmsolver" are the noise-prediction forms of Lu et al.,
"DPM-Solver" (arXiv:2206.00927), deprecated in diffusers but still read from configs.

Port of diffusers.DPMSolverMultistepScheduler (scheduling_dpmsolver_multistep.py): solver
orders 1 to 3; epsilon, v, sample and flow predictions; the interpolated, Karras,
exponential, Beta and Lu (use_lu_lambdas) schedules, and flow-matching sigmas
(use_flow_sigmas, flow_shift, dynamic shifting by `mu`), the form SD3 can sample with. The
coefficients (runtime/schedulers/_dpm.py) are float32 scalars like diffusers' 0-d tensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _dpm, _flow
from ._common import (
    ONE,
    as_f32,
    check_noise,
    check_step,
    choice,
    reject_args,
    reject_learned_variance,
    reject_non_default,
    restarts,
    sigma_to_t,
)
from ._sigmas import (
    MultistepTables,
    check_multistep_steps,
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
        use_lu_lambdas: bool | None = False,
        use_flow_sigmas: bool | None = False,
        flow_shift: float = 1.0,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        **config: Any,
    ) -> None:
        name = type(self).__name__
        # thresholding and learned variances serve pixel-space models (DeepFloyd IF)
        reject_non_default(name, config, thresholding=False)
        reject_learned_variance(name, config)
        # diffusers silently maps these aliases (configs copied from DEIS/UniPC)
        algorithm_type = "dpmsolver++" if algorithm_type == "deis" else algorithm_type
        solver_type = "midpoint" if solver_type in ("logrho", "bh1", "bh2") else solver_type
        self.algorithm = choice(name, "algorithm_type", algorithm_type, _dpm.ALGORITHMS)
        self.stochastic = self.algorithm.startswith("sde-")  # per instance: the config decides
        self.solver_order = choice(name, "solver_order", solver_order, (1, 2, 3))
        if self.solver_order == 3 and self.algorithm == "sde-dpmsolver":
            raise ValueError(
                f"{name}: solver_order 3 with algorithm_type 'sde-dpmsolver' has no update "
                "in diffusers (it fails mid-run); use solver_order 2 or 'sde-dpmsolver++'"
            )
        self.solver_type = choice(name, "solver_type", solver_type, ("midpoint", "heun"))
        predictions = ("epsilon", "v_prediction", "sample", "flow_prediction")
        self.prediction_type = choice(name, "prediction_type", prediction_type, predictions)
        if self.prediction_type == "flow_prediction" and not _dpm.data_prediction(self.algorithm):
            raise ValueError(
                f"{name}: prediction_type 'flow_prediction' needs algorithm_type "
                "'dpmsolver++' or 'sde-dpmsolver++' (diffusers refuses it too)"
            )
        self.final_sigmas_type = choice(
            name, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min")
        )
        if not _dpm.data_prediction(self.algorithm) and self.final_sigmas_type == "zero":
            raise ValueError(
                f"{name}: final_sigmas_type 'zero' does not work with algorithm_type "
                f"'{self.algorithm}' (diffusers refuses it too); use 'sigma_min'"
            )
        choice(name, "time_shift_type", time_shift_type, ("exponential",))
        self.timestep_spacing = choice(
            name, "timestep_spacing", timestep_spacing, ("linspace", "leading", "trailing")
        )
        self.lower_order_final, self.euler_at_final = bool(lower_order_final), bool(euler_at_final)
        self.use_lu_lambdas, self.flow = bool(use_lu_lambdas), bool(use_flow_sigmas)
        self.sigma_schedule = sigma_schedule(
            name, use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas, self.flow
        )
        if self.use_lu_lambdas and self.flow:  # VP sigmas read as flow ones, as above
            raise ValueError(f"{name}: use_lu_lambdas with use_flow_sigmas samples NaN")
        self.flow_shift, self.use_dynamic_shifting = float(flow_shift), bool(use_dynamic_shifting)
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
        self._model_outputs: list[np.ndarray] = []  # the solver's quantities, oldest first
        self._lower_order_nums = 0
        self._last_step = -1

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        mu: float | None = None,
        sigmas: np.ndarray | None = None,
    ) -> None:
        name = type(self).__name__
        reject_args(name, sigmas=sigmas)
        if mu is not None:  # diffusers keeps the shift for later calls too
            if not self.use_dynamic_shifting:
                raise ValueError(f"{name}: mu needs use_dynamic_shifting in the config")
            self.flow_shift = float(np.exp(mu))
        n_train, n, spacing = self.num_train_timesteps, num_inference_steps, self.timestep_spacing
        # lambda_min_clipped trims the noisiest end (cosine schedules); -inf keeps it all
        last = n_train - int(np.searchsorted(self._lambda_t[::-1], self.lambda_min_clipped))
        t = multistep_timesteps(spacing, n_train, n, self.steps_offset, last)
        train = self._train_sigmas
        # diffusers' precedence: Karras, then Lu, then exponential or Beta, then flow
        if self.use_lu_lambdas and self.sigma_schedule != "karras":
            t, sig = self._lu_sigmas(len(t))
        elif self.flow and not self.sigma_schedule:
            sig = self._flow_sigmas(len(t))
            t = sig * n_train  # int64 in _set_tables: truncated, as diffusers casts them
        else:
            if not self.sigma_schedule:
                check_multistep_steps(spacing, n_train, n, self.steps_offset, last)
            # diffusers rounds the Karras timesteps except for cosine betas
            t, sig = multistep_sigmas(
                t, train, self.sigma_schedule, self.sigma_min, self.sigma_max, self._round_karras
            )
        # diffusers' sigma_min is the VP training sigma, with flow sigmas too
        last_sigma = train[0] if self.final_sigmas_type == "sigma_min" else 0.0
        self._set_tables(t, sig, last_sigma)
        self._reset_history()

    def _lu_sigmas(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Lu et al.'s schedule as diffusers builds it: evenly spaced in log sigma between
        the training ends (its "lambdas" are log sigmas), timesteps rounded except for
        cosine betas; a config's sigma_min/max do not bound it."""
        log_sigmas = np.log(self._train_sigmas)
        hi, lo = float(log_sigmas[-1]), float(log_sigmas[0])
        sig = np.exp(hi + np.linspace(0, 1, n) * (lo - hi))
        t = sigma_to_t(sig, log_sigmas)
        return (t.round() if self._round_karras else t), sig

    def _flow_sigmas(self, n: int) -> np.ndarray:
        """Flow-matching sigmas from 1 down (not reaching 0), shifted by flow_shift."""
        s = 1.0 - np.linspace(1, 1 / self.num_train_timesteps, n + 1)
        return np.flip(_flow.static_shift(self.flow_shift, s))[:-1].copy()

    def _alpha_sigma_lambda(self, sigma: np.float32) -> tuple[np.float32, ...]:
        return _flow.alpha_sigma_lambda(sigma, self.flow)

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        return as_f32(sample)

    def step(
        self,
        model_output: np.ndarray,
        step_index: int,
        sample: np.ndarray,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        """`noise`: standard normal of the sample's shape, for the SDE forms only."""
        name = type(self).__name__
        i, n = step_index, self.num_inference_steps
        check_step(name, i, n)
        if self.stochastic:
            check_noise(name, noise, sample)
        if restarts("DPM-Solver++", i, self._last_step, self._begin_index):
            self._reset_history()
        self._last_step = i
        sample, model_output = as_f32(sample), as_f32(model_output)
        alpha_s0, sigma_s0, lambda_s0 = self._alpha_sigma_lambda(self.sigmas[i])
        d0 = _dpm.solver_quantity(
            self.algorithm, self.prediction_type, model_output, sample, alpha_s0, sigma_s0
        )
        self._model_outputs = [*self._model_outputs, d0][-self.solver_order :]

        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(self.sigmas[i + 1])
        h = lambda_t - lambda_s0
        k_x, k0 = _dpm.base_coefficients(self.algorithm, h, alpha_s0, sigma_s0, alpha_t, sigma_t)
        prev = k_x * sample + k0 * d0
        # the last step is first order whenever its target sigma is 0 (or when asked); with
        # few steps the last two drop an order (diffusers' numerical-stability rule)
        few = self.lower_order_final and n < 15
        lower_final = i == n - 1 and (
            self.euler_at_final or few or self.final_sigmas_type == "zero"
        )
        lower_second = i == n - 2 and few
        if self.solver_order > 1 and self._lower_order_nums >= 1 and not lower_final:
            third = self.solver_order == 3 and self._lower_order_nums >= 2 and not lower_second
            prev = prev + self._higher_terms(i, h, k0, alpha_t, sigma_t, lambda_s0, third)
        if self.stochastic:
            prev = prev + _dpm.noise_std(self.algorithm, h, sigma_t) * as_f32(noise)
        self._lower_order_nums = min(self._lower_order_nums + 1, self.solver_order)
        return as_f32(prev)

    def _higher_terms(self, i, h, k0, alpha_t, sigma_t, lambda_s0, third: bool) -> np.ndarray:
        """The second-order (midpoint or Heun) or third-order terms from the previous
        steps' quantities, in diffusers' expressions."""
        m = self._model_outputs
        lambda_s1 = self._alpha_sigma_lambda(self.sigmas[i - 1])[2]
        r0 = (lambda_s0 - lambda_s1) / h
        d1_0 = (ONE / r0) * (m[-1] - m[-2])
        phi2 = _dpm.phi2(self.algorithm, h, alpha_t, sigma_t)
        if not third:
            return (_dpm.HALF * k0 if self.solver_type == "midpoint" else phi2) * d1_0
        lambda_s2 = self._alpha_sigma_lambda(self.sigmas[i - 2])[2]
        r1 = (lambda_s1 - lambda_s2) / h
        d1_1 = (ONE / r1) * (m[-2] - m[-3])
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (ONE / (r0 + r1)) * (d1_0 - d1_1)
        return phi2 * d1 + _dpm.phi3(self.algorithm, h, alpha_t, sigma_t) * d2
