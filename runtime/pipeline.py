"""Text-to-image from a bundle: tokenize, encode, denoise with a numpy scheduler, decode.

A port of the diffusers pipelines (StableDiffusion, StableDiffusionXL, StableDiffusion3,
Flux; diffusers 0.42) that needs no torch: given the same initial latents it reproduces
their images, which tests/integration/test_runtime_vs_diffusers.py checks per family. What
differs between denoiser kinds lives in conditioning.py; this file loads a bundle and
checks a call's arguments, generate.py runs the call (encode, denoise, decode).

Example:
    >>> pipe = Text2ImagePipeline.from_bundle("out/bundle", backend="ort-cpu")  # doctest: +SKIP
    >>> result = pipe("a red circle", steps=20, seed=1)                         # doctest: +SKIP
    >>> save_png(result.image, "circle.png")                                    # doctest: +SKIP
    >>> result.timings_ms["end_to_end"]                                         # doctest: +SKIP
    812.4
"""

from __future__ import annotations

import contextlib
import logging
import reprlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from slimdiff.runtime.backends import Backend, Session, get_backend
from slimdiff.runtime.bundle_files import Bundle, open_bundle
from slimdiff.runtime.call_checks import (
    check_image,
    check_images,
    check_mask,
    check_number,
    check_on_step,
    check_prompts,
    check_rescale,
    check_run_args,
    check_step_count,
    check_true_cfg,
    check_values,
    warn_unguided,
)
from slimdiff.runtime.conditioning import Conditioning
from slimdiff.runtime.control import check_control, takes_guess
from slimdiff.runtime.denoise_loop import Guidance
from slimdiff.runtime.generate import Call, GenerationResult, generate
from slimdiff.runtime.image import ImageInput, image_size, prepare_image
from slimdiff.runtime.img2img import run_strength
from slimdiff.runtime.manifest import VAE_DECODER, VAE_ENCODER, Manifest, PipelineSpec
from slimdiff.runtime.refiner import check_aesthetic, check_hand_off
from slimdiff.runtime.scheduler_choice import chosen, set_eta
from slimdiff.runtime.schedulers import Scheduler, scheduler_from_config
from slimdiff.runtime.sessions import (
    OnDemandSession,
    check_backend_fits,
    denoiser_max_batch,
    denoiser_shape_check,
    load_component,
    release,
)
from slimdiff.runtime.size_conditioning import check_size_conditioning
from slimdiff.runtime.text_encoder import TextEncoder, bundle_tokenizer

from slimdiff.errors import UserError
from slimdiff.limits import MAX_SIDE

# GenerationResult lives in generate.py, which fills it; it stays importable from here
__all__ = ["GenerationResult", "Text2ImagePipeline"]

log = logging.getLogger(__name__)


class Text2ImagePipeline:
    """Runs a verified bundle end to end with one backend.

    Threads: one pipeline may serve calls from several threads at once. Its bundle,
    manifest and sessions are read-only once loaded; each call makes its own scheduler,
    latents, feeds and result. Resident (the default), calls run concurrently and each
    gives the images it gives alone (measured with ort-cpu and, on the CPU, the IO-binding
    path ort-cuda runs; onnxruntime's sessions take concurrent runs). Sessions whose
    graphs replay on fixed device buffers serialise their own runs: ort-cuda with CUDA
    graphs (SLIMDIFF_CUDA_GRAPH=1, runtime/backends/ort_binding.py, which also keeps at
    most MAX_GRAPHS input-shape sets per session) and trt (runtime/backends/trt.py).
    `low_memory` pipelines run one call at a time (a lock; the others wait): the mode
    exists to bound memory to the largest component, which concurrent calls, each
    loading its own, would defeat (one pipeline per worker process runs them side by side).

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
        max_batch: int | None = None,
        vae_encoder: Session | None = None,
    ) -> None:
        """`max_batch`: the largest denoiser batch the backend runs (its profile's, where it
        runs only those shapes); None for any. `vae_encoder`: the bundle's, for
        image-to-image (None: the bundle has none)."""
        self.manifest = manifest
        self.config = manifest.pipeline
        self.conditioning = conditioning
        self.denoiser = denoiser
        self.vae_decoder = vae_decoder
        self.scheduler_config = scheduler_config
        self.low_memory = isinstance(denoiser, OnDemandSession)
        self.max_batch = max_batch
        self.vae_encoder = vae_encoder
        # {denoiser input: shape} -> UserError where the backend can tell up front that
        # the denoiser does not take it (an AOTInductor package's ranges); None: any shape
        self.check_shapes: Callable[[dict[str, tuple[int, ...]]], None] | None = None
        # low_memory: one call at a time (the class docstring says why). Reentrant: an
        # on_step that runs this pipeline again from the same thread would otherwise hang;
        # it runs, and the outer call reloads what the inner one released.
        self._low_memory_lock = threading.RLock()

    @contextlib.contextmanager
    def _low_memory_turn(self) -> Iterator[None]:
        """low_memory: this call's turn (one call at a time), and every component released
        when it ends, however it ends (on_step raising to cancel, Ctrl-C, a NaN check): the
        next call starts from nothing loaded, its peak the largest component's. Resident:
        nothing to do, no lock."""
        if not self.low_memory:
            yield
            return
        with self._low_memory_lock:
            try:
                yield
            finally:
                encoders = [enc.session for enc in self.conditioning.encoders]
                release(*encoders, self.vae_encoder, self.denoiser, self.vae_decoder)

    @classmethod
    def from_bundle(
        cls,
        bundle: str | Path,
        backend: str | Backend = "ort-cpu",
        expect_sha256: str | None = None,
        scheduler: str | None = None,
        low_memory: bool = False,
        sigmas: str | None = None,
        timestep_spacing: str | None = None,
    ) -> Text2ImagePipeline:
        """Verify `bundle` (schema, paths, SHA-256 of every file) and load it on `backend`.

        `backend` is a name ("ort-cpu", "ort-cuda", "trt", "trt-rtx", "aoti") or a backend
        object: what get_backend(name) returns, or one built with settings a name cannot
        carry, e.g. OrtBackend(threads=4) from slimdiff.runtime.backends.ort (intra-op
        threads; by default SLIMDIFF_THREADS, else chosen from the graph's size and the
        free CPUs) or OrtBackend("ort-cuda", device="cuda", device_id=1).

        `expect_sha256` pins the bundle's identity (the SHA-256 of its manifest.json, which
        `slimdiff export` prints): any other bundle is refused before its files are hashed.
        `scheduler` samples with another scheduler than the bundle's (a short name such as
        "euler-a" or "dpm++2m-karras", or a class name: runtime.schedulers.switch_scheduler),
        built from the bundle's config as diffusers' from_config builds it. `low_memory`:
        load each component only while it runs, so the peak is the largest one's, not their
        sum; every call loads them again (runtime/sessions.py), and calls from several
        threads run one at a time. `sigmas` ("karras",
        "exponential" or "beta") samples on that sigma schedule instead of the scheduler's
        own (runtime.schedulers.with_sigmas), after any `scheduler` switch.
        `timestep_spacing` ("leading", "trailing" or "linspace": diffusers' key) places the
        steps in the training range otherwise than the bundle's config ("trailing" for
        SDXL-Lightning, Hyper-SD, SDXL-Turbo and other few-step distillations).
        """
        runner = get_backend(backend)  # fail on a bad backend before hashing gigabytes
        if expect_sha256 is not None and not isinstance(expect_sha256, str):
            raise UserError(
                "expect_sha256 must be the 64-hex-digit SHA-256 string `slimdiff export` "
                f"prints, not {type(expect_sha256).__name__} {reprlib.repr(expect_sha256)}"
            )
        bundle_files = open_bundle(bundle, expect_sha256=expect_sha256)
        schedule = {"sigmas": sigmas, "timestep_spacing": timestep_spacing}
        return cls._load_verified(bundle_files, runner, scheduler, low_memory, **schedule)

    @classmethod
    def _load_verified(
        cls,
        bundle: Bundle,
        runner: Backend,
        scheduler: str | None = None,
        low_memory: bool = False,
        sigmas: str | None = None,
        timestep_spacing: str | None = None,
    ) -> Text2ImagePipeline:
        check_backend_fits(runner, bundle)
        manifest = bundle.manifest
        config = manifest.pipeline
        own = bundle.read_json(config.scheduler, infinities=True)
        scheduler_config = chosen(bundle.root, config, own, scheduler, sigmas, timestep_spacing)
        # Everything parsed in-process first, so a bad file fails before any graph loads.
        tokenizers = [bundle_tokenizer(bundle, record) for record in config.text_encoders]

        def load(name: str) -> Session:
            if low_memory:  # loaded at first use, released after its phase of each call
                return OnDemandSession(lambda: load_component(runner, bundle, name))
            return load_component(runner, bundle, name)

        encoders = [
            TextEncoder.from_bundle(bundle, record, tok, load(record.name))
            for record, tok in zip(config.text_encoders, tokenizers, strict=True)
        ]
        conditioning = Conditioning(_conditioning_record(config), encoders, scheduler_config)
        denoiser = load(config.denoiser)
        vae_decoder = load(VAE_DECODER)
        vae_encoder = None
        if VAE_ENCODER in manifest.components:
            # loaded at the first image-to-image call: text-to-image never pays for it
            vae_encoder = OnDemandSession(lambda: load_component(runner, bundle, VAE_ENCODER))
        log.info(
            "loaded %s bundle %s (sha256 %s) on %s",
            manifest.family,
            bundle.root,
            bundle.sha256,
            runner.name,
        )
        max_batch = denoiser_max_batch(bundle, runner, config)
        pipe = cls(
            manifest, conditioning, denoiser, vae_decoder, scheduler_config, max_batch, vae_encoder
        )
        pipe.check_shapes = denoiser_shape_check(bundle, runner, config)
        return pipe

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str | None] | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        size: tuple[int, int] | None = None,
        latents: np.ndarray | None = None,
        output: str = "image",
        guidance_rescale: float = 0.0,
        eta: float | None = None,
        images: int = 1,
        on_step: Callable[[int, int], None] | None = None,
        image: ImageInput | None = None,
        strength: float | None = None,
        mask_image: ImageInput | None = None,
        control_image: ImageInput | Sequence[ImageInput] | None = None,
        control_scale: float | Sequence[float] = 1.0,
        control_start: float | Sequence[float] = 0.0,
        control_end: float | Sequence[float] = 1.0,
        control_guess: bool = False,
        aesthetic_score: float | None = None,
        negative_aesthetic_score: float | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
        true_cfg_scale: float = 1.0,
    ) -> GenerationResult:
        """Generate `images` images for `prompt` (one string, or a list of prompts) in one
        batch; `size` is (height, width) in pixels.

        A list of prompts batches as diffusers batches one: the images come prompt by
        prompt (p0's images, then p1's, ...); `negative_prompt` is one for all, or a list
        of one per prompt. `latents` replaces the seeded noise, in the layout diffusers'
        `latents=` takes (one row per image). `images` is diffusers' num_images_per_prompt:
        the denoiser runs all images of all prompts in one batch (twice that under CFG), the
        VAE decodes them one at a time (as diffusers with enable_vae_slicing), and the
        first image is the one a one-image call with the same seed draws.
        Classifier-free guidance runs when the model uses it and `guidance` > 1, as in
        diffusers; for FLUX `guidance` is the embedded guidance value. `guidance_rescale`
        (0 to 1) pulls the guided prediction's std back toward the text prediction's, as
        diffusers' SD1.5/SDXL pipelines do (Lin et al. 2023, arXiv:2305.08891, Sec. 3.4;
        0.7 there for zero-terminal-SNR models); it needs a model that uses CFG. `eta` is
        the gamma of a TCD scheduler (0 to 1, as diffusers' pipelines pass it: 0 when not
        given; the TCD authors suggest 0.3); no other ported scheduler takes one.
        `on_step(done, total)` is called after each denoiser call (a progress bar).

        Image-to-image: `image` (a file path, a PIL image, or an (H, W, 3) uint8 array) is
        encoded by the bundle's VAE encoder (`export --vae-encoder`), noised to the step
        `strength` (0 to 1; default: that of the model's diffusers pipeline, which the
        bundle records: image-to-image SD1.5 0.8, SDXL 0.3, SD3/FLUX 0.6; inpainting
        SD1.5 1.0, SDXL 0.9999, SD3/FLUX 0.6; SDXL ControlNet image-to-image 0.8) sets
        and denoised from there, as diffusers' img2img pipelines do: 1 starts from pure
        noise, lower values keep more of the image, and only `strength` x `steps` steps
        run. The image is resized (Lanczos, as diffusers) to
        `size` when given, else cut down to the nearest size multiple. Every image of the
        call starts from the same encoded image; the latent draw from the VAE posterior
        and the noise come from `seed`. `latents` cannot be given with it.

        Inpainting: `mask_image` (same kinds; white is repainted, black kept, binarised at
        half grey and resized as the image) repaints only the masked part of `image`, as
        diffusers' inpaint pipelines do with a model that is not inpainting-trained: after
        each step the unmasked latents are put back to the image's, noised to the next
        step; at strength 1 the run starts from pure noise.

        ControlNet (a bundle exported with --controlnet): `control_image` (same kinds) steers
        the run, as diffusers' ControlNet pipelines do: resized to `size` (without one, the
        run takes the control image's size, cut down to the size multiple), its residuals
        scaled by `control_scale` on the steps within [`control_start`, `control_end`] (as
        fractions of the steps that run), by 0 outside. It combines with `image` (diffusers'
        ControlNet img2img pipeline) and `mask_image` (its inpaint pipeline); the default
        scale is 1 there too (diffusers': 0.8 and, for SD1.5 inpainting, 0.5). Without one,
        such a bundle draws as if it had no ControlNet (scale 0), still paying its cost.
        A bundle with several ControlNets takes a list of control images, one per
        ControlNet in export order, and a scale, start and end for all or a list of one
        each (diffusers' MultiControlNetModel: their residuals are summed).
        `control_guess` runs diffusers' guess mode (residuals scaled from 0.1 at the
        shallowest to 1 at the mid block, and under CFG given to the prompt's half only),
        forced, as there, for a ControlNet that pools its conditions (shuffle).

        The SDXL refiner (a bundle exported from its folder; runtime/refiner.py) runs on an
        `image` as above, or on a base model's partly denoised latents, diffusers' "ensemble
        of expert denoisers": the base call with `denoising_end` (0 to 1, e.g. 0.8) stops
        there and returns its latents (output="latent"); the refiner call with
        `denoising_start` equal to it takes them as `latents`, as they are (no noise, no
        strength), with the same prompts, steps and size, and runs the rest of the
        schedule. Its time ids carry `aesthetic_score` (default 6) on the prompt's rows and
        `negative_aesthetic_score` (2.5) on the negative's; other bundles take neither.
        `denoising_end` works on any bundle.

        SDXL bundles (their UNet's time ids) take diffusers' size and crop conditioning:
        `original_size`, `crops_coords_top_left` and `target_size` ((height, width) and
        (top, left) in pixels; defaults: the run's size, (0, 0), the run's size) and
        their `negative_` forms for CFG's negative rows, with the defaults of diffusers'
        pipelines (runtime/size_conditioning.py); e.g. negative_original_size=(512, 512)
        steers away from low-resolution sources. Other bundles take none.

        FLUX bundles take diffusers' `true_cfg_scale`: above 1, with a `negative_prompt`,
        each step runs the transformer a second time on the negative prompt and takes
        neg + true_cfg_scale * (pos - neg), as FluxPipeline does (twice the time a step;
        `guidance` stays the embedded value). Other bundles guide with `guidance`.
        """
        start = time.perf_counter()
        prompts, negatives = check_prompts(prompt, negative_prompt)
        steps = check_step_count(steps, self.config.default_steps)
        default = float(self.config.default_guidance)
        guidance = default if guidance is None else check_number(guidance, "guidance", ", e.g. 7.5")
        check_on_step(on_step)  # else it fails after the text encoders and one step
        aesthetic = check_aesthetic(self.config, aesthetic_score, negative_aesthetic_score)
        sizing = check_size_conditioning(
            "time_ids" in self.config.kind.extra_inputs,
            {
                "original_size": original_size,
                "crops_coords_top_left": crops_coords_top_left,
                "target_size": target_size,
                "negative_original_size": negative_original_size,
                "negative_crops_coords_top_left": negative_crops_coords_top_left,
                "negative_target_size": negative_target_size,
            },
        )
        start_at, end_at = check_hand_off(
            self.config, denoising_start, denoising_end, image, latents, strength
        )
        strength = run_strength(self.config, strength, image, mask_image)
        has_encoder = self.vae_encoder is not None
        source = None if image is None else check_image(image, latents, has_encoder)
        guess = takes_guess(self.manifest)  # the graph takes guess mode's inputs
        control = check_control(
            self.config,
            control_image,
            control_scale,
            control_start,
            control_end,
            control_guess,
            guess,
        )
        # diffusers' text-to-image ControlNet pipelines take the control image's size; its
        # img2img and inpaint ones need both images of one size (they fail otherwise):
        # here the image is resized to the control image's
        sized_by = control.images[0] if control.images else source
        if sized_by is not None and size is None:
            size = image_size(sized_by, self.conditioning.size_multiple(), MAX_SIDE)
        if start_at is not None and size is None:  # the base's latents give the size
            size = self.conditioning.latents_size(latents)
        multiple = self.conditioning.size_multiple()
        height, width = check_run_args(self.config, multiple, steps, size, output)
        check_values(guidance, seed, latents)
        pixels = None if source is None else prepare_image(source, (height, width))
        check_mask(mask_image, pixels is not None, bool(self.config.kind.inpainting))
        rescale = check_rescale(guidance_rescale, self.config.uses_cfg)
        true_cfg = check_true_cfg(self.config.kind, self.manifest.family, true_cfg_scale, negatives)
        do_cfg = self.config.uses_cfg and guidance > 1.0
        if not do_cfg:
            given = {
                "the negative prompt": any(negatives) and true_cfg is None,
                "guidance rescale": bool(rescale),
                "the negative size conditioning": sizing.has_negatives,
                "the negative aesthetic score": negative_aesthetic_score is not None,
            }
            warn_unguided(self.config.uses_cfg, guidance, given, bool(self.config.kind.true_cfg))
        per_prompt = check_images(images, do_cfg, len(prompts), self.max_batch)
        images = per_prompt * len(prompts)
        if self.check_shapes is not None:  # before the text encoders run, not at step 1
            rows = images * (2 if do_cfg else 1)
            latent = self.conditioning.latent_shape(height, width, rows)
            self.check_shapes({self.config.kind.sample_input: latent})
        call = Call(
            prompts=prompts,
            negatives=negatives,
            per_prompt=per_prompt,
            images=images,
            steps=steps,
            height=height,
            width=width,
            seed=seed,
            latents=latents,
            output=output,
            eta=eta,
            on_step=on_step,
            guided=Guidance(do_cfg, guidance, rescale, true_cfg),
            sizing=sizing,
            aesthetic=aesthetic,
            control=control,
            guess=guess,
            pixels=pixels,
            mask_image=mask_image,
            strength=strength,
            start_at=start_at,
            end_at=end_at,
            start=start,
        )
        return generate(self, call)

    def make_scheduler(self, steps: int, height: int, width: int, eta: float | None) -> Scheduler:
        """A fresh scheduler with this call's schedule (and TCD's eta) set; a step count the
        scheduler cannot take (LCM: at most its original_inference_steps) is the caller's
        error."""
        scheduler = scheduler_from_config(self.scheduler_config)
        set_eta(scheduler, eta)
        try:
            self.conditioning.set_timesteps(scheduler, steps, height, width)
        except ValueError as err:
            name = type(scheduler).__name__
            raise UserError(f"{steps} steps with {name}: {err}") from None
        return scheduler


def _conditioning_record(config: PipelineSpec) -> dict[str, Any]:
    """The `pipeline` record as Conditioning reads it: a dict, `kind` the validated KindSpec."""
    return {**config.model_dump(), "kind": config.kind}
