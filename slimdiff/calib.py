"""Calibration: run the uncompressed pipeline over prompts; passes hook their component.

This is ModelOpt's `forward_loop` idea for diffusion: the whole pipeline runs (text
encoders, every denoising step, CFG) while a pass observes or trains only its own
component, so activations are those the deployed model will see.
"""

from __future__ import annotations

from typing import Any

import torch

from slimdiff.models.arch import ArchSpec
from slimdiff.models.loading import default_size
from slimdiff.prompts import read_prompts
from slimdiff.recipe import CalibrationSpec

__all__ = ["Calibration"]


class Calibration:
    """Calibration prompts and a `forward_loop` that drives the whole pipeline.

    Example:
        calib = Calibration(pipe, arch, CalibrationSpec(num_prompts=4, steps=10))
        with my_hooks(pipe.unet):
            calib.forward_loop()
    """

    def __init__(self, pipe: Any, arch: ArchSpec, spec: CalibrationSpec) -> None:
        self.pipe, self.arch, self.spec = pipe, arch, spec
        self.prompts = read_prompts(spec.prompts, spec.num_prompts)

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.spec.size or default_size(self.arch, self.pipe))

    @property
    def guidance(self) -> float:
        return self.arch.default_guidance if self.spec.guidance is None else self.spec.guidance

    @torch.no_grad()
    def forward_loop(self, callback=None) -> None:
        """Run the pipeline once per prompt (seeded); `callback` is diffusers' step callback."""
        h, w = self.size
        for i, prompt in enumerate(self.prompts):
            generator = torch.Generator("cpu").manual_seed(self.spec.seed + i)
            self.pipe(
                prompt,
                num_inference_steps=self.spec.steps,
                guidance_scale=self.guidance,
                height=h,
                width=w,
                generator=generator,
                output_type="latent",
                callback_on_step_end=callback,
            )
