"""DEISMultistepScheduler: multistep DEIS (log-rho, orders 1-3), as diffusers has it.

Zhang & Chen, "Fast Sampling of Diffusion Models with Exponential Integrator" (2023,
arXiv:2204.13902): an exponential integrator on the noise prediction eps in
rho = sigma_t / alpha_t, whose eps is extrapolated by the Lagrange polynomial in log rho
through the last 1-3 model outputs (the paper's multistep, Adams-Bashforth-like DEIS,
interpolating in log rho: diffusers' "logrho"); order 1 is DDIM. Port of
diffusers.DEISMultistepScheduler (scheduling_deis_multistep.py) on the VP schedule (no
flow sigmas): algorithm_type "deis", solver_type "logrho" (diffusers maps DPM-Solver's
names onto these, so do we).

dtype path as diffusers: alpha-bars and the sigma table float32, the interpolated and
Karras sigmas float64 until their cast to float32, the coefficients float32 0-d values
(diffusers' torch scalars; its Lagrange integrals call numpy's float32 log on them).
Unlike DPM-Solver++ the schedule never reaches sigma = 0: the last sigma is the first
training sigma (Karras: the last Karras sigma again, so that last step is the identity).
The float32 coefficients lose digits (two large antiderivative values cancel): diffusers'
result departs from its float64 evaluation by ~1e-5 of the latent at order 3 and 10-25
steps, up to ~1e-3 at 100 steps; mirroring its expressions keeps us within ~1e-6 of it
given the same sigma table (tests/unit/test_scheduler_deis.py).
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
    check_multistep_steps,
    multistep_sigmas,
    multistep_timesteps,
    sigma_schedule,
)


class DEISMultistepScheduler(MultistepTables):
    """diffusers.DEISMultistepScheduler (log-rho DEIS, solver_order 1, 2 or 3)."""

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
        algorithm_type: str = "deis",
        solver_type: str = "logrho",
        lower_order_final: bool = True,
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        **config: Any,
    ) -> None:
        name = type(self).__name__
        # flow_shift and time_shift_type act only with use_flow_sigmas / use_dynamic_shifting,
        # dynamic_thresholding_ratio and sample_max_value only with thresholding.
        # use_flow_sigmas is refused although easy: diffusers 0.42 repeats the last flow
        # sigma (DEIS has no final_sigmas_type), so its last step is the identity and the
        # result keeps noise of sigma ~ flow_shift / n.
        reject_non_default(
            name,
            config,
            thresholding=False,
            use_flow_sigmas=False,
            use_dynamic_shifting=False,
        )
        # diffusers rewrites these (configs copied from DPM-Solver/UniPC); others raise there
        algorithm_type = (
            "deis" if algorithm_type in ("dpmsolver", "dpmsolver++") else algorithm_type
        )
        solver_type = "logrho" if solver_type in ("midpoint", "heun", "bh1", "bh2") else solver_type
        choice(name, "algorithm_type", algorithm_type, ("deis",))
        choice(name, "solver_type", solver_type, ("logrho",))
        self.solver_order = choice(name, "solver_order", solver_order, (1, 2, 3))
        self.prediction_type = choice(
            name, "prediction_type", prediction_type, ("epsilon", "v_prediction", "sample")
        )
        self.timestep_spacing = choice(
            name, "timestep_spacing", timestep_spacing, ("linspace", "leading", "trailing")
        )
        self.lower_order_final = bool(lower_order_final)
        self.sigma_schedule = sigma_schedule(
            name, use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas
        )
        # not DEIS keys, but diffusers' Karras conversion reads them from a config carrying them
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.num_train_timesteps, self.steps_offset = num_train_timesteps, steps_offset
        # DEIS has no rescale_betas_zero_snr (nor final_sigmas_type): diffusers ignores the
        # key in a foreign config, and so do we (**config)
        self._init_tables(
            name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas
        )
        self._reset_history()

    def _reset_history(self) -> None:
        self._model_outputs: list[np.ndarray] = []  # converted outputs (eps), oldest first
        self._lower_order_nums = 0
        self._last_step = -1

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        mu: float | None = None,
        sigmas: np.ndarray | None = None,
    ) -> None:
        # diffusers takes `mu` only with dynamic shifting (flow sigmas), never `sigmas`
        reject_args(type(self).__name__, mu=mu, sigmas=sigmas)
        train = self._train_sigmas
        # DPM-Solver's spacing, without its lambda_min_clipped
        n_train, n = self.num_train_timesteps, num_inference_steps
        t = multistep_timesteps(self.timestep_spacing, n_train, n, self.steps_offset)
        if not self.sigma_schedule:
            check_multistep_steps(self.timestep_spacing, n_train, n, self.steps_offset)
        # DEIS rounds the Karras timesteps on every beta schedule
        t, sig = multistep_sigmas(t, train, self.sigma_schedule, self.sigma_min, self.sigma_max)
        # never 0: a converted schedule repeats its last sigma (that last step goes nowhere,
        # h = 0), the interpolated one ends at the smallest training sigma
        last_sigma = sig[-1] if self.sigma_schedule else train[0]
        self._set_tables(t, sig, last_sigma)
        self._reset_history()

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        return as_f32(sample)

    def step(self, model_output: np.ndarray, step_index: int, sample: np.ndarray) -> np.ndarray:
        i, n = step_index, self.num_inference_steps
        check_step(type(self).__name__, i, n)
        if restarts("DEIS", i, self._last_step, self._begin_index):
            self._reset_history()
        self._last_step = i
        sample, model_output = as_f32(sample), as_f32(model_output)
        eps = self._convert(model_output, sample, self.sigmas[i])
        self._model_outputs = [*self._model_outputs, eps][-self.solver_order :]
        # lower_order_final acts only below 15 steps, as in diffusers
        lower = self.lower_order_final and n < 15
        if self.solver_order == 1 or self._lower_order_nums < 1 or (lower and i == n - 1):
            prev = self._first_order(eps, i, sample)
        elif self.solver_order == 2 or self._lower_order_nums < 2 or (lower and i == n - 2):
            prev = self._multistep(i, sample, 2)
        else:
            prev = self._multistep(i, sample, 3)
        self._lower_order_nums = min(self._lower_order_nums + 1, self.solver_order)
        return as_f32(prev)

    def _convert(
        self, model_output: np.ndarray, sample: np.ndarray, sigma: np.float32
    ) -> np.ndarray:
        """The model output as the eps DEIS integrates, through x0 like diffusers (for
        epsilon the round trip changes the last bits, and diffusers' result has them)."""
        alpha_t, sigma_t, _ = alpha_sigma_lambda(sigma)
        if self.prediction_type == "epsilon":
            x0 = (sample - sigma_t * model_output) / alpha_t
        elif self.prediction_type == "v_prediction":
            x0 = alpha_t * sample - sigma_t * model_output
        else:  # sample
            x0 = model_output
        return (sample - alpha_t * x0) / sigma_t

    def _first_order(self, eps: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        """DEIS-1 = DDIM: alpha_t / alpha_s x - sigma_t (e^h - 1) eps, h the log-SNR step."""
        alpha_s, _, lambda_s = alpha_sigma_lambda(self.sigmas[i])
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(self.sigmas[i + 1])
        h = lambda_t - lambda_s
        return (alpha_t / alpha_s) * sample - (sigma_t * (np.exp(h) - ONE)) * eps

    def _multistep(self, i: int, sample: np.ndarray, order: int) -> np.ndarray:
        """DEIS-`order`: x_t = alpha_t (x_s / alpha_s + sum_k c_k eps_k), c_k the integral
        from rho_s to rho_t of the Lagrange basis polynomial (in log rho) of output k,
        diffusers' closed forms (ind_fn) in float32."""
        alpha_t, rho_t = _alpha_rho(self.sigmas[i + 1])
        alpha_s0, rho_s0 = _alpha_rho(self.sigmas[i])
        rhos = [rho_s0] + [_alpha_rho(self.sigmas[i - k])[1] for k in range(1, order)]
        ms = self._model_outputs[::-1]  # newest first: m0 (at rho_s0), m1, m2
        ind = _ind2 if order == 2 else _ind3
        total = sample / alpha_s0
        for k in range(order):
            others = rhos[k + 1 :] + rhos[:k]  # diffusers' argument order for basis k
            coef = ind(rho_t, rhos[k], *others) - ind(rho_s0, rhos[k], *others)
            total = total + coef * ms[k]
        return alpha_t * total


def _alpha_rho(sigma: np.float32) -> tuple[np.float32, np.float32]:
    """VP alpha_t and rho = sigma_t / alpha_t in float32, as diffusers computes them."""
    alpha_t, sigma_t, _ = alpha_sigma_lambda(sigma)
    return alpha_t, sigma_t / alpha_t


def _ind2(t: np.float32, b: np.float32, c: np.float32) -> np.float32:
    """Antiderivative of (log t - log c) / (log b - log c) (diffusers' ind_fn, order 2)."""
    return t * (-np.log(c) + np.log(t) - ONE) / (np.log(b) - np.log(c))


def _ind3(t: np.float32, b: np.float32, c: np.float32, d: np.float32) -> np.float32:
    """Antiderivative of (log t - log c)(log t - log d) / ((log b - log c)(log b - log d))
    (diffusers' ind_fn, order 3), term by term in its order."""
    lt, lc, ld = np.log(t), np.log(c), np.log(d)
    numerator = t * (lc * (ld - lt + ONE) - ld * lt + ld + lt**2 - F32(2) * lt + F32(2))
    return numerator / ((np.log(b) - lc) * (np.log(b) - ld))
