"""Stateless torch samplers whose steps are two denoiser calls: Heun, DPM2, flow Heun.

diffusers.HeunDiscreteScheduler, KDPM2DiscreteScheduler and FlowMatchHeunDiscreteScheduler,
as `slimdiff.sampler` explains (the numpy ports: runtime/schedulers/heun.py, kdpm2.py,
flow_match_heun.py). A core module, like slimdiff/sampler.py.
"""

from __future__ import annotations

from typing import Any, ClassVar

from slimdiff.sampler import (
    _PREDICTIONS,
    Coefficients,
    SamplerState,
    Tensor,
    TorchSampler,
)

__all__ = ["TWO_CALL_SAMPLERS"]


class _TwoCallSampler(TorchSampler):
    """What Heun and DPM2 share: each step but the last is two calls, the first an Euler
    step, the second finishing it from the first's sample (`start` in the state). Per call:
    the sigma the output is read at (`sigma_in`), the dt it steps with, the input scale.
    In the inputs' dtype, as diffusers (no upcast); diffusers' VE x0 expressions."""

    name: ClassVar[str]

    @staticmethod
    def _call(sigma_in: Tensor, dt: Tensor, scale: Tensor) -> Coefficients:
        return {
            "sigma_in": sigma_in,
            "dt": dt,
            "in_scale": (scale**2 + 1) ** 0.5,
            "c_out": -sigma_in / (sigma_in**2 + 1) ** 0.5,
            "c_skip": sigma_in**2 + 1,
        }

    def scale_model_input(self, sample: Tensor, step_index: int) -> Tensor:
        return sample / self._row(step_index)["in_scale"]

    def _slope(self, model_output: Tensor, sample: Tensor, c: Coefficients) -> Tensor:
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            pred_x0 = sample - c["sigma_in"] * model_output
        elif kind == "v_prediction":
            pred_x0 = model_output * c["c_out"] + (sample / c["c_skip"])
        else:  # sample
            pred_x0 = model_output
        if self.config.get("clip_sample"):  # Heun's option; DPM2 has none
            r = self.config["clip_sample_range"]
            pred_x0 = pred_x0.clamp(-r, r)
        return (sample - pred_x0) / c["sigma_in"]

    def _second_half(self, i: int, has_state: bool) -> None:
        if not has_state:
            raise ValueError(
                f"{self.name} call {i} is a second half: it needs call {i - 1}'s state"
            )


class _HeunSampler(_TwoCallSampler):
    """diffusers.HeunDiscreteScheduler.step (gamma 0): even calls an Euler step from
    sigmas[k] to sigmas[k + 1]; odd calls (at sigmas[k]) redo it from the first half's
    sample with the mean of both slopes (the first half's in the state's `eps`)."""

    supported: ClassVar = {"prediction_type": (*_PREDICTIONS, "sample")}
    name = "Heun"

    def _coefficients(self, scheduler: Any, i: int) -> Coefficients:
        s = scheduler.sigmas
        if i % 2 == 0:
            sigma_hat = s[i] * (0 + 1)  # gamma 0
            return self._call(sigma_hat, s[i + 1] - sigma_hat, s[i])
        # the second half runs at the first half's target, with its dt
        return self._call(s[i], s[i] - s[i - 1] * (0 + 1), s[i])

    def step(
        self, model_output: Tensor, step_index: int, sample: Tensor, state: SamplerState
    ) -> tuple[Tensor, SamplerState]:
        i, c = self._multistep_row(step_index, state, self.name)
        slope = self._slope(model_output, sample, c)
        if i % 2 == 0:
            after = SamplerState(step_index=i + 1, eps=(slope,), start=sample, noise=state.noise)
            return sample + slope * c["dt"], after
        self._second_half(i, state.start is not None and bool(state.eps))
        slope = (state.eps[-1] + slope) / 2
        return state.start + slope * c["dt"], SamplerState(noise=state.noise)


class _KDPM2Sampler(_TwoCallSampler):
    """diffusers.KDPM2DiscreteScheduler.step (gamma 0): even calls an Euler half step from
    sigmas[k] to the geometric midpoint; odd calls (at the midpoint) the whole step from the
    first half's sample with the midpoint's slope."""

    supported: ClassVar = {"prediction_type": _PREDICTIONS}
    name = "DPM2"

    def _coefficients(self, scheduler: Any, i: int) -> Coefficients:
        s, mid = scheduler.sigmas, scheduler.sigmas_interpol
        if i % 2 == 0:
            sigma_hat = s[i] * (0 + 1)  # gamma 0
            return self._call(sigma_hat, mid[i + 1] - sigma_hat, s[i])
        return self._call(mid[i], s[i] - s[i - 1] * (0 + 1), mid[i])  # the whole step's dt

    def step(
        self, model_output: Tensor, step_index: int, sample: Tensor, state: SamplerState
    ) -> tuple[Tensor, SamplerState]:
        i, c = self._multistep_row(step_index, state, self.name)
        slope = self._slope(model_output, sample, c)
        if i % 2 == 0:
            after = SamplerState(step_index=i + 1, start=sample, noise=state.noise)
            return sample + slope * c["dt"], after
        self._second_half(i, state.start is not None)
        return state.start + slope * c["dt"], SamplerState(noise=state.noise)


class _FlowHeunSampler(_HeunSampler):
    """diffusers.FlowMatchHeunDiscreteScheduler.step (SD3, gamma 0): Heun's steps on the
    rectified flow, the velocity read as diffusers reads it (x0 = x - v sigma, the slope
    (x - x0) / sigma), the denoiser's input unscaled."""

    supported: ClassVar = {}
    name = "flow-match Heun"

    @staticmethod
    def _call(sigma_in: Tensor, dt: Tensor, scale: Tensor) -> Coefficients:
        return {"sigma_in": sigma_in, "dt": dt, "in_scale": scale * 0 + 1}

    def _slope(self, model_output: Tensor, sample: Tensor, c: Coefficients) -> Tensor:
        return (sample - (sample - model_output * c["sigma_in"])) / c["sigma_in"]


TWO_CALL_SAMPLERS: dict[str, type[TorchSampler]] = {
    "HeunDiscreteScheduler": _HeunSampler,
    "KDPM2DiscreteScheduler": _KDPM2Sampler,
    "FlowMatchHeunDiscreteScheduler": _FlowHeunSampler,
}
