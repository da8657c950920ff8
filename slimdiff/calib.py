"""Calibration: run the uncompressed pipeline over prompts; passes hook their component.

This is ModelOpt's `forward_loop` idea for diffusion: the whole pipeline runs (text
encoders, every denoising step, CFG) while a pass observes or trains only its own
component, so activations are those the deployed model will see.

What is expensive to recompute is cached under `work_dir`, keyed by a hash of the model
(a fingerprint of its weights) and the calibration settings, so a rerun or a resumed run
reuses it: `work_dir/trajectories/<key>/` holds the denoiser's inputs at every step
(`denoiser_inputs`). Passes keep their resumable checkpoints under `work_dir/checkpoints/`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from slimdiff.models.arch import ArchSpec
from slimdiff.models.loading import default_size
from slimdiff.prompts import read_prompts
from slimdiff.recipe import CalibrationSpec
from slimdiff.trajectories import (
    Trajectories,
    load_trajectories,
    record_trajectories,
    save_trajectories,
)

__all__ = ["Calibration"]

log = logging.getLogger(__name__)


class Calibration:
    """Calibration prompts and a `forward_loop` that drives the whole pipeline.

    Example:
        calib = Calibration(pipe, arch, CalibrationSpec(num_prompts=4, steps=10))
        with my_hooks(pipe.unet):
            calib.forward_loop()
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
        self._key: str | None = None
        self._trajectories: Trajectories | None = None

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.spec.size or default_size(self.arch, self.pipe))

    @property
    def guidance(self) -> float:
        return self.arch.default_guidance if self.spec.guidance is None else self.spec.guidance

    @torch.no_grad()
    def forward_loop(self, callback=None) -> None:
        """Run the pipeline once per prompt (seeded); `callback` is diffusers' step callback."""
        for i in range(len(self.prompts)):
            self._run(i, callback)

    @torch.no_grad()
    def _run(self, i: int, callback=None) -> None:
        h, w = self.size
        generator = torch.Generator("cpu").manual_seed(self.spec.seed + i)
        self.pipe(
            self.prompts[i],
            num_inference_steps=self.spec.steps,
            guidance_scale=self.guidance,
            height=h,
            width=w,
            generator=generator,
            output_type="latent",
            callback_on_step_end=callback,
        )

    @property
    def key(self) -> str:
        """Hash of the model (weights fingerprint, scheduler) and the calibration settings,
        computed once: a pass that later replaces the denoiser does not change it."""
        if self._key is None:
            settings = {
                "model": _fingerprint(self.pipe, self.arch),
                "prompts": self.prompts,
                "steps": self.spec.steps,
                "guidance": self.guidance,
                "seed": self.spec.seed,
                "size": list(self.size),
            }
            blob = json.dumps(settings, sort_keys=True, default=str).encode()
            self._key = hashlib.sha256(blob).hexdigest()[:16]
        return self._key

    def denoiser_inputs(self) -> Trajectories:
        """The denoiser's inputs at every step of every prompt (the teacher's trajectories).

        Loaded from `work_dir/trajectories/<key>/` when there, else recorded by running the
        pipeline and saved there. Recorded once per Calibration: a later pass gets the same
        trajectories (of the model as it was when first asked), as from the disk cache.

        Example:
            data = calib.denoiser_inputs()
            args, kwargs = data.inputs([(0, 0), (0, 1)])  # (prompt, step) pairs
        """
        if self._trajectories is not None:
            return self._trajectories
        folder = None
        if self.work_dir is not None:
            folder = self.work_dir / "trajectories" / self.key
            cached = load_trajectories(folder)
            if cached is not None and cached.key == self.key:
                log.info("calibration: reusing trajectories in %s", folder)
                self._trajectories = cached
                return cached
        from rich.progress import Progress

        denoiser = getattr(self.pipe, self.arch.denoiser)
        bar = dict(getattr(self.pipe, "_progress_bar_config", {}))
        self.pipe.set_progress_bar_config(disable=True)
        try:
            with Progress(transient=True) as progress:
                task = progress.add_task("calibration trajectories", total=len(self.prompts))
                data = record_trajectories(
                    denoiser, self._run, self.prompts, lambda: progress.advance(task)
                )
        finally:  # the caller's bar settings back, as they were (diffusers' default: {})
            self.pipe._progress_bar_config = bar
        data.key = self.key
        if folder is not None:
            save_trajectories(folder, data)
            log.info("calibration: trajectories saved to %s", folder)
        self._trajectories = data
        return data


def _fingerprint(pipe: Any, arch: ArchSpec) -> dict[str, Any]:
    """What identifies the model for the cache: classes, configs and a hash of every
    tensor's name, shape, dtype and a strided sample of its values (cheap on large
    models, and it changes with any training)."""
    # Private config keys go: diffusers' `_use_default_values` is a list in set order,
    # which changes from process to process (string hash randomisation).
    scheduler = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    out: dict[str, Any] = {"pipeline": type(pipe).__name__, "scheduler": scheduler}
    for name in (*arch.text_encoder_names, arch.denoiser):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        h = hashlib.sha256(type(module).__name__.encode())
        for key, value in module.state_dict().items():
            flat = value.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 32)][:32].float().cpu().numpy()
            h.update(f"{key}{tuple(value.shape)}{value.dtype}".encode())
            h.update(sample.tobytes())
        out[name] = h.hexdigest()
    return out
