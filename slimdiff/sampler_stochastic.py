"""Stateless torch samplers that add noise at each step: Euler ancestral, LCM and TCD.

diffusers.EulerAncestralDiscreteScheduler (SDXL-Turbo's), diffusers.LCMScheduler and
diffusers.TCDScheduler (with eta > 0), as `slimdiff.sampler` explains; the noise comes
from the state's `StepNoise`. A core module, like slimdiff/sampler.py.
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
    _EulerSampler,
    _vp_x0,
)

__all__ = ["STOCHASTIC_SAMPLERS", "TCDSampler"]


class _EulerAncestralSampler(_EulerSampler):
    """diffusers.EulerAncestralDiscreteScheduler.step: an Euler step down to sigma_down, then
    noise of std sigma_up (Karras et al. 2022's ancestral sampling, eta = 1). diffusers draws
    that noise at every step, the last too (where sigma_up is 0), in the output's dtype."""

    stochastic = True

    def _coefficients(self, scheduler: Any, i: int) -> Coefficients:
        sigma_from, sigma_to = scheduler.sigmas[i], scheduler.sigmas[i + 1]
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        euler = super()._coefficients(scheduler, i)
        return {**euler, "dt": sigma_down - sigma_from, "up": sigma_up}

    def step(
        self, model_output: Tensor, step_index: int, sample: Tensor, state: SamplerState
    ) -> tuple[Tensor, SamplerState]:
        c = self._row(step_index)
        prev = self._euler(model_output, c, sample)  # down to sigma_down
        prev = prev + self._noise(state, step_index, model_output) * c["up"]
        return prev.to(model_output.dtype), SamplerState(noise=state.noise)


class _LCMSampler(TorchSampler):
    """diffusers.LCMScheduler.step (Luo et al. 2023, arXiv:2310.04378, Algorithm 3): the
    consistency function's clean estimate f = c_out * x0 + c_skip * x, then noised again to
    the next timestep with fresh noise, except after the last step; no upcast, as diffusers."""

    supported: ClassVar = {"prediction_type": (*_PREDICTIONS, "sample"), "thresholding": (False,)}
    stochastic = True

    def _coefficients(self, scheduler: Any, i: int) -> Coefficients:
        t = scheduler.timesteps[i]
        prev_t = scheduler.timesteps[i + 1] if i + 1 < len(scheduler.timesteps) else t
        a_t = scheduler.alphas_cumprod[t]
        a_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        return {
            "sqrt_a": a_t.sqrt(),
            "sqrt_b": (1 - a_t).sqrt(),
            "c_skip": c_skip,
            "c_out": c_out,
            "sqrt_a_prev": a_prev.sqrt(),
            "sqrt_b_prev": (1 - a_prev).sqrt(),
        }

    def step(
        self, model_output: Tensor, step_index: int, sample: Tensor, state: SamplerState
    ) -> tuple[Tensor, SamplerState]:
        c = self._row(step_index)
        denoised = c["c_out"] * _vp_x0(self.config, model_output, sample, c) + c["c_skip"] * sample
        if step_index == self.num_steps - 1:  # diffusers draws no noise after the last step
            return denoised, SamplerState(noise=state.noise)
        noise = self._noise(state, step_index, denoised)
        prev = c["sqrt_a_prev"] * denoised + c["sqrt_b_prev"] * noise
        return prev, SamplerState(noise=state.noise)


class TCDSampler(TorchSampler):
    """diffusers.TCDScheduler.step (Zheng et al. 2024, arXiv:2402.19159, Algorithm 4): x_t
    to x_s on its trajectory, s = floor((1 - eta) t_prev), then noised forward to t_prev
    with fresh noise when eta > 0, except after the last step. `eta` (TCD's gamma) is what
    the pipeline passed its step: 0, diffusers' pipeline default, is deterministic."""

    supported: ClassVar = {"prediction_type": (*_PREDICTIONS, "sample")}
    takes_eta = True

    def __init__(self, scheduler: Any, device: Any = None, eta: float = 0.0) -> None:
        if not 0 <= eta <= 1:
            raise ValueError(f"eta (TCD's gamma) must be in 0..1, not {eta}")
        self.eta = float(eta)
        self.stochastic = self.eta > 0
        super().__init__(scheduler, device)

    def _coefficients(self, scheduler: Any, i: int) -> Coefficients:
        timesteps = scheduler.timesteps
        prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else torch.tensor(0)
        s = torch.floor((1 - self.eta) * prev_t).to(dtype=torch.long)
        a_t, a_s = scheduler.alphas_cumprod[timesteps[i]], scheduler.alphas_cumprod[s]
        a_prev = scheduler.alphas_cumprod[prev_t]
        return {
            "sqrt_a": a_t.sqrt(),
            "sqrt_b": (1 - a_t).sqrt(),
            "sqrt_a_s": a_s.sqrt(),
            "sqrt_b_s": (1 - a_s).sqrt(),
            "ratio": a_prev / a_s,
        }

    def step(
        self, model_output: Tensor, step_index: int, sample: Tensor, state: SamplerState
    ) -> tuple[Tensor, SamplerState]:
        c = self._row(step_index)
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            x0 = (sample - c["sqrt_b"] * model_output) / c["sqrt_a"]
            eps = model_output
        elif kind == "sample":
            x0 = model_output
            eps = (sample - c["sqrt_a"] * x0) / c["sqrt_b"]
        else:  # v_prediction
            x0 = c["sqrt_a"] * sample - c["sqrt_b"] * model_output
            eps = c["sqrt_a"] * model_output + c["sqrt_b"] * sample
        x_s = c["sqrt_a_s"] * x0 + c["sqrt_b_s"] * eps
        if not self.stochastic or step_index == self.num_steps - 1:
            return x_s, SamplerState(noise=state.noise)
        noise = self._noise(state, step_index, x_s)
        prev = c["ratio"].sqrt() * x_s + (1 - c["ratio"]).sqrt() * noise
        return prev, SamplerState(noise=state.noise)


STOCHASTIC_SAMPLERS: dict[str, type[TorchSampler]] = {
    "EulerAncestralDiscreteScheduler": _EulerAncestralSampler,
    "LCMScheduler": _LCMSampler,
    "TCDScheduler": TCDSampler,
}
