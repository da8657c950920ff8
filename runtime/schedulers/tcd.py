"""TCDScheduler: Trajectory Consistency Distillation's strategic stochastic sampling.

Zheng et al., "Trajectory Consistency Distillation" (2024, arXiv:2402.19159), Algorithm 4:
the trajectory consistency function maps x_t to a point x_s on the same trajectory,
s = floor((1 - gamma) * t_prev) (gamma = `eta`), rather than to x_0 as LCM does; x_s is
then re-noised forward to the next timestep t_prev. gamma = 0 is deterministic (x_s =
x_{t_prev}); gamma = 1 is LCM's multistep sampling without its boundary scalings. For
TCD-distilled SDXL/SD1.5 models and TCD-LoRA (the authors suggest gamma 0.3; diffusers'
pipelines pass `eta`, 0 by default). The schedule is LCM's (the pipelines never pass
TCD's own `original_inference_steps` argument). Port of diffusers.TCDScheduler
(scheduling_tcd.py), in float32 as diffusers computes it.

Stochastic when eta > 0: `step` then takes the re-noising `noise` (the runtime draws it
from the seed; diffusers from a torch generator).
"""

from __future__ import annotations

import numpy as np

from ._common import F32, ONE, as_f32, check_noise
from .lcm import LCMScheduler


class TCDScheduler(LCMScheduler):
    """diffusers.TCDScheduler, strength 1; `eta` is its step's gamma (set per run)."""

    order = 1

    def __init__(self, **config) -> None:
        # TCD's config is LCM's, but its step never reads clip_sample or thresholding (nor
        # steps_offset, timestep_spacing: the schedule is LCM's skipping one).
        config.pop("thresholding", None)
        super().__init__(**config)
        self.eta = 0.0

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.eta > 0

    def step(
        self,
        model_output: np.ndarray,
        step_index: int,
        sample: np.ndarray,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        if not 0 <= self.eta <= 1:
            raise ValueError(f"eta (TCD's gamma) must be in 0..1, not {self.eta}")
        i, last = self._start_step(step_index)
        if self.stochastic and not last:
            check_noise(type(self).__name__, noise, sample)
        sample, model_output = as_f32(sample), as_f32(model_output)
        t = int(self._t[i])
        prev_t = 0 if last else int(self._t[i + 1])
        # torch: a Python float times a long tensor is float32, floored back to long
        s = int(np.floor(F32(1 - self.eta) * F32(prev_t)))
        a_t, a_s = self.alphas_cumprod[t], self.alphas_cumprod[s]
        a_prev = self.alphas_cumprod[prev_t]  # prev_t >= 0: final_alpha_cumprod is unused
        sqrt_a, sqrt_b = np.sqrt(a_t), np.sqrt(ONE - a_t)
        if self.prediction_type == "epsilon":
            x0 = (sample - sqrt_b * model_output) / sqrt_a
            eps = model_output
        elif self.prediction_type == "sample":
            x0 = model_output
            eps = (sample - sqrt_a * x0) / sqrt_b
        else:  # "v_prediction"
            x0 = sqrt_a * sample - sqrt_b * model_output
            eps = sqrt_a * model_output + sqrt_b * sample
        x_s = np.sqrt(a_s) * x0 + np.sqrt(ONE - a_s) * eps
        if not self.stochastic or last:
            return as_f32(x_s)
        ratio = a_prev / a_s
        noise = np.asarray(noise, dtype=F32)
        return as_f32(np.sqrt(ratio) * x_s + np.sqrt(ONE - ratio) * noise)
