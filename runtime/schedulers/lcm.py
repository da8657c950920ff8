"""LCMScheduler: multistep consistency sampling for latent consistency models (2-8 steps).

Luo et al., "Latent Consistency Models" (2023, arXiv:2310.04378), Algorithm 3 (multistep
latent consistency sampling): at each timestep the consistency function
f(x, t) = c_skip(t) x + c_out(t) x0_pred(x, t) maps the sample to a clean estimate, which
is re-noised to the next timestep of a skipping schedule drawn from the distillation's
`original_inference_steps` grid (the last step returns the estimate itself). Port of
diffusers.LCMScheduler (scheduling_lcm.py), in float32 as diffusers computes it.

Stochastic: `step` takes the re-noising `noise` (the runtime draws it from the seed);
diffusers draws it from a torch generator, so the same seed gives other images.
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
    check_noise,
    check_step,
    choice,
    reject_args,
    reject_non_default,
)

_SIGMA_DATA = F32(0.5)  # the boundary condition's sigma_data (diffusers hard-codes it too)


class LCMScheduler(AlphaBarNoise):
    """diffusers.LCMScheduler (LCM-distilled models and LCM-LoRA), strength 1."""

    order = 1
    init_noise_sigma = 1.0
    stochastic = True

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: Any = None,
        original_inference_steps: int = 50,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        prediction_type: str = "epsilon",
        timestep_scaling: float = 10.0,
        rescale_betas_zero_snr: bool = False,
        **config: Any,
    ) -> None:
        name = type(self).__name__
        reject_non_default(name, config, thresholding=False)
        # timestep_spacing and steps_offset are in LCM's config but unused by its schedule
        self.prediction_type = choice(
            name, "prediction_type", prediction_type, ("epsilon", "v_prediction", "sample")
        )
        self.num_train_timesteps = num_train_timesteps
        self.original_inference_steps = int(original_inference_steps)
        self.clip_sample, self.clip_sample_range = bool(clip_sample), F32(clip_sample_range)
        self.timestep_scaling = F32(timestep_scaling)
        self.alphas_cumprod = alphas_cumprod_f32(
            name,
            num_train_timesteps,
            beta_start,
            beta_end,
            beta_schedule,
            trained_betas,
            rescale_betas_zero_snr,
        )
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
        n, original = num_inference_steps, self.original_inference_steps
        if not 0 < original <= self.num_train_timesteps:
            raise ValueError(
                f"original_inference_steps {original} must be in 1..{self.num_train_timesteps}"
            )
        if n is None or not 0 < n <= original:
            # the schedule is a subset of the distillation's original_inference_steps grid
            raise ValueError(
                f"num_inference_steps must be in 1..{original} for {type(self).__name__}, got {n}"
            )
        k = self.num_train_timesteps // original
        grid = (np.arange(1, original + 1) * k - 1)[::-1]
        picks = np.floor(np.linspace(0, len(grid), num=n, endpoint=False)).astype(np.int64)
        self._t = grid[picks].astype(np.int64)
        self.timesteps = self._t.astype(F32)
        self.num_inference_steps = n
        self._new_schedule()

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        return as_f32(sample)

    def _start_step(self, step_index: int) -> tuple[int, bool]:
        """(step index, whether it is the last one), once the schedule and index check."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        check_step(type(self).__name__, step_index, len(self._t))
        return step_index, step_index == len(self._t) - 1

    def step(
        self,
        model_output: np.ndarray,
        step_index: int,
        sample: np.ndarray,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        i, last = self._start_step(step_index)
        if not last:
            check_noise(type(self).__name__, noise, sample)
        sample, model_output = as_f32(sample), as_f32(model_output)
        t = int(self._t[i])
        a_t = self.alphas_cumprod[t]
        sqrt_a, sqrt_b = np.sqrt(a_t), np.sqrt(ONE - a_t)
        # the boundary condition's scalings at the scaled timestep (c_skip(0) ~ 1)
        scaled = F32(t) * self.timestep_scaling
        c_skip = _SIGMA_DATA**2 / (scaled * scaled + _SIGMA_DATA**2)
        c_out = scaled / np.sqrt(scaled * scaled + _SIGMA_DATA**2)
        if self.prediction_type == "epsilon":
            pred_x0 = (sample - sqrt_b * model_output) / sqrt_a
        elif self.prediction_type == "v_prediction":
            pred_x0 = sqrt_a * sample - sqrt_b * model_output
        else:  # "sample"
            pred_x0 = model_output
        if self.clip_sample:
            pred_x0 = np.clip(pred_x0, -self.clip_sample_range, self.clip_sample_range)
        denoised = c_out * pred_x0 + c_skip * sample
        if last:
            return as_f32(denoised)
        prev_t = int(self._t[i + 1])
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        noise = np.asarray(noise, dtype=F32)
        return as_f32(np.sqrt(a_prev) * denoised + np.sqrt(ONE - a_prev) * noise)
