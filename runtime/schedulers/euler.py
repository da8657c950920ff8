"""EulerDiscreteScheduler: the SD1.5/SDXL default sampler, as diffusers implements it.

Euler's method on the probability-flow ODE in the variance-exploding parametrisation
x = x0 + sigma * eps (Karras et al., "Elucidating the Design Space of Diffusion-Based
Generative Models", arXiv:2206.00364, Algorithm 2 with s_churn = 0, i.e. deterministic),
optionally on their rho = 7 sigma schedule (`use_karras_sigmas`), or on exponential or Beta
sigmas (`use_exponential_sigmas`, `use_beta_sigmas`: _sigmas.py). Port of
diffusers.EulerDiscreteScheduler (scheduling_euler_discrete.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._common import (
    F32,
    ONE,
    SigmaNoise,
    alphas_cumprod_f32,
    as_f32,
    check_step,
    choice,
    reject_args,
    sigma_to_t,
    spaced_timesteps,
)
from ._sigmas import converted_sigmas, sigma_schedule


class EulerDiscreteScheduler(SigmaNoise):
    """diffusers.EulerDiscreteScheduler (the SD1.5/SDXL default), deterministic (s_churn=0)."""

    order = 1
    stochastic = False

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        prediction_type: str = "epsilon",
        interpolation_type: str = "linear",
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
        timestep_type: str = "discrete",
        **config: Any,
    ) -> None:
        name = type(self).__name__
        choice(name, "timestep_type", timestep_type, ("discrete", "continuous"))
        self.prediction_type = choice(
            name, "prediction_type", prediction_type, ("epsilon", "v_prediction")
        )
        choice(name, "interpolation_type", interpolation_type, ("linear",))
        self.timestep_spacing = choice(
            name, "timestep_spacing", timestep_spacing, ("linspace", "leading", "trailing")
        )
        self.final_sigmas_type = choice(
            name, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min")
        )
        self.num_train_timesteps, self.steps_offset = num_train_timesteps, steps_offset
        # "continuous" (CosXL-style v-prediction models): the denoiser's timestep is
        # 0.25 log sigma, EDM's c_noise; diffusers applies it to v-prediction only
        self._continuous = timestep_type == "continuous" and prediction_type == "v_prediction"
        self.sigma_schedule = sigma_schedule(
            name, use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas
        )
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        ac = alphas_cumprod_f32(
            name,
            num_train_timesteps,
            beta_start,
            beta_end,
            beta_schedule,
            trained_betas,
            rescale_betas_zero_snr,
        )
        if rescale_betas_zero_snr:
            ac[-1] = 2**-24  # diffusers keeps sigma_max finite this way
        self.alphas_cumprod = ac
        self._train_sigmas = np.sqrt((ONE - ac) / ac)  # float32, ascending in t
        # before set_timesteps diffusers exposes the full training schedule; so do we
        self.sigmas = np.concatenate([self._train_sigmas[::-1], [0]]).astype(F32)
        self.timesteps = np.arange(num_train_timesteps - 1, -1, -1, dtype=F32)
        if self._continuous:
            self.timesteps = (F32(0.25) * np.log(self.sigmas[:-1])).astype(F32)
        self.num_inference_steps: int | None = None

    @property
    def init_noise_sigma(self) -> float:
        max_sigma = self.sigmas.max()
        if self.timestep_spacing in ("linspace", "trailing"):
            return float(max_sigma)
        return float(np.sqrt(max_sigma * max_sigma + ONE))

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        mu: float | None = None,
        sigmas: np.ndarray | None = None,
    ) -> None:
        """`sigmas`: custom descending schedule *including* its final value (diffusers)."""
        reject_args(type(self).__name__, mu=mu)
        log_sigmas = np.log(self._train_sigmas)
        if sigmas is not None:
            sig = np.asarray(sigmas).astype(F32)
            timesteps = sigma_to_t(sig[:-1], log_sigmas)
        else:
            if num_inference_steps is None:
                raise ValueError("pass num_inference_steps or sigmas")
            timesteps = spaced_timesteps(
                self.timestep_spacing,
                self.num_train_timesteps,
                num_inference_steps,
                self.steps_offset,
            ).astype(F32)
            # float32 timesteps into float64 interpolation, exactly as diffusers does
            sig = np.interp(timesteps, np.arange(len(self._train_sigmas)), self._train_sigmas)
            if self.sigma_schedule:
                ends = float(sig[-1]), float(sig[0])
                bounds = self.sigma_min, self.sigma_max
                sig = converted_sigmas(self.sigma_schedule, *ends, num_inference_steps, *bounds)
                timesteps = sigma_to_t(sig, log_sigmas)
            last = self._train_sigmas[0] if self.final_sigmas_type == "sigma_min" else 0.0
            sig = np.concatenate([sig, [last]]).astype(F32)
        self.sigmas = sig
        self.timesteps = timesteps.astype(F32)
        if self._continuous:
            self.timesteps = (F32(0.25) * np.log(sig[:-1])).astype(F32)
        self.num_inference_steps = len(self.timesteps)
        self._new_schedule()

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        """x / sqrt(sigma^2 + 1): the denoiser was trained on unit-variance inputs."""
        check_step(type(self).__name__, step_index, len(self.timesteps))
        sigma = self.sigmas[step_index]
        return as_f32(sample) / np.sqrt(sigma * sigma + ONE)

    def step(self, model_output: np.ndarray, step_index: int, sample: np.ndarray) -> np.ndarray:
        check_step(type(self).__name__, step_index, len(self.timesteps))
        return as_f32(self._euler(model_output, step_index, sample, self.sigmas[step_index + 1]))

    def _euler(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, sigma_next: float
    ) -> np.ndarray:
        """One Euler step from sigmas[step_index] down to `sigma_next`, in float64."""
        # float64 here (diffusers: float32): from zero-SNR's sigma_max = 4096 the first step
        # cancels 4096-scale terms into a ~30-scale result, where float32 rounding alone is
        # ~5e-6 relative; in float64 the only difference left is diffusers' own rounding
        sample = np.asarray(sample, dtype=np.float64)
        model_output = np.asarray(model_output, dtype=np.float64)
        sigma, sigma_next = float(self.sigmas[step_index]), float(sigma_next)
        if self.prediction_type == "epsilon":
            pred_x0 = sample - sigma * model_output
        else:  # v_prediction, rewritten for the variance-exploding parametrisation
            pred_x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        derivative = (sample - pred_x0) / sigma
        return sample + derivative * (sigma_next - sigma)
