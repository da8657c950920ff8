"""Calibration: run the uncompressed pipeline over prompts; passes hook their component.

This is ModelOpt's `forward_loop` idea for diffusion: the whole pipeline runs (text
encoders, every denoising step, CFG) while a pass observes or trains only its own
component, so activations are those the deployed model will see.

The teacher's trajectories (`record`) are recorded once, before any pass runs (the compress
runner asks first), so which model is the teacher never depends on which pass asked first:
per prompt, the denoiser's inputs at every step, the initial noise and the final latent,
and the scheduler's timesteps. `loop(model)` reruns them step by step with a stateless
sampler (slimdiff/denoise.py), with or without autograd.

What is expensive to recompute is cached under `work_dir`, keyed by a fingerprint of the
model's weights and configs (slimdiff/models/fingerprint.py) and the calibration settings,
so a rerun or a resumed run reuses it: `work_dir/trajectories/<key>/`. Passes keep their
resumable checkpoints under `work_dir/checkpoints/`.

The pipeline runs on its own device (the recipe's `device:`), under autocast when
`calibration.dtype` is float16 or bfloat16: weights stay as loaded, matrix products run in
the lower precision. Noise is drawn on the CPU, so it is the same on every device.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimdiff.denoise import DenoiseLoop, check_guidance_rescale
from slimdiff.errors import UserError
from slimdiff.models.arch import ArchSpec
from slimdiff.models.fingerprint import fingerprint_key
from slimdiff.models.kinds import pack_latents, refuse_inpainting, timestep_args
from slimdiff.models.loading import default_size
from slimdiff.progress import Progress
from slimdiff.prompts import read_prompts
from slimdiff.recipe import CalibrationSpec
from slimdiff.sampler import StepNoise, TorchSampler
from slimdiff.trajectories import (
    Trajectories,
    load_prompts,
    load_trajectories,
    record_trajectories,
    save_prompt,
    save_trajectories,
)

__all__ = ["Calibration"]

log = logging.getLogger(__name__)

# Stochastic schedulers' step noise comes from its own seeded stream, apart from the
# initial noise's (seed + i): see Calibration.step_noise.
_STEP_NOISE_STREAM = 1

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Calibration:
    """Calibration prompts, the teacher's recorded trajectories and a `forward_loop`.

    Example:
        calib = Calibration(pipe, arch, CalibrationSpec(num_prompts=4, steps=10))
        data = calib.record()                  # the teacher's trajectories (cached)
        with my_hooks(pipe.unet):
            calib.forward_loop()               # or: the whole pipeline, hooked
    """

    def __init__(
        self,
        pipe: Any,
        arch: ArchSpec,
        spec: CalibrationSpec,
        work_dir: str | Path | None = None,
    ) -> None:
        self.pipe, self.arch, self.spec = pipe, arch, spec
        self.prompts = read_prompts(spec.prompts, spec.num_prompts)
        # None: nothing is cached on disk and passes do not checkpoint.
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.dtype = _DTYPES[spec.dtype]
        self._key: str | None = None
        self._trajectories: Trajectories | None = None
        self._scheduler: Any = None
        check_guidance_rescale(type(pipe), spec.guidance_rescale, "calibration.guidance_rescale")
        if spec.eta > 0 and type(self.scheduler).__name__ != "TCDScheduler":
            # diffusers would pass it to any step taking an eta (DDIM's stochastic form)
            raise UserError(
                f"calibration.eta is TCD's gamma; {type(self.scheduler).__name__} takes none: "
                "set calibration.scheduler: TCDScheduler, or leave calibration.eta at 0"
            )

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.spec.size or default_size(self.arch, self.pipe))

    @property
    def guidance(self) -> float:
        return self.arch.default_guidance if self.spec.guidance is None else self.spec.guidance

    @property
    def do_cfg(self) -> bool:
        """Whether the pipeline batches (uncond, cond): as diffusers decides it."""
        denoiser = getattr(self.pipe, self.arch.denoiser)
        return self.arch.uses_cfg_for(denoiser.config) and self.guidance > 1.0

    @property
    def scheduler(self) -> Any:
        """The diffusers scheduler calibration samples with: `calibration.scheduler` built
        from the model's config as diffusers' from_config builds it, else the model's."""
        if self.spec.scheduler is None:
            return self.pipe.scheduler
        if self._scheduler is None:
            import diffusers

            cls = getattr(diffusers, self.spec.scheduler, None)
            if not (isinstance(cls, type) and hasattr(cls, "from_config")):
                raise UserError(
                    f"calibration.scheduler {self.spec.scheduler!r} is not a diffusers "
                    "scheduler class; use e.g. EulerDiscreteScheduler"
                )
            self._scheduler = cls.from_config(self.pipe.scheduler.config)
        return self._scheduler

    @contextlib.contextmanager
    def _sampling_with_calibration_scheduler(self) -> Iterator[None]:
        # The pipeline runs calibration's scheduler; the model keeps its own (the artifact
        # and bundle ship the model's).
        original = self.pipe.scheduler
        self.pipe.scheduler = self.scheduler
        try:
            yield
        finally:
            self.pipe.scheduler = original

    @property
    def device(self) -> torch.device:
        return getattr(self.pipe, self.arch.denoiser).device

    def _latent_hw(self) -> tuple[int, int]:
        h, w = self.size
        return h // self.pipe.vae_scale_factor, w // self.pipe.vae_scale_factor

    def noise(self, i: int) -> torch.Tensor:
        """Prompt `i`'s initial noise, float32 on the CPU, in the layout of `latents=`:
        drawn unpacked from a CPU generator seeded seed + i, then packed (FLUX)."""
        kind = self.arch.kind_for(getattr(self.pipe, self.arch.denoiser).config)
        shape = (1, self.pipe.vae.config.latent_channels, *self._latent_hw())  # (1, C, h, w)
        generator = torch.Generator("cpu").manual_seed(self.spec.seed + i)
        return pack_latents(torch.randn(shape, generator=generator), kind.latent_packing)

    def _call_options(self) -> dict[str, float]:
        # passed (and keyed) only when set: pipelines without them take no such argument
        rescale, eta = self.spec.guidance_rescale, self.spec.eta
        return {
            **({"guidance_rescale": rescale} if rescale > 0 else {}),
            **({"eta": eta} if eta > 0 else {}),
        }

    def step_noise(self, i: int) -> StepNoise:
        """Prompt `i`'s step noise, for stochastic schedulers (Euler a, LCM, SDE solvers):
        the pipeline draws it from a CPU generator with this seed, and the stateless loop
        from a `StepNoise` with the same seed, so both add the same noise at each step."""
        return StepNoise(self._step_seed(i))

    def _step_seed(self, i: int) -> int:
        state = np.random.SeedSequence([_STEP_NOISE_STREAM, self.spec.seed + i]).generate_state(
            1, np.uint64
        )
        return int(state[0]) >> 1  # a non-negative int64 seed

    @contextlib.contextmanager
    def _precision(self) -> Iterator[None]:
        if self.dtype == torch.float32:
            yield
            return
        with torch.autocast(self.device.type, dtype=self.dtype):
            yield

    @torch.no_grad()
    def forward_loop(self, callback=None) -> None:
        """Run the pipeline once per prompt (seeded); `callback` is diffusers' step callback."""
        for i in range(len(self.prompts)):
            self._run(i, callback)

    @torch.no_grad()
    def _run(self, i: int, callback=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt `i` through the whole pipeline: (initial noise, final latent)."""
        h, w = self.size
        noise = self.noise(i)
        denoiser = getattr(self.pipe, self.arch.denoiser)
        with self._precision(), self._sampling_with_calibration_scheduler():
            out = self.pipe(
                self.prompts[i],
                num_inference_steps=self.spec.steps,
                guidance_scale=self.guidance,
                height=h,
                width=w,
                latents=noise.to(denoiser.device, denoiser.dtype),
                generator=torch.Generator("cpu").manual_seed(self._step_seed(i)),
                **self._call_options(),
                output_type="latent",
                callback_on_step_end=callback,
            )
        return noise, out.images

    @property
    def key(self) -> str:
        """Hash of the model (fingerprint of every weight's bytes, scheduler), the calibration
        settings and the device type the pipeline runs on (another computes other values),
        computed once: a pass that later replaces the denoiser does not change it."""
        if self._key is None:
            with self._sampling_with_calibration_scheduler():  # its config goes in the key
                self._key = fingerprint_key(
                    self.pipe,
                    prompts=self.prompts,
                    steps=self.spec.steps,
                    guidance=self.guidance,
                    seed=self.spec.seed,
                    size=list(self.size),
                    dtype=self.spec.dtype,
                    step_noise=_STEP_NOISE_STREAM,  # stochastic steps draw seeded noise
                    device=self.device.type,
                    **self._call_options(),
                )
        return self._key

    def record(self) -> Trajectories:
        """The teacher's trajectories: per prompt the denoiser's inputs at every step, the
        initial noise and the final latent.

        Loaded from `work_dir/trajectories/<key>/` when there, else recorded by running the
        pipeline and saved there. Recorded once per Calibration: later calls get the same
        trajectories (of the model as it was when first asked), as from the disk cache.

        Example:
            data = calib.record()
            args, kwargs = data.inputs([(0, 0), (0, 1)])  # (prompt, step) pairs
        """
        if self._trajectories is not None:
            return self._trajectories
        config = getattr(self.pipe, self.arch.denoiser).config
        refuse_inpainting(config, "calibration", self.arch.kind_for(config))
        folder = None
        if self.work_dir is not None:
            folder = self.work_dir / "trajectories" / self.key
            cached = load_trajectories(folder)
            if cached is not None and cached.key == self.key:
                log.info("calibration: reusing trajectories in %s", folder)
                self._trajectories = cached
                return cached
        # each prompt saved as it is recorded: a killed run resumes at the next one
        recorded = None if folder is None else folder.with_name(f"{folder.name}.prompts")
        done = {} if recorded is None else load_prompts(recorded, len(self.prompts))
        if done:
            log.info("calibration: %d of %d prompts recorded before", len(done), len(self.prompts))
        denoiser = getattr(self.pipe, self.arch.denoiser)
        bar = dict(getattr(self.pipe, "_progress_bar_config", {}))
        self.pipe.set_progress_bar_config(disable=True)
        hint = (
            f"{self.spec.steps} steps each on {self.device.type}; fewer calibration.num_prompts "
            "or steps, a smaller calibration.size, or a GPU (--device cuda) is faster"
        )
        try:
            with Progress(
                "teacher trajectories", len(self.prompts), unit="prompts", hint=hint
            ) as progress:
                data = record_trajectories(
                    denoiser,
                    self._run,
                    self.prompts,
                    progress.advance,
                    timesteps=lambda: self.scheduler.timesteps.tolist(),
                    done=done,
                    on_prompt=None if recorded is None else partial(save_prompt, recorded),
                )
        finally:  # the caller's bar settings back, as they were (diffusers' default: {})
            self.pipe._progress_bar_config = bar
        data.key = self.key
        if folder is not None:
            save_trajectories(folder, data)
            shutil.rmtree(recorded, ignore_errors=True)  # all in `folder` now
            log.info("calibration: trajectories saved to %s", folder)
        self._trajectories = data
        return data

    def sampler(self, device: torch.device | str | None = None) -> TorchSampler:
        """A stateless sampler with the schedule the pipeline ran (same steps and shift)."""
        kind = self.arch.kind_for(getattr(self.pipe, self.arch.denoiser).config)
        scheduler = self.scheduler
        config = {**scheduler.config, "_class_name": type(scheduler).__name__}
        args = timestep_args(kind, config, self.spec.steps, *self._latent_hw())
        steps = args.pop("num_inference_steps")
        if "sigmas" in args:  # the pipeline passes sigmas alone (FLUX)
            steps = None
        return TorchSampler.from_config(
            config, steps, device=device or self.device, eta=self.spec.eta, **args
        )

    def loop(self, denoiser: torch.nn.Module) -> DenoiseLoop:
        """The calibration's denoising loop around `denoiser` (a pass's own, e.g. masked)."""
        kind = self.arch.kind_for(denoiser.config)
        return DenoiseLoop(
            denoiser,
            self.sampler(denoiser.device),
            kind,
            self.guidance,
            self.do_cfg,
            self.spec.guidance_rescale,
        )

    def conditioning(self, prompt: int, denoiser: torch.nn.Module) -> dict[str, Any]:
        """The recorded text conditioning of `prompt`, on `denoiser`'s device and dtype."""
        kind = self.arch.kind_for(denoiser.config)
        return self.record().conditioning(
            prompt, (kind.sample_input, "timestep"), denoiser.device, denoiser.dtype
        )
