"""The noise bench's torch reference adds at each step: the runtime's own.

A stochastic scheduler (euler-a, lcm, ddpm, the SDE solvers) adds fresh noise every step.
bench's runtime side (bench_worker.py) draws it from the runtime's per-image streams,
seeded `prompt_seed(bench.seed, i)`; while the torch reference runs, diffusers draws the
same values, so fidelity compares the models, not two noise draws.
"""

from __future__ import annotations

import contextlib
import importlib

import numpy as np

__all__ = ["prompt_seed", "runtime_step_noise"]


def prompt_seed(seed: int, i: int) -> int:
    """The runtime seed of bench prompt `i` (its step noise; its initial noise is given)."""
    return seed + i


@contextlib.contextmanager
def runtime_step_noise(scheduler, seeds: list[int]):
    """diffusers' per-step noise for `scheduler`, drawn as the runtime draws it for images
    run with `seeds` (one row each). Nothing changes for a scheduler that draws none.

    diffusers draws the noise with `randn_tensor` from the scheduler's module, once per
    stochastic step (slimdiff.sampler.StepNoise); DPMSolverSDEScheduler from a torchsde
    Brownian tree instead, replaced here by _RuntimeBrownian. Generators are ignored.
    """
    import torch

    from slimdiff.runtime.denoise_loop import step_noise_streams

    module = importlib.import_module(type(scheduler).__module__)
    rngs = [np.random.default_rng(stream) for stream in step_noise_streams(seeds)]

    def rows(shape) -> np.ndarray:
        if shape[0] != len(rngs):
            raise ValueError(f"step noise for {shape[0]} rows; the reference runs {len(rngs)}")
        return np.stack([rng.standard_normal(tuple(shape[1:]), np.float32) for rng in rngs])

    def draw(shape, generator=None, device=None, dtype=None, **_):
        return torch.from_numpy(rows(shape)).to(device=device, dtype=dtype)

    def brownian(x, *_args, **_kwargs):
        return _RuntimeBrownian(rows, x)

    replaced = {"randn_tensor": draw, "BrownianTreeNoiseSampler": brownian}
    saved = {name: getattr(module, name) for name in replaced if hasattr(module, name)}
    for name in saved:
        setattr(module, name, replaced[name])
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(module, name, original)


class _RuntimeBrownian:
    """DPMSolverSDEScheduler's noise_sampler(sigma, sigma_next) from the runtime's draws.

    diffusers calls it twice a step: the first half's noise is W's increment over [s,
    sigma] (s the midpoint), the second's over [sigma', sigma], which contains it. The
    runtime draws z1 for the first half and an independent z2 over [sigma', s] for the
    second, and joins them (runtime/schedulers/dpm_sde.py, second_half_noise); so does this.
    """

    def __init__(self, rows, like) -> None:
        self.rows, self.like, self.first = rows, like, None

    def __call__(self, sigma, sigma_next):
        import torch

        from slimdiff.runtime.schedulers.dpm_sde import second_half_noise

        z = self.rows(tuple(self.like.shape)).astype(np.float64)
        if self.first is None:  # the first half: the increment over [s, sigma]
            self.first = (float(sigma_next), z)
        else:
            (s, z1), self.first = self.first, None
            z = second_half_noise(z1, z, float(sigma), s, float(sigma_next))
        return torch.from_numpy(z.astype(np.float32)).to(self.like.device, self.like.dtype)
