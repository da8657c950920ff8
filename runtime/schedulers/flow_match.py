"""FlowMatchEulerDiscreteScheduler (SD3, FLUX); FLUX's `calculate_shift` is in models/kinds.py.

Euler on the rectified-flow ODE dx/dsigma = v (Lipman et al., "Flow Matching for
Generative Modeling", arXiv:2210.02747), with SD3's static timestep shift (Esser et al.,
"Scaling Rectified Flow Transformers", arXiv:2403.03206, section 5.3.2) and FLUX's
resolution-dependent one (`mu`), as diffusers' FlowMatchEulerDiscreteScheduler and its
SD3/FLUX pipelines compute them; after the shift, optionally stretched to end at
`shift_terminal`, then redrawn on Karras, exponential or Beta sigmas between its ends
(_sigmas.py), in diffusers' order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._common import (
    F32,
    FlowNoise,
    as_f32,
    check_step,
    choice,
    reject_non_default,
)
from ._flow import static_shift, stretch_to_terminal, time_shift
from ._sigmas import converted_sigmas, sigma_schedule


class FlowMatchEulerDiscreteScheduler(FlowNoise):
    """diffusers.FlowMatchEulerDiscreteScheduler as SD3 (static shift) and FLUX (mu) use it."""

    order = 1
    stochastic = False
    init_noise_sigma = 1.0  # x_1 is plain N(0, I); the SD3/FLUX pipelines do not scale it

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        shift_terminal: float | None = None,
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        **config: Any,
    ) -> None:
        name = type(self).__name__
        reject_non_default(name, config, invert_sigmas=False, stochastic_sampling=False)
        if shift_terminal is not None and not 0 <= shift_terminal < 1:
            raise ValueError(f"{name}: shift_terminal must be in [0, 1), got {shift_terminal}")
        self.shift_terminal = shift_terminal
        self.sigma_schedule = sigma_schedule(
            name, use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas
        )
        # not keys of this class, but diffusers' converted schedules read them from any
        # config that carries them (one converted from Euler's, say)
        self.sigma_min, self.sigma_max = config.get("sigma_min"), config.get("sigma_max")
        self.time_shift_type = choice(
            name, "time_shift_type", time_shift_type, ("exponential", "linear")
        )
        self.num_train_timesteps, self.shift = num_train_timesteps, shift
        self.use_dynamic_shifting = bool(use_dynamic_shifting)
        # kept for the runtime's calculate_shift call, as pipelines read them from config
        self.base_shift, self.max_shift = base_shift, max_shift
        self.base_image_seq_len, self.max_image_seq_len = base_image_seq_len, max_image_seq_len
        t = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=F32)[::-1]
        sig = t / num_train_timesteps  # float32, as diffusers' torch tensor
        if not self.use_dynamic_shifting:
            sig = static_shift(shift, sig)
        # diffusers derives its default schedule from these *already shifted* ends and
        # then shifts again in set_timesteps; matching it means keeping that
        self._sigma_min, self._sigma_max = float(sig[-1]), float(sig[0])
        self.sigmas = np.concatenate([sig, [0]]).astype(F32)
        self.timesteps = (sig * F32(num_train_timesteps)).astype(F32)
        self.num_inference_steps: int | None = None

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        mu: float | None = None,
        sigmas: np.ndarray | None = None,
    ) -> None:
        """FLUX: sigmas=np.linspace(1, 1/n, n), mu=calculate_shift(...); SD3: just n."""
        if self.use_dynamic_shifting and mu is None:
            raise ValueError("`mu` must be passed when use_dynamic_shifting is True")
        n_train = self.num_train_timesteps
        if sigmas is not None:
            if num_inference_steps is not None and len(sigmas) != num_inference_steps:
                raise ValueError("len(sigmas) must equal num_inference_steps")
            sig = np.asarray(sigmas).astype(F32)
        elif num_inference_steps is None:
            raise ValueError("pass num_inference_steps or sigmas")
        else:  # float64 from here, as in diffusers
            sig = (
                np.linspace(
                    self._sigma_max * n_train, self._sigma_min * n_train, num_inference_steps
                )
                / n_train
            )
        if self.use_dynamic_shifting:
            sig = time_shift(self.time_shift_type, mu, sig)
        else:
            sig = static_shift(self.shift, sig)
        if self.shift_terminal:  # stretch so that the last sigma is shift_terminal
            sig = stretch_to_terminal(sig, self.shift_terminal)
        if self.sigma_schedule:
            ends, bounds = (float(sig[-1]), float(sig[0])), (self.sigma_min, self.sigma_max)
            sig = converted_sigmas(self.sigma_schedule, *ends, len(sig), *bounds)
        sig = sig.astype(F32)
        self.timesteps = sig * F32(n_train)
        self.sigmas = np.concatenate([sig, np.zeros(1, F32)])
        self.num_inference_steps = len(sig)
        self._new_schedule()

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        return as_f32(sample)

    def step(self, model_output: np.ndarray, step_index: int, sample: np.ndarray) -> np.ndarray:
        check_step(type(self).__name__, step_index, len(self.timesteps))
        # x_{t-dt} = x_t + (sigma_next - sigma) * v, with v the predicted velocity
        dt = self.sigmas[step_index + 1] - self.sigmas[step_index]
        return as_f32(sample) + dt * as_f32(model_output)
