"""UniPCMultistepScheduler: the UniPC predictor-corrector (B(h) variants), as diffusers has it.

Zhao, Bai, Rao, Zhou & Lu, "UniPC: A Unified Predictor-Corrector Framework for Fast
Sampling of Diffusion Models" (2023, arXiv:2302.04867): an exponential integrator in
log-SNR lambda on the data (x0) or noise prediction; UniP-p predicts from the last p
model outputs (Algorithm 2), and UniC corrects that prediction with the model output at
the predicted point (Algorithm 1), so each model call raises the order by one.
Port of diffusers.UniPCMultistepScheduler (scheduling_unipc_multistep.py), solver_type
"bh1" or "bh2", solver_order 1-3, predict_x0 on or off, epsilon, v, sample and flow
predictions, on the VP schedule or on flow-matching sigmas (use_flow_sigmas: SD3's static
shift, FLUX's given sigmas and dynamic shift by `mu`, shift_terminal). Coefficients are
float32 like diffusers' 0-d tensors (the rho systems solved in float32 too), the sigma
schedule float64 until its cast to float32, as there.

Each `step(model_output, i, sample)` first corrects `sample` (the previous step's
prediction) with this model output, then predicts the next sample from the corrected one,
as diffusers' step does; the final prediction is never corrected (no model call follows).
The history makes steps run in order; the begin index (0 unless set_begin_index moved
it) restarts it.

Where diffusers 0.42 evaluates its formulas at h = inf or h = 0 and gets NaN (the last step
to sigma = 0 with bh1 or predict_x0=False; Karras with final "sigma_min" at order 3) this
port returns the limit instead (see `_update`); lower_order_final=False towards sigma = 0,
where diffusers returns inf and no limit exists, is rejected.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _dpm, _flow
from ._common import (
    F32,
    ONE,
    as_f32,
    check_step,
    check_steps,
    choice,
    reject_args,
    reject_non_default,
    restarts,
)
from ._sigmas import (
    MultistepTables,
    check_multistep_steps,
    converted_sigmas,
    multistep_sigmas,
    multistep_timesteps,
    sigma_schedule,
)


class UniPCMultistepScheduler(MultistepTables):
    """diffusers.UniPCMultistepScheduler on the VP schedule (UniPC-bh1/bh2, order 1-3)."""

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
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: Any = (),
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        rescale_betas_zero_snr: bool = False,
        use_flow_sigmas: bool | None = False,
        flow_shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        shift_terminal: float | None = None,
        **config: Any,
    ) -> None:
        name = type(self).__name__
        # dynamic_thresholding_ratio and sample_max_value only act with thresholding
        reject_non_default(name, config, thresholding=False, solver_p=None)
        self.flow, self.flow_shift = bool(use_flow_sigmas), float(flow_shift)
        self.use_dynamic_shifting = bool(use_dynamic_shifting)
        self.time_shift_type = choice(
            name, "time_shift_type", time_shift_type, ("exponential", "linear")
        )
        if shift_terminal is not None and not self.flow:
            raise ValueError(f"{name}: shift_terminal needs use_flow_sigmas (diffusers refuses it)")
        self.shift_terminal = shift_terminal
        # diffusers silently maps these (configs copied from DPM-Solver/DEIS) to bh2
        solver_type = "bh2" if solver_type in ("midpoint", "heun", "logrho") else solver_type
        self.solver_type = choice(name, "solver_type", solver_type, ("bh1", "bh2"))
        self.solver_order = choice(name, "solver_order", solver_order, (1, 2, 3))
        predictions = ("epsilon", "v_prediction", "sample", "flow_prediction")
        self.prediction_type = choice(name, "prediction_type", prediction_type, predictions)
        if self.prediction_type == "flow_prediction" and not predict_x0:
            raise ValueError(
                f"{name}: prediction_type 'flow_prediction' needs predict_x0 (diffusers "
                "refuses it too)"
            )
        self.timestep_spacing = choice(
            name, "timestep_spacing", timestep_spacing, ("linspace", "leading", "trailing")
        )
        self.final_sigmas_type = choice(
            name, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min")
        )
        self.lower_order_final = bool(lower_order_final)
        if not self.lower_order_final and solver_order > 1 and final_sigmas_type == "zero":
            # the last step would extrapolate the history to lambda = +inf: diffusers
            # returns inf there (rk = 0, D1 = inf); UniPC needs lower_order_final for it
            raise ValueError(
                f"{name}: lower_order_final=False is not supported by the numpy runtime "
                "with final_sigmas_type='zero' and solver_order > 1 (diffusers' last step "
                "diverges to inf); use lower_order_final=True or final_sigmas_type='sigma_min'"
            )
        self.predict_x0 = bool(predict_x0)
        self.disable_corrector = frozenset(int(k) for k in disable_corrector or ())
        self.sigma_schedule = sigma_schedule(
            name, use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas, self.flow, ("karras",)
        )
        self.sigma_min, self.sigma_max = sigma_min, sigma_max  # the converted schedules only
        self.num_train_timesteps, self.steps_offset = num_train_timesteps, steps_offset
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
        self._model_outputs: list[np.ndarray] = []  # converted outputs (x0 or eps), oldest first
        self._lower_order_nums = 0
        self._last_sample: np.ndarray | None = None  # the sample the last prediction started at
        self._last_order = 1  # the last prediction's order: the corrector's order
        self._last_step = -1

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        mu: float | None = None,
        sigmas: np.ndarray | None = None,
    ) -> None:
        name = type(self).__name__
        if self.flow:
            self._set_flow_timesteps(num_inference_steps, mu, sigmas)
            return
        # diffusers takes `sigmas` only with flow sigmas, `mu` only with dynamic shifting
        reject_args(name, mu=mu, sigmas=sigmas)
        train = self._train_sigmas
        n_train, n = self.num_train_timesteps, num_inference_steps
        t = multistep_timesteps(self.timestep_spacing, n_train, n, self.steps_offset)
        if not self.sigma_schedule:
            check_multistep_steps(self.timestep_spacing, n_train, n, self.steps_offset)
        # UniPC rounds the Karras timesteps on every beta schedule
        t, sig = multistep_sigmas(t, train, self.sigma_schedule, self.sigma_min, self.sigma_max)
        last_sigma = 0.0
        if self.final_sigmas_type == "sigma_min":  # a converted schedule's own last sigma,
            last_sigma = sig[-1] if self.sigma_schedule else train[0]  # else the training one
        self._set_tables(t, sig, last_sigma)
        self._reset_history()

    def _set_flow_timesteps(
        self, n: int | None, mu: float | None, sigmas: np.ndarray | None
    ) -> None:
        """diffusers' flow branch: sigmas from 1 down to 1/N (or the pipeline's, FLUX's),
        shifted (statically, or by `mu`), stretched to shift_terminal, the first nudged
        off 1 (log 0 in the update), timesteps sigma * N cast to int64 as diffusers does."""
        name = type(self).__name__
        if self.use_dynamic_shifting and mu is None:
            raise ValueError(f"{name}: mu must be passed when use_dynamic_shifting is True")
        n_train = self.num_train_timesteps
        if self.sigma_schedule == "karras":
            self._set_flow_karras(check_steps(n, n_train), sigmas)
            return
        if sigmas is not None:  # FLUX's pipeline passes np.linspace(1, 1/n, n)
            sig = np.asarray(sigmas, dtype=np.float64).copy()
        else:
            sig = np.linspace(1, 1 / n_train, check_steps(n, n_train) + 1)[:-1]
        if self.use_dynamic_shifting:
            sig = _flow.time_shift(self.time_shift_type, mu, sig)
        else:
            sig = _flow.static_shift(self.flow_shift, sig)
        if self.shift_terminal:
            sig = _flow.stretch_to_terminal(sig, self.shift_terminal)
        if np.fabs(sig[0] - 1) < 1e-6:
            sig[0] -= 1e-6
        t = sig * n_train
        last_sigma = sig[-1] if self.final_sigmas_type == "sigma_min" else 0.0
        self._set_tables(t, sig, last_sigma)
        self._reset_history()

    def _set_flow_karras(self, n: int, sigmas: np.ndarray | None) -> None:
        """diffusers' Karras branch with flow sigmas: Karras sigmas over the VP training
        range (or the config's sigma_min/max), mapped into flow sigmas s / (1 + s),
        timesteps s * N; no shift (diffusers' Karras branch skips it, and `mu`)."""
        if sigmas is not None:
            # diffusers converts the given flow sigmas as if they were VP ones, reversed:
            # a schedule with no meaning, not ported (FLUX's pipeline passes them)
            raise ValueError(
                f"{type(self).__name__}: use_karras_sigmas with use_flow_sigmas and a given "
                "sigma list (FLUX's) is not ported; sample without --sigmas"
            )
        train = self._train_sigmas
        vp = converted_sigmas("karras", train[0], train[-1], n, self.sigma_min, self.sigma_max)
        sig = vp / (vp + 1)
        last_sigma = sig[-1] if self.final_sigmas_type == "sigma_min" else 0.0
        self._set_tables(sig * self.num_train_timesteps, sig, last_sigma)
        self._reset_history()

    def _alpha_sigma_lambda(self, sigma: np.float32) -> tuple[np.float32, ...]:
        return _flow.alpha_sigma_lambda(sigma, self.flow)

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        return as_f32(sample)

    def step(self, model_output: np.ndarray, step_index: int, sample: np.ndarray) -> np.ndarray:
        i, n = step_index, self.num_inference_steps
        check_step(type(self).__name__, i, n)
        if restarts("UniPC", i, self._last_step, self._begin_index):
            self._reset_history()
        self._last_step = i
        sample, model_output = as_f32(sample), as_f32(model_output)
        # converted from the uncorrected sample, the one the model saw
        m_t = self._convert(model_output, sample, self.sigmas[i])
        # diffusers tests step_index - 1: disable_corrector=[k] keeps step k's prediction;
        # the first step (0, or img2img's begin index) has no prediction to correct
        if i > 0 and i - 1 not in self.disable_corrector and self._last_sample is not None:
            sample = self._update(self._last_sample, i - 1, self._last_order, m_t)
        self._model_outputs = [*self._model_outputs, m_t][-self.solver_order :]
        order = min(self.solver_order, n - i) if self.lower_order_final else self.solver_order
        order = min(order, self._lower_order_nums + 1)  # warm-up: as many outputs as known
        self._last_sample, self._last_order = sample, order
        prev = self._update(sample, i, order)
        self._lower_order_nums = min(self._lower_order_nums + 1, self.solver_order)
        return as_f32(prev)

    def _convert(
        self, model_output: np.ndarray, sample: np.ndarray, sigma: np.float32
    ) -> np.ndarray:
        """The model output as UniPC integrates it: x0 with predict_x0, else epsilon."""
        alpha_t, sigma_t, _ = self._alpha_sigma_lambda(sigma)
        algorithm = "dpmsolver++" if self.predict_x0 else "dpmsolver"  # x0 or eps, as DPM's
        return _dpm.solver_quantity(
            algorithm, self.prediction_type, model_output, sample, alpha_t, sigma_t
        )

    def _update(
        self, x: np.ndarray, s: int, order: int, model_t: np.ndarray | None = None
    ) -> np.ndarray:
        """UniP-`order` from sigmas[s] to sigmas[s + 1], or with `model_t` (the model
        output at the predicted point) UniC-`order`: diffusers' multistep_uni_p_bh_update
        and multistep_uni_c_bh_update, which differ only in their rhos and last term.

        self._model_outputs[-1] is the output at sigmas[s], [-(k + 1)] the one at s - k.
        """
        ms = self._model_outputs
        m0 = ms[-1]
        alpha_s0, sigma_s0, lambda_s0 = self._alpha_sigma_lambda(self.sigmas[s])
        if self.sigmas[s + 1] == 0:
            # Departure: the last step, to sigma = 0, is order 1 (__init__ rejects the rest)
            # and lands on the data prediction, the h -> inf limit of the update.
            # diffusers evaluates the formula at h = inf and gets it only for bh2 with
            # predict_x0; bh1 (B(h) * 0 = -inf * 0) and predict_x0=False (0 * inf) give NaN.
            return m0.copy() if self.predict_x0 else (x - sigma_s0 * m0) / alpha_s0
        if self.sigmas[s + 1] == self.sigmas[s]:
            # h = 0 (Karras sigmas with final "sigma_min" repeat the last sigma): the update
            # is the identity. diffusers gets x as well, through 0/0 = NaN coefficients that
            # orders 1-2 do not use; at order 3 (lower_order_final=False) they give NaN.
            return x.copy()
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(self.sigmas[s + 1])
        h = lambda_t - lambda_s0
        rks, d1s = [], []
        for k in range(1, order):
            _, _, lambda_sk = self._alpha_sigma_lambda(self.sigmas[s - k])
            rk = (lambda_sk - lambda_s0) / h
            rks.append(rk)
            d1s.append((ms[-(k + 1)] - m0) / rk)
        rks.append(ONE)
        rks = np.array(rks, dtype=F32)

        hh = -h if self.predict_x0 else h
        h_phi_1 = np.expm1(hh)  # h phi_1(h) = e^h - 1
        h_phi_k = h_phi_1 / hh - ONE
        b_h = hh if self.solver_type == "bh1" else np.expm1(hh)
        rows, b, factorial = [], [], 1
        for k in range(1, order + 1):
            rows.append(rks ** (k - 1))
            b.append(h_phi_k * F32(factorial) / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - F32(1 / factorial)
        r_mat, b = np.stack(rows), np.array(b, dtype=F32)

        if self.predict_x0:
            base = (sigma_t / sigma_s0) * x - (alpha_t * h_phi_1) * m0
            coef = alpha_t * b_h
        else:
            base = (alpha_t / alpha_s0) * x - (sigma_t * h_phi_1) * m0
            coef = sigma_t * b_h
        if model_t is None:  # predictor
            if not d1s:
                return base
            # order 2 uses the simplified rho = 1/2, as diffusers does
            rhos = [F32(0.5)] if order == 2 else np.linalg.solve(r_mat[:-1, :-1], b[:-1])
            return base - coef * _weighted(rhos, d1s)
        rhos_c = [F32(0.5)] if order == 1 else np.linalg.solve(r_mat, b)  # corrector
        res = rhos_c[-1] * (model_t - m0)
        if d1s:
            res = _weighted(rhos_c[:-1], d1s) + res
        return base - coef * res


def _weighted(rhos: Any, d1s: list[np.ndarray]) -> np.ndarray:
    """sum_k rhos[k] * d1s[k] (diffusers' einsum "k,bkc...->bc...")."""
    total = rhos[0] * d1s[0]
    for rho, d1 in zip(rhos[1:], d1s[1:], strict=True):
        total = total + rho * d1
    return total
