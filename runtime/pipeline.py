"""Text-to-image from a bundle: tokenize, encode, denoise with a numpy scheduler, decode.

A port of the diffusers pipelines (StableDiffusion, StableDiffusionXL, StableDiffusion3,
Flux; diffusers 0.42) that needs no torch: given the same initial latents it reproduces
their images, which tests/integration/test_runtime_vs_diffusers.py checks per family. What
differs between denoiser kinds lives in conditioning.py; this file is the shared loop.

Example:
    >>> pipe = Text2ImagePipeline.from_bundle("out/bundle", backend="ort-cpu")  # doctest: +SKIP
    >>> result = pipe("a red circle", steps=20, seed=1)                         # doctest: +SKIP
    >>> save_png(result.image, "circle.png")                                    # doctest: +SKIP
    >>> result.timings_ms["end_to_end"]                                         # doctest: +SKIP
    812.4
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from slimdiff.runtime.backends import Backend, Session, get_backend
from slimdiff.runtime.conditioning import CONDITIONINGS, Conditioning
from slimdiff.runtime.image import to_uint8
from slimdiff.runtime.manifest import BundleError, ComponentEntry, Manifest, read_manifest
from slimdiff.runtime.schedulers import scheduler_from_config
from slimdiff.runtime.text_encoder import TextEncoder

from slimdiff.errors import UserError

__all__ = ["GenerationResult", "Text2ImagePipeline"]

log = logging.getLogger(__name__)

_OUTPUTS = ("image", "latent")


@dataclass
class GenerationResult:
    """One generated image and what it took.

    `latents` are the final latents before VAE decoding, float32, in the denoiser's layout
    (what diffusers returns with output_type="latent"; packed (B, L, 4C) for FLUX).
    `timings_ms` holds "text_encoders", "denoiser_steps" (one entry per step),
    "vae_decode" (absent with output="latent") and "end_to_end".
    """

    image: np.ndarray | None  # (H, W, 3) uint8; None with output="latent"
    latents: np.ndarray
    timings_ms: dict[str, float | list[float]] = field(default_factory=dict)


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


class Text2ImagePipeline:
    """Runs a verified bundle end to end with one backend.

    Example:
        >>> pipe = Text2ImagePipeline.from_bundle("out/bundle")                 # doctest: +SKIP
        >>> pipe("a cat", steps=4, guidance=5.0, size=(512, 512)).image.shape   # doctest: +SKIP
        (512, 512, 3)
    """

    def __init__(
        self,
        manifest: Manifest,
        conditioning: Conditioning,
        denoiser: Session,
        vae_decoder: Session,
        scheduler_config: dict,
    ) -> None:
        self.manifest = manifest
        self.config = manifest.pipeline
        self.conditioning = conditioning
        self.denoiser = denoiser
        self.vae_decoder = vae_decoder
        self.scheduler_config = scheduler_config

    @classmethod
    def from_bundle(cls, bundle: str | Path, backend: str = "ort-cpu") -> Text2ImagePipeline:
        """Verify `bundle` (SHA-256 of every file) and load its components on `backend`."""
        runner = get_backend(backend)  # fail on a bad backend name before hashing gigabytes
        root = Path(bundle)
        manifest = read_manifest(root, verify=True)
        try:
            return cls._load_verified(root, manifest, runner)
        except KeyError as err:
            raise BundleError(
                f"{root}: manifest.json lacks {err} in its pipeline or component entries; "
                "export the bundle again"
            ) from None

    @classmethod
    def _load_verified(cls, root: Path, manifest: Manifest, runner: Backend) -> Text2ImagePipeline:
        config = manifest.pipeline
        kind = config.get("denoiser_kind")
        if kind not in CONDITIONINGS:
            raise BundleError(
                f"{root}: denoiser_kind {kind!r} is not one this runtime runs "
                f"({', '.join(CONDITIONINGS)}); upgrade slimdiff"
            )
        scheduler_config = _read_json(root / config["scheduler"])
        _check_scheduler(root, scheduler_config)
        encoders = [
            TextEncoder.from_manifest(root, manifest, entry, runner)
            for entry in config["text_encoders"]
        ]
        conditioning = CONDITIONINGS[kind](config, encoders, scheduler_config)
        entry = _component(root, manifest, config["denoiser"])
        _check_denoiser_inputs(root, entry.inputs, conditioning)
        denoiser = _load(runner, root, config["denoiser"], entry, output="out_sample")
        vae_entry = _component(root, manifest, "vae_decoder")
        vae_decoder = _load(runner, root, "vae_decoder", vae_entry, output="sample")
        log.info("loaded %s bundle %s on %s", manifest.family, root, runner.name)
        return cls(manifest, conditioning, denoiser, vae_decoder, scheduler_config)

    def __call__(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        size: tuple[int, int] | None = None,
        latents: np.ndarray | None = None,
        output: str = "image",
    ) -> GenerationResult:
        """Generate one image for `prompt`; `size` is (height, width) in pixels.

        `latents` replaces the seeded noise, in the layout diffusers' `latents=` takes.
        Classifier-free guidance runs when the model uses it and `guidance` > 1, as in
        diffusers; for FLUX `guidance` is the embedded guidance value.
        """
        start = time.perf_counter()
        if not isinstance(prompt, str):
            raise UserError(f"prompt must be one string, not {type(prompt).__name__}")
        steps = int(steps if steps is not None else self.config["default_steps"])
        guidance = float(guidance if guidance is not None else self.config["default_guidance"])
        height, width = self._check_args(steps, size, output)
        cond = self.conditioning
        do_cfg = bool(self.config["uses_cfg"]) and guidance > 1.0
        timings: dict[str, float | list[float]] = {}

        t0 = time.perf_counter()
        fixed = cond.encode(prompt, negative_prompt, do_cfg, guidance, height, width)
        timings["text_encoders"] = _ms(t0)

        scheduler = scheduler_from_config(self.scheduler_config)
        cond.set_timesteps(scheduler, steps, cond.latent_shape(height, width))
        x = cond.initial_latents(latents, seed, height, width, scheduler)
        step_ms: list[float] = []
        for i, t in enumerate(scheduler.timesteps):
            t0 = time.perf_counter()
            model_input = np.concatenate([x, x]) if do_cfg else x
            model_input = scheduler.scale_model_input(model_input, i)
            feeds = {**fixed, **cond.step_feeds(model_input, np.float32(t))}
            pred = self.denoiser.run(feeds)["out_sample"]
            if do_cfg:
                uncond, text = np.split(pred, 2)  # (uncond, cond), as batched above
                pred = uncond + np.float32(guidance) * (text - uncond)
            x = scheduler.step(pred, i, x)
            step_ms.append(_ms(t0))
        timings["denoiser_steps"] = step_ms

        image = None
        if output == "image":
            t0 = time.perf_counter()
            image = self._decode(x, height, width)
            timings["vae_decode"] = _ms(t0)
        timings["end_to_end"] = _ms(start)
        return GenerationResult(image=image, latents=x, timings_ms=timings)

    def _decode(self, latents: np.ndarray, height: int, width: int) -> np.ndarray:
        z = self.conditioning.vae_latents(latents, height, width)
        z = z / np.float32(self.config["vae_scaling_factor"])
        if self.config.get("vae_shift_factor") is not None:
            z = z + np.float32(self.config["vae_shift_factor"])
        sample = self.vae_decoder.run({"latent_sample": z})["sample"]  # (B, 3, H, W)
        return to_uint8(sample[0])

    def _check_args(self, steps: int, size: tuple[int, int] | None, output: str) -> tuple[int, int]:
        if output not in _OUTPUTS:
            raise UserError(f"output {output!r} is not one of: {', '.join(_OUTPUTS)}")
        if steps < 1:
            raise UserError(f"steps must be at least 1, not {steps}")
        height, width = (int(v) for v in (size or self.config["default_size"]))
        m = self.conditioning.size_multiple()
        if height % m or width % m or height < m or width < m:
            fix_h, fix_w = (max(m, int(v / m + 0.5) * m) for v in (height, width))
            raise UserError(
                f"size {height}x{width} is not a multiple of {m}; use e.g. {fix_h}x{fix_w}"
            )
        return height, width


def _component(root: Path, manifest: Manifest, name: str) -> ComponentEntry:
    try:
        return manifest.components[name]
    except KeyError:
        raise BundleError(f"{root}: the manifest has no {name} component; export again") from None


def _load(runner: Backend, root: Path, name: str, entry: ComponentEntry, output: str) -> Session:
    session = runner.load(root / entry.path)
    declared = [i["name"] for i in entry.inputs]
    if sorted(session.input_names) != sorted(declared) or output not in session.output_names:
        raise BundleError(
            f"{root}: {entry.path} takes {session.input_names} and returns "
            f"{session.output_names}, but the manifest says {name} takes {declared} and "
            f"returns {output!r}; export the bundle again"
        )
    return session


def _check_denoiser_inputs(root: Path, inputs: list[dict], cond: Conditioning) -> None:
    # The manifest's input list is the graph's contract; the pipeline flags (has_time_ids,
    # guidance_embeds) say what the conditioning feeds. They must agree, or a run would
    # fail mid-loop or silently drop a condition.
    declared = {i["name"] for i in inputs}
    expected = cond.denoiser_inputs()
    if declared != expected:
        raise BundleError(
            f"{root}: the denoiser's inputs ({', '.join(sorted(declared))}) do not match what a "
            f"{cond.kind} pipeline with these settings feeds ({', '.join(sorted(expected))}); "
            "export the bundle again"
        )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BundleError(f"{path}: unreadable ({err}); export the bundle again") from None


def _check_scheduler(root: Path, config: dict) -> None:
    # Build one now so an unsupported scheduler fails at load, not mid-generation.
    try:
        scheduler_from_config(config)
    except (ValueError, TypeError) as err:
        raise BundleError(f"{root}: scheduler config not supported: {err}") from None
