"""EulerAncestralDiscreteScheduler: Euler with fresh noise at every step ("Euler a").

The ancestral sampler of Karras et al. (2022, arXiv:2206.00364) as k-diffusion and
diffusers implement it: each step from sigma to sigma' goes deterministically down to
sigma_down = sqrt(sigma'^2 - sigma_up^2) and adds N(0, sigma_up^2) noise, with
sigma_up = sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2), so the marginal noise level
stays sigma'. Port of diffusers.EulerAncestralDiscreteScheduler
(scheduling_euler_ancestral_discrete.py): the schedule is EulerDiscreteScheduler's
without Karras sigmas.

Stochastic: `step` takes the step's standard-normal `noise` (the runtime draws it from
the seed); diffusers draws it from a torch generator, so the same seed gives other images.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._common import F32, as_f32, check_noise, check_step, reject_args
from .euler import EulerDiscreteScheduler


class EulerAncestralDiscreteScheduler(EulerDiscreteScheduler):
    """diffusers.EulerAncestralDiscreteScheduler ("Euler a")."""

    order = 1
    stochastic = True

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        **config: Any,
    ) -> None:
        # Euler's own options (Karras sigmas, final sigma, ...) are not diffusers'
        # EulerAncestral's: keys of a converted Euler config are ignored, as there
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            prediction_type=prediction_type,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        mu: float | None = None,
        sigmas: np.ndarray | None = None,
    ) -> None:
        reject_args(type(self).__name__, sigmas=sigmas)
        super().set_timesteps(num_inference_steps, mu=mu)

    def step(
        self,
        model_output: np.ndarray,
        step_index: int,
        sample: np.ndarray,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        name = type(self).__name__
        check_step(name, step_index, len(self.timesteps))
        check_noise(name, noise, sample)
        # sigma_up/down in float32 as diffusers; the update in float64 as our Euler's step
        sigma, sigma_to = self.sigmas[step_index : step_index + 2]
        sigma_up = np.sqrt(
            sigma_to * sigma_to * (sigma * sigma - sigma_to * sigma_to) / (sigma * sigma)
        )
        sigma_down = np.sqrt(sigma_to * sigma_to - sigma_up * sigma_up)
        x = self._euler(model_output, step_index, sample, sigma_down)
        return as_f32(x + np.asarray(noise, dtype=F32) * sigma_up)
