"""Numpy ports of the diffusers schedulers that slimdiff's torch-free runtime supports.

Each class mirrors the diffusers class of the same name (diffusers 0.42) closely enough
that a whole denoising trajectory agrees with diffusers' float32 torch one to a few 1e-6
of the latent magnitude; tests/unit/test_schedulers.py checks this against diffusers.
The schedule formulas are the easy part; what keeps the two in step is following
diffusers' dtype path: float32 where it computes in float32 torch (betas, alpha-bars,
sigmas, DPM-Solver's coefficients), float64 where it computes in float64 numpy
(interpolation, Karras sigmas, SD3's default flow schedule), float32 numpy where it does
(FLUX's shifted sigmas). Explicit `np.float32` scalars keep numpy 1.x and 2.x alike.

- `EulerDiscreteScheduler`: Euler method of Karras et al., "Elucidating the Design Space of
  Diffusion-Based Generative Models" (2022, arXiv:2206.00364), Algorithm 2 without churn.
- `DDIMScheduler`: Song, Meng & Ermon, "Denoising Diffusion Implicit Models" (2021,
  arXiv:2010.02502), deterministic (eta = 0).
- `DPMSolverMultistepScheduler`: multistep DPM-Solver++ (2M, midpoint or Heun) of Lu et al.,
  "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models"
  (2022, arXiv:2211.01095).
- `FlowMatchEulerDiscreteScheduler`: Euler on the rectified-flow ODE, Lipman et al., "Flow
  Matching for Generative Modeling" (2023, arXiv:2210.02747), with the timestep shift of
  Esser et al., "Scaling Rectified Flow Transformers" (SD3, 2024, arXiv:2403.03206) and
  FLUX's resolution-dependent shift (`mu`: slimdiff.models.kinds.calculate_shift, from
  diffusers' pipeline_flux.py, which the runtime's conditioning computes).

"leading"/"trailing"/"linspace" spacing and zero-terminal-SNR rescaling follow Lin et al.,
"Common Diffusion Noise Schedules and Sample Steps are Flawed" (2024, arXiv:2305.08891);
v-prediction follows Salimans & Ho, "Progressive Distillation" (2022, arXiv:2202.00512).

Unlike diffusers, `scale_model_input` and `step` take the step index explicitly, so no
hidden counter can drift; DPM-Solver++ still keeps its model-output history and requires
steps in order. Only numpy and the standard library are imported (the runtime is torch-free).

Example (the runtime's denoising loop, without guidance):

    sched = scheduler_from_config(json.loads(Path("scheduler/scheduler_config.json").read_text()))
    sched.set_timesteps(30)  # FLUX: set_timesteps(sigmas=np.linspace(1, 1/30, 30), mu=mu)
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(sched.init_noise_sigma)
    for i, t in enumerate(sched.timesteps):
        eps = unet(sched.scale_model_input(x, i), t, cond)
        x = sched.step(eps, i, x)
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from .ddim import DDIMScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .euler import EulerDiscreteScheduler
from .flow_match import FlowMatchEulerDiscreteScheduler

__all__ = [
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "Scheduler",
    "scheduler_from_config",
]


class Scheduler(Protocol):
    """What every scheduler here provides; the runtime's denoising loop uses only this."""

    timesteps: np.ndarray  # what the denoiser receives as `timestep` (float32)
    init_noise_sigma: float  # the initial N(0, I) latent is multiplied by this

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        mu: float | None = None,
        sigmas: np.ndarray | None = None,
    ) -> None: ...

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray: ...

    def step(self, model_output: np.ndarray, step_index: int, sample: np.ndarray) -> np.ndarray:
        """One denoising step from timesteps[step_index]; returns the previous sample."""
        ...


_SCHEDULERS: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        EulerDiscreteScheduler,
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
    )
}


def scheduler_from_config(config: dict[str, Any]) -> Scheduler:
    """Build from a diffusers scheduler_config.json dict, picking the class by "_class_name".

    Private keys ("_diffusers_version", "_use_default_values", ...) and keys that do not
    affect the ported code paths are ignored, as diffusers ignores foreign keys; values
    that would change the maths but are not ported raise ValueError.
    """
    name = config.get("_class_name")
    if name not in _SCHEDULERS:
        raise ValueError(
            f"unsupported scheduler class {name!r}; the numpy runtime supports "
            f"{', '.join(sorted(_SCHEDULERS))}"
        )
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    return _SCHEDULERS[name](**kwargs)
