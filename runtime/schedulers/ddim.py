"""DDIMScheduler: deterministic DDIM (eta = 0), as diffusers implements it.

Song, Meng & Ermon, "Denoising Diffusion Implicit Models" (arXiv:2010.02502), eq. 12
with sigma_t = 0: predict x0 and eps, then re-noise x0 to the previous alpha-bar along the
predicted eps. Port of diffusers.DDIMScheduler (scheduling_ddim.py), including its quirk
of stepping back a fixed num_train_timesteps // num_inference_steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._common import (
    F32,
    ONE,
    AlphaBarNoise,
    alphas_cumprod_f32,
    as_f32,
    check_step,
    check_steppable,
    check_steps,
    choice,
    reject_args,
    reject_non_default,
    spaced_timesteps,
)


class DDIMScheduler(AlphaBarNoise):
    """diffusers.DDIMScheduler with eta = 0 (the deterministic DDIM sampler)."""

    order = 1
    stochastic = False
    init_noise_sigma = 1.0

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        **config: Any,
    ) -> None:
        name = type(self).__name__
        reject_non_default(name, config, thresholding=False)
        self.prediction_type = choice(
            name, "prediction_type", prediction_type, ("epsilon", "v_prediction")
        )
        self.timestep_spacing = choice(
            name, "timestep_spacing", timestep_spacing, ("linspace", "leading", "trailing")
        )
        self.num_train_timesteps, self.steps_offset = num_train_timesteps, steps_offset
        self.clip_sample, self.clip_sample_range = bool(clip_sample), F32(clip_sample_range)
        self.alphas_cumprod = alphas_cumprod_f32(
            name,
            num_train_timesteps,
            beta_start,
            beta_end,
            beta_schedule,
            trained_betas,
            rescale_betas_zero_snr,
        )
        # alpha-bar "before" t=0: 1 (clean) or, for SD, the first training value
        self.final_alpha_cumprod = ONE if set_alpha_to_one else self.alphas_cumprod[0]
        self._t = np.arange(num_train_timesteps - 1, -1, -1, dtype=np.int64)
        self.timesteps = self._t.astype(F32)
        self.num_inference_steps: int | None = None

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        mu: float | None = None,
        sigmas: np.ndarray | None = None,
    ) -> None:
        reject_args(type(self).__name__, mu=mu, sigmas=sigmas)
        n_train, n = self.num_train_timesteps, num_inference_steps
        check_steps(n, n_train)
        check_steppable(self.timestep_spacing, n_train, n, self.steps_offset)
        self.num_inference_steps = n
        t = spaced_timesteps(self.timestep_spacing, n_train, n, self.steps_offset)
        self._t = (t.round() if self.timestep_spacing == "linspace" else t).astype(np.int64)
        self.timesteps = self._t.astype(F32)
        self._new_schedule()

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        return as_f32(sample)  # DDIM's denoiser input is the sample itself

    def step(self, model_output: np.ndarray, step_index: int, sample: np.ndarray) -> np.ndarray:
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        check_step(type(self).__name__, step_index, len(self.timesteps))
        sample, model_output = as_f32(sample), as_f32(model_output)
        t = int(self._t[step_index])
        # diffusers steps back by n_train // n for every spacing, even where the next
        # scheduled timestep differs ("trailing", "linspace"); we keep that quirk
        prev_t = t - self.num_train_timesteps // self.num_inference_steps
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        sqrt_a, sqrt_b = np.sqrt(a_t), np.sqrt(ONE - a_t)
        if self.prediction_type == "epsilon":
            pred_x0, pred_eps = (sample - sqrt_b * model_output) / sqrt_a, model_output
        else:  # v_prediction
            pred_x0 = sqrt_a * sample - sqrt_b * model_output
            pred_eps = sqrt_a * model_output + sqrt_b * sample
        if self.clip_sample:
            pred_x0 = np.clip(pred_x0, -self.clip_sample_range, self.clip_sample_range)
        # eq. 12 of Song et al. with sigma_t = 0
        return np.sqrt(a_prev) * pred_x0 + np.sqrt(ONE - a_prev) * pred_eps
