"""Stateless torch samplers for the EDM schedulers (Karras et al. 2022, arXiv:2206.00364).

Playground v2.5-style SDXL ships EDMDPMSolverMultistepScheduler: the UNet takes
c_noise = log(sigma) / 4 as its timestep (diffusers' `timesteps`, read as they are), its
input is scaled by c_in = 1 / sqrt(sigma^2 + sigma_data^2), and its output is
preconditioned into a data prediction, c_skip * x + c_out * F(x). The numpy ports
(runtime/schedulers/edm_*.py) document the same maths; these follow diffusers' torch
expressions, as `slimdiff.sampler` explains. A core module, like slimdiff/sampler.py.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from slimdiff.sampler import (
    _EMPTY,
    _PREDICTIONS,
    Coefficients,
    SamplerState,
    Tensor,
    TorchSampler,
    _DPMSolverSampler,
    _upcast,
)

__all__ = ["EDM_SAMPLERS"]


class _EDMPreconditioning:
    """diffusers' EDM precondition_inputs / precondition_outputs for a 0-d sigma tensor."""

    config: dict[str, Any]

    def _c_in(self, sigma: Tensor) -> Tensor:
        return 1 / ((sigma**2 + self.config["sigma_data"] ** 2) ** 0.5)

    def _denoised(self, sample: Tensor, model_output: Tensor, sigma: Tensor) -> Tensor:
        sigma_data = self.config["sigma_data"]
        c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
        c_out = sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
        if self.config["prediction_type"] == "v_prediction":
            c_out = -sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
        return c_skip * sample + c_out * model_output


class _EDMEulerSampler(_EDMPreconditioning, TorchSampler):
    """diffusers.EDMEulerScheduler.step with s_churn = 0 (the pipelines' call: deterministic)."""

    supported: ClassVar = {"prediction_type": _PREDICTIONS}

    def _coefficients(self, scheduler: Any, i: int) -> Coefficients:
        sigma = scheduler.sigmas[i]
        sigma_hat = sigma * (0.0 + 1)  # diffusers' sigma * (gamma + 1), gamma 0 without churn
        return {
            "sigma_hat": sigma_hat,
            "c_in": self._c_in(sigma),
            "dt": scheduler.sigmas[i + 1] - sigma_hat,
        }

    def scale_model_input(self, sample: Tensor, step_index: int) -> Tensor:
        return sample * self._row(step_index)["c_in"]

    def step(
        self, model_output: Tensor, step_index: int, sample: Tensor, state: SamplerState
    ) -> tuple[Tensor, SamplerState]:
        c = self._row(step_index)
        sample = _upcast(sample)
        pred_x0 = self._denoised(sample, model_output, c["sigma_hat"])
        derivative = (sample - pred_x0) / c["sigma_hat"]
        return (sample + derivative * c["dt"]).to(model_output.dtype), _EMPTY


class _EDMDPMSolverSampler(_EDMPreconditioning, _DPMSolverSampler):
    """diffusers.EDMDPMSolverMultistepScheduler.step, "dpmsolver++" or "sde-dpmsolver++",
    order 1 or 2: the VP solver's update with alpha_t = 1 and sigma_t = sigma (the inputs
    are scaled before the UNet), no upcast, the noise drawn in the output's dtype."""

    # `supported`: the VP solver's (the EDM config lacks its VP-only keys: they default)
    upcast = False

    def _alpha_sigma_lambda(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        alpha_t = torch.tensor(1)  # diffusers' _sigma_to_alpha_sigma_t
        return alpha_t, sigma, torch.log(alpha_t) - torch.log(sigma)

    def _coefficients(self, scheduler: Any, i: int) -> Coefficients:
        sigma = scheduler.sigmas[i]
        return {**super()._coefficients(scheduler, i), "sigma": sigma, "c_in": self._c_in(sigma)}

    def scale_model_input(self, sample: Tensor, step_index: int) -> Tensor:
        return sample * self._row(step_index)["c_in"]

    def _data_prediction(self, model_output: Tensor, sample: Tensor, c: Coefficients) -> Tensor:
        return self._denoised(sample, model_output, c["sigma"])


EDM_SAMPLERS: dict[str, type[TorchSampler]] = {
    "EDMEulerScheduler": _EDMEulerSampler,
    "EDMDPMSolverMultistepScheduler": _EDMDPMSolverSampler,
}
