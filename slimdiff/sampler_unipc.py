"""A stateless torch sampler for UniPC (Zhao et al. 2023, arXiv:2302.04867).

diffusers.UniPCMultistepScheduler.step, as `slimdiff.sampler` explains: each step first
corrects the sample it was given with UniC (the previous step's start, the history and
this step's model output), then predicts the next sample with UniP. The state carries
what diffusers keeps on the scheduler: the converted model outputs (`x0`, whatever
`predict_x0` makes them), the corrected sample the last prediction started from
(`start`) and that prediction's order (`order`), so EcoDiff's backward walk carries
gradients through all of them (`SamplerState.tensors`).

The solver's coefficients depend only on the schedule: computed on the CPU in diffusers'
float32 expressions the first time a (step, order) needs them, kept on the device.

One departure, the same as the numpy port's (runtime/schedulers/unipc.py): a step to
sigma = 0 returns the data prediction, the h -> inf limit of the update, where diffusers
evaluates the formula at h = inf (the same value for bh2 with predict_x0, the hub
configs; NaN for bh1 or predict_x0=False), and a step with h = 0 is the identity.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from slimdiff.sampler import (
    _PREDICTIONS,
    Coefficients,
    SamplerState,
    Tensor,
    TorchSampler,
    _alpha_sigma_lambda,
)

__all__ = ["UniPCSampler"]


class UniPCSampler(TorchSampler):
    """diffusers.UniPCMultistepScheduler.step: UniC then UniP, bh1/bh2, any order."""

    supported: ClassVar = {
        "prediction_type": (*_PREDICTIONS, "sample"),
        "solver_type": ("bh2", "bh1"),
        "thresholding": (False,),
        "solver_p": (None,),
        "use_flow_sigmas": (False,),
    }

    def __init__(self, scheduler: Any, device: str | torch.device | None = None) -> None:
        super().__init__(scheduler, device)
        self._sigmas = scheduler.sigmas.cpu()  # the schedule, float32, one more than steps
        self._solved: dict[tuple[int, int, bool], Coefficients] = {}
        self.predict_x0 = bool(self.config["predict_x0"])

    def _coefficients(self, scheduler: Any, i: int) -> Coefficients:
        alpha, sigma, _ = _alpha_sigma_lambda(scheduler.sigmas[i])
        return {"alpha": alpha, "sigma": sigma}  # convert_model_output's

    def _convert(self, model_output: Tensor, sample: Tensor, c: Coefficients) -> Tensor:
        """The model output as UniPC integrates it: x0 with predict_x0, else epsilon."""
        kind = self.config["prediction_type"]
        if self.predict_x0:
            if kind == "epsilon":
                return (sample - c["sigma"] * model_output) / c["alpha"]
            if kind == "sample":
                return model_output
            return c["alpha"] * sample - c["sigma"] * model_output
        if kind == "epsilon":
            return model_output
        if kind == "sample":
            return (sample - c["alpha"] * model_output) / c["sigma"]
        return c["alpha"] * model_output + c["sigma"] * sample

    def step(
        self, model_output: Tensor, step_index: int, sample: Tensor, state: SamplerState
    ) -> tuple[Tensor, SamplerState]:
        i, c = self._multistep_row(step_index, state, "UniPC")
        m_t = self._convert(model_output, sample, c)
        corrects = i > 0 and (i - 1) not in self.config["disable_corrector"]
        if corrects and state.start is not None and state.x0:
            sample = self._update(state.start, i - 1, state.order, state.x0, m_t)
        order = self.config["solver_order"]
        history = (*state.x0, m_t)[-order:]
        if self.config["lower_order_final"]:
            order = min(order, self.num_steps - i)
        order = min(order, len(state.x0) + 1)  # warm-up: as many outputs as known
        prev = self._update(sample, i, order, history)
        return prev, SamplerState(history, i + 1, start=sample, order=order, noise=state.noise)

    def _update(
        self,
        x: Tensor,
        s: int,
        order: int,
        history: tuple[Tensor, ...],
        model_t: Tensor | None = None,
    ) -> Tensor:
        """UniP-`order` from sigmas[s] to sigmas[s + 1], or UniC-`order` with `model_t`
        (diffusers' multistep_uni_p_bh_update / multistep_uni_c_bh_update)."""
        m0 = history[-1]
        if self._sigmas[s + 1] == 0:  # departure (module docstring): the data prediction
            if self.predict_x0:
                return m0
            c = self._row(s)
            return ((x - c["sigma"] * m0) / c["alpha"]).to(x.dtype)
        if self._sigmas[s + 1] == self._sigmas[s]:
            return x  # h = 0: the identity
        c = self._solve(s, order, model_t is not None)
        base = c["a_x"] * x - c["a_m"] * m0
        d1s = [(history[-(k + 1)] - m0) / c["rk"][k - 1] for k in range(1, order)]
        rhos = c["rhos"].to(x.dtype)
        if model_t is None:  # predictor
            if not d1s:
                return base.to(x.dtype)
            res = torch.einsum("k,bkc...->bc...", rhos, torch.stack(d1s, dim=1))
            return (base - c["coef"] * res).to(x.dtype)
        res = rhos[-1] * (model_t - m0)  # corrector
        if d1s:
            res = torch.einsum("k,bkc...->bc...", rhos[:-1], torch.stack(d1s, dim=1)) + res
        return (base - c["coef"] * res).to(x.dtype)

    def _solve(self, s: int, order: int, corrector: bool) -> Coefficients:
        key = (s, order, corrector)
        if key not in self._solved:
            self._solved[key] = {
                k: v.to(self.device) for k, v in self._solve_cpu(s, order, corrector).items()
            }
        return self._solved[key]

    def _solve_cpu(self, s: int, order: int, corrector: bool) -> Coefficients:
        """The step's scalars and rhos, in diffusers' float32 expressions."""
        sig = self._sigmas
        alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(sig[s + 1])
        alpha_s0, sigma_s0, lambda_s0 = _alpha_sigma_lambda(sig[s])
        h = lambda_t - lambda_s0
        rks = [(_alpha_sigma_lambda(sig[s - k])[2] - lambda_s0) / h for k in range(1, order)]
        rks_all = torch.stack([*rks, torch.ones(())])
        hh = -h if self.predict_x0 else h
        h_phi_1 = torch.expm1(hh)  # h phi_1(h) = e^h - 1
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if self.config["solver_type"] == "bh1" else torch.expm1(hh)
        rows, b, factorial = [], [], 1
        for k in range(1, order + 1):
            rows.append(torch.pow(rks_all, k - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        r_mat, b = torch.stack(rows), torch.stack(b)
        if corrector:
            rhos = torch.ones(1) * 0.5 if order == 1 else torch.linalg.solve(r_mat, b)
        elif order == 2:  # diffusers' simplified rho
            rhos = torch.ones(1) * 0.5
        elif order > 2:
            rhos = torch.linalg.solve(r_mat[:-1, :-1], b[:-1])
        else:
            rhos = torch.zeros(0)  # order 1: no history term
        if self.predict_x0:
            a_x, a_m, coef = sigma_t / sigma_s0, alpha_t * h_phi_1, alpha_t * b_h
        else:
            a_x, a_m, coef = alpha_t / alpha_s0, sigma_t * h_phi_1, sigma_t * b_h
        rk = torch.stack(rks) if rks else torch.zeros(0)
        return {"a_x": a_x, "a_m": a_m, "coef": coef, "rk": rk, "rhos": rhos}
