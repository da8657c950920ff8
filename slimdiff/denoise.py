"""A calibration trajectory rerun step by step in torch, with or without autograd.

`DenoiseLoop` is what the family's diffusers pipeline does between its text encoders and
its VAE (classifier-free guidance batching, the scheduler's input scaling, the timestep the
denoiser takes, the guidance mix, the scheduler step), written as explicit steps over the
stateless `TorchSampler`: a pass can run any step from any stored latent, under
`torch.no_grad()` or with gradients, as often as it likes (EcoDiff's backward walk
recomputes each step once more with grad; QuEST compares each step's output). The text
conditioning comes from the calibration cache (`Trajectories.conditioning`), so the text
encoders never run again.

From the recorded initial noise, the loop reproduces the pipeline's final latent to float
rounding (tests/unit/test_calibration.py: within 1e-5 relative, all four families, and
bit for bit in the cases of tools/sampler_parity.py, one per scheduler).

Example:
    loop = calib.loop(masked_unet)
    x, state = loop.start(data.noise(0), calib.step_noise(0))
    for i in range(loop.steps):
        x, state = loop.step(i, x, state, cond)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from slimdiff.errors import UserError
from slimdiff.models.kinds import KindSpec
from slimdiff.sampler import SamplerState, StepNoise, TorchSampler

__all__ = ["DenoiseLoop", "check_guidance_rescale"]


@dataclass
class DenoiseLoop:
    """One denoiser, one sampler, one guidance setting: the pipeline's loop, stepwise."""

    denoiser: torch.nn.Module
    sampler: TorchSampler
    kind: KindSpec
    guidance: float
    do_cfg: bool  # batch (uncond, cond) and mix them, as the pipeline does
    guidance_rescale: float = 0.0  # diffusers' rescale_noise_cfg after the mix, when > 0

    @property
    def steps(self) -> int:
        return self.sampler.num_steps

    def start(
        self, noise: torch.Tensor, step_noise: StepNoise | None = None
    ) -> tuple[torch.Tensor, SamplerState]:
        """The first latent from `noise` (as diffusers' `latents=` takes it), and the
        sampler's initial state; SD/SDXL pipelines scale given latents by init_noise_sigma.
        `step_noise`: the prompt's (`Calibration.step_noise`), for a stochastic sampler."""
        x = noise * self.sampler.init_noise_sigma
        return x, self.sampler.initial_state(step_noise)

    def predict(self, i: int, x: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        """The guided model output at step `i` for latent `x` (what the scheduler steps)."""
        model_input = torch.cat([x, x]) if self.do_cfg else x
        model_input = self.sampler.scale_model_input(model_input, i)
        t = self.sampler.timesteps[i]
        # Pipelines pass t expanded to the batch (FLUX: in the latents' dtype, / 1000).
        timestep = t.expand(model_input.shape[0])
        if self.kind.timestep_divisor != 1.0:
            timestep = timestep.to(x.dtype) / self.kind.timestep_divisor
        pred = self.denoiser(
            **{self.kind.sample_input: model_input, "timestep": timestep},
            **cond,
            return_dict=False,
        )[0]
        if self.do_cfg:
            uncond, text = pred.chunk(2)
            pred = uncond + self.guidance * (text - uncond)
            if self.guidance_rescale > 0:
                from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
                    rescale_noise_cfg,
                )

                pred = rescale_noise_cfg(pred, text, guidance_rescale=self.guidance_rescale)
        return pred

    def step(
        self, i: int, x: torch.Tensor, state: SamplerState, cond: dict[str, Any]
    ) -> tuple[torch.Tensor, SamplerState]:
        """Step `i`: x_i -> x_{i+1}. Pure: same inputs, same outputs, no hidden counter."""
        return self.sampler.step(self.predict(i, x, cond), i, x, state)

    def run(
        self, noise: torch.Tensor, cond: dict[str, Any], step_noise: StepNoise | None = None
    ) -> torch.Tensor:
        """The whole trajectory from `noise`: the final latent (under the caller's grad mode)."""
        x, state = self.start(noise, step_noise)
        for i in range(self.steps):
            x, state = self.step(i, x, state, cond)
        return x


def check_guidance_rescale(pipeline_cls: type, value: float, key: str) -> None:
    """UserError when `value` > 0 and the diffusers pipeline class takes no guidance_rescale
    (SD1.5 and SDXL pipelines do; SD3's and FLUX's do not). `key`: the recipe key, said."""
    import inspect

    if value > 0 and "guidance_rescale" not in inspect.signature(pipeline_cls.__call__).parameters:
        raise UserError(
            f"{key}: {pipeline_cls.__name__} has no guidance rescale (diffusers' SD1.5 and "
            "SDXL pipelines have it); leave it at 0"
        )
