"""The torch-free runtime reproduces diffusers, family by family, from an exported bundle.

Each tiny model is exported with `slimdiff.export.export_bundle`, then generated twice
from the same initial latents: once by its diffusers pipeline (torch) and once by
`Text2ImagePipeline` (numpy + onnxruntime). Images must agree to >= 40 dB PSNR and the
final latents to 1e-4 of the denoiser's contribution (the final latents less those of the
same run with the denoiser's output zeroed). Bundles are built once per session (tests/conftest.py).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from slimdiff.runtime import BundleError, Text2ImagePipeline

from slimdiff.errors import UserError
from tests.unit.test_scheduler_edm import PLAYGROUND  # Playground v2.5's scheduler config

pytestmark = pytest.mark.slow

STEPS = 4
PROMPT = "a red circle on a blue background"
SIZE = 64  # a multiple of 16: valid for every family (FLUX packs 2x2 latent patches)

# (family, guidance, negative prompt): SDXL with no negative exercises the zeroed negative
# embeddings, with one the encoded negative; SD1.5 at guidance 1 runs without CFG.
CASES = [
    ("sd15", 5.0, None),
    ("sd15", 1.0, None),
    ("sdxl", 5.0, None),
    ("sdxl", 5.0, "blurry, low quality"),
    ("sd3", 5.0, None),
    ("flux", 3.5, None),
]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _diffusers(
    pipe,
    latents: np.ndarray,
    guidance: float,
    negative: str | list[str] | None,
    zero=False,
    prompt: str | list[str] = PROMPT,
    **call,
):
    """diffusers' image (a list of all images with num_images_per_prompt) and final
    latents (as output_type="latent" returns them).

    `zero`: the denoiser's output replaced by zeros, so what remains is the scheduler's
    arithmetic on the initial noise: the runtime must match the denoiser's contribution,
    which on tiny random weights is small next to the noise itself."""
    final = {}
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    handle = denoiser.register_forward_hook(
        lambda _m, _a, out: (torch.zeros_like(out[0]), *out[1:]) if zero else None
    )

    def keep_last(_pipe, step, _t, kwargs):
        final["latents"] = kwargs["latents"].numpy().copy()
        return kwargs

    extra = {} if negative is None else {"negative_prompt": negative}
    images = pipe(
        prompt,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        height=SIZE,
        width=SIZE,
        latents=torch.from_numpy(latents.copy()),
        callback_on_step_end=keep_last,
        **extra,
        **call,
    ).images
    handle.remove()
    if "num_images_per_prompt" in call:
        return [np.array(image) for image in images], final["latents"]
    return np.array(images[0]), final["latents"]


def _assert_close_to_diffusers(latents, ref_latents, no_model, label: str) -> None:
    """Final latents within 1e-4 of the denoiser's contribution (module docstring), and
    that contribution large enough to mean something."""
    contribution = np.linalg.norm(ref_latents - no_model)
    assert contribution > 0.1 * np.linalg.norm(ref_latents)  # the denoiser did something
    rel = np.linalg.norm(latents - ref_latents) / contribution
    assert rel < 1e-4, f"{label}: final latents off by {rel:.2e} of the denoiser's contribution"


@pytest.mark.parametrize(("family", "guidance", "negative"), CASES)
def test_runtime_matches_diffusers(tiny_bundle, family, guidance, negative):
    model, bundle = tiny_bundle(family)
    runtime = Text2ImagePipeline.from_bundle(bundle, backend="ort-cpu")
    shape = runtime.conditioning.latent_shape(SIZE, SIZE)
    latents = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    model.pipe.set_progress_bar_config(disable=True)
    ref_image, ref_latents = _diffusers(model.pipe, latents, guidance, negative)
    _, no_model = _diffusers(model.pipe, latents, guidance, negative, zero=True)

    result = runtime(
        PROMPT,
        negative_prompt=negative,
        steps=STEPS,
        guidance=guidance,
        size=(SIZE, SIZE),
        latents=latents,
    )

    assert result.image.shape == (SIZE, SIZE, 3) and result.image.dtype == np.uint8
    assert result.latents.shape == ref_latents.shape and result.latents.dtype == np.float32
    # Error relative to what the denoiser changed (measured 2e-7 to 3e-6 on all six
    # cases), not to the latents, which are mostly the initial noise: text states scaled
    # by 0.9995 in the runtime are 8e-5 of the latents but 2e-4 of the contribution.
    _assert_close_to_diffusers(result.latents, ref_latents, no_model, family)
    psnr = _psnr(result.image, ref_image)
    assert psnr >= 40.0, f"{family}: PSNR {psnr:.1f} dB"
    timings = result.timings_ms
    assert set(timings) == {"text_encoders", "denoiser_steps", "vae_decode", "end_to_end"}
    assert len(timings["denoiser_steps"]) == STEPS
    assert timings["end_to_end"] >= sum(timings["denoiser_steps"]) > 0


# Other schedulers than the bundle's (`slimdiff run --scheduler`): the runtime's switch
# must build what diffusers' from_config builds, and sample as diffusers does. The
# stochastic ones (euler-a, lcm) get the runtime's step noise in diffusers too.
SWITCHED = [
    *("pndm", "dpm++2m-karras", "unipc", "ddim", "euler-karras", "heun", "dpm2-karras"),
    *("euler-a", "lcm", "dpm++2m-sde-karras", "tcd"),
    *("lms", "deis", "dpm++2s", "dpm2-a", "ddpm"),
]


def _runtime_step_noise(seed: int):
    """diffusers' randn_tensor, returning the runtime's per-step noise draws in order."""
    from slimdiff.runtime.denoise_loop import STEP_NOISE_STREAM

    rng = np.random.default_rng([STEP_NOISE_STREAM, seed])
    return lambda shape, **_: torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))


@pytest.mark.parametrize("name", SWITCHED)
def test_switched_scheduler_matches_diffusers(tiny_bundle, name, monkeypatch):
    import importlib

    import diffusers
    from slimdiff.runtime.schedulers import SCHEDULER_ALIASES

    model, bundle = tiny_bundle("sd15")
    runtime = Text2ImagePipeline.from_bundle(bundle, scheduler=name)
    class_name, overrides = SCHEDULER_ALIASES[name]
    assert runtime.scheduler_config["_class_name"] == class_name
    ref = getattr(diffusers, class_name).from_config(model.pipe.scheduler.config, **overrides)
    module = importlib.import_module(type(ref).__module__)

    def same_step_noise():  # each diffusers run draws the runtime's step noise from the start
        if hasattr(module, "randn_tensor"):
            monkeypatch.setattr(module, "randn_tensor", _runtime_step_noise(0))

    result = _assert_same_run(model, runtime, ref, seed=2, label=name, before_each=same_step_noise)
    # "pndm" is PLMS as SD configures it (skip_prk_steps): one more call, the Heun-like start;
    # Heun calls twice per step but the last
    calls = {"PNDMScheduler": STEPS + 1, "HeunDiscreteScheduler": 2 * STEPS - 1}
    calls["KDPM2DiscreteScheduler"] = 2 * STEPS - 1  # DPM2 too, through the midpoints
    calls["KDPM2AncestralDiscreteScheduler"] = 2 * STEPS - 1
    assert len(result.timings_ms["denoiser_steps"]) == calls.get(class_name, STEPS)


@pytest.mark.parametrize(
    ("name", "sigmas"), [(None, "beta"), ("dpm++2m-karras", "exponential"), ("unipc", "karras")]
)
def test_sigmas_option_matches_diffusers(tiny_bundle, name, sigmas):
    """`run --sigmas` (after any --scheduler): diffusers' class with use_<sigmas>_sigmas."""
    import diffusers
    from slimdiff.runtime.schedulers import SCHEDULER_ALIASES

    model, bundle = tiny_bundle("sd15")
    runtime = Text2ImagePipeline.from_bundle(bundle, scheduler=name, sigmas=sigmas)
    original = model.pipe.scheduler
    class_name, overrides = SCHEDULER_ALIASES.get(name, (type(original).__name__, {}))
    flags = {f"use_{s}_sigmas": s == sigmas for s in ("karras", "exponential", "beta")}
    ref = getattr(diffusers, class_name).from_config(original.config, **{**overrides, **flags})
    _assert_same_run(model, runtime, ref, seed=4, label=f"{name}+{sigmas}")


def _assert_same_run(model, runtime, scheduler, seed: int, label: str, before_each=None):
    """The runtime's run and diffusers' with `scheduler` in the shared model's pipeline (put
    back after) on the same latents: within 1e-4 of the contribution, >= 40 dB.
    `before_each` runs before each of diffusers' two runs (a stochastic scheduler's noise)."""
    shape = runtime.conditioning.latent_shape(SIZE, SIZE)
    latents = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    original, model.pipe.scheduler = model.pipe.scheduler, scheduler
    reset = before_each or (lambda: None)
    try:
        model.pipe.set_progress_bar_config(disable=True)
        reset()
        ref_image, ref_latents = _diffusers(model.pipe, latents, 5.0, None)
        reset()
        _, no_model = _diffusers(model.pipe, latents, 5.0, None, zero=True)
    finally:
        model.pipe.scheduler = original
    result = runtime(PROMPT, steps=STEPS, guidance=5.0, size=(SIZE, SIZE), latents=latents)
    _assert_close_to_diffusers(result.latents, ref_latents, no_model, label)
    assert _psnr(result.image, ref_image) >= 40.0
    return result


@pytest.mark.parametrize("name", ["euler-a", "lcm"])
def test_stochastic_scheduler_is_seeded(tiny_bundle, name):
    """Fresh noise per step comes from the seed: same seed, same image; its own stream,
    so the initial latents are still the seed's (and --latents are honoured)."""
    _, bundle = tiny_bundle("sd15")
    runtime = Text2ImagePipeline.from_bundle(bundle, scheduler=name)
    plain = Text2ImagePipeline.from_bundle(bundle)
    run = {"steps": 3, "size": (SIZE, SIZE), "output": "latent"}
    first, again = (runtime(PROMPT, seed=5, **run).latents for _ in range(2))
    np.testing.assert_array_equal(first, again)
    other = runtime(PROMPT, seed=6, **run).latents
    assert np.abs(other - first).max() > 1e-2
    noise = np.random.default_rng(5).standard_normal((1, 4, SIZE // 8, SIZE // 8))
    given = runtime(PROMPT, latents=noise, **run).latents  # seed 0 for the step noise
    assert np.abs(given - first).max() > 1e-2  # same start, other step noise
    # a deterministic scheduler gives the same result for the seed and its noise
    np.testing.assert_array_equal(
        plain(PROMPT, seed=5, **run).latents, plain(PROMPT, latents=noise, **run).latents
    )


@pytest.mark.parametrize(
    ("family", "name"),
    [
        ("sd3", "flow-heun"),
        ("sd3", "flow-dpm++2m"),
        ("sd3", "flow-unipc"),
        ("flux", "flow-unipc"),
        ("flux", "flow-dpm++2m"),
    ],
)
def test_flow_schedulers_match_diffusers(tiny_bundle, family, name):
    """SD3 sampled with flow-match Heun (`--scheduler flow-heun`: 2n - 1 calls), and with
    DPM-Solver++ 2M and UniPC on flow sigmas (the model's shift as flow_shift); FLUX with
    UniPC and DPM-Solver++, which FluxPipeline gives mu but not its sigmas."""
    import diffusers

    model, bundle = tiny_bundle(family)
    runtime = Text2ImagePipeline.from_bundle(bundle, scheduler=name)
    original = model.pipe.scheduler
    if name == "flow-heun":
        ref = diffusers.FlowMatchHeunDiscreteScheduler.from_config(original.config)
    else:
        shift = original.config.shift
        assert runtime.scheduler_config["flow_shift"] == shift
        cls = "DPMSolverMultistepScheduler" if name == "flow-dpm++2m" else "UniPCMultistepScheduler"
        ref = getattr(diffusers, cls).from_config(
            original.config,
            use_flow_sigmas=True,
            prediction_type="flow_prediction",
            flow_shift=shift,
        )
    result = _assert_same_run(model, runtime, ref, seed=5, label=name)
    calls = 2 * STEPS - 1 if name == "flow-heun" else STEPS
    assert len(result.timings_ms["denoiser_steps"]) == calls


def test_dpm_sde_matches_diffusers_given_the_runtime_noise(tiny_bundle, monkeypatch):
    """DPM++ SDE Karras through the runtime's loop (two calls a step, noise on all but the
    last) against diffusers, whose Brownian-tree sampler is replaced by one built from the
    runtime's draws (tests/unit/test_scheduler_dpm_sde.py)."""
    pytest.importorskip("torchsde")
    import diffusers
    from diffusers.schedulers import scheduling_dpmsolver_sde

    from tests.unit.test_scheduler_dpm_sde import BrownianFromDraws

    def sampler_from_runtime_stream():
        draw = _runtime_step_noise(0)

        class Sampler(BrownianFromDraws):
            def __call__(self, sigma, sigma_next):
                self.draws.append(draw(self.shape).numpy())
                return super().__call__(sigma, sigma_next)

        def build(x, *_args, **_kwargs):
            sampler = Sampler([])
            sampler.shape = tuple(x.shape)
            return sampler

        monkeypatch.setattr(scheduling_dpmsolver_sde, "BrownianTreeNoiseSampler", build)

    model, bundle = tiny_bundle("sd15")
    runtime = Text2ImagePipeline.from_bundle(bundle, scheduler="dpm++sde-karras")
    shape = runtime.conditioning.latent_shape(SIZE, SIZE)
    latents = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    original = model.pipe.scheduler
    model.pipe.scheduler = diffusers.DPMSolverSDEScheduler.from_config(
        original.config, use_karras_sigmas=True
    )
    try:
        model.pipe.set_progress_bar_config(disable=True)
        sampler_from_runtime_stream()
        ref_image, ref_latents = _diffusers(model.pipe, latents, 5.0, None)
        sampler_from_runtime_stream()
        _, no_model = _diffusers(model.pipe, latents, 5.0, None, zero=True)
    finally:
        model.pipe.scheduler = original
    result = runtime(PROMPT, steps=STEPS, guidance=5.0, size=(SIZE, SIZE), latents=latents)
    _assert_close_to_diffusers(result.latents, ref_latents, no_model, "dpm++sde-karras")
    assert _psnr(result.image, ref_image) >= 40.0
    assert len(result.timings_ms["denoiser_steps"]) == 2 * STEPS - 1


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_tcd_gamma_matches_diffusers(tiny_bundle, eta, monkeypatch):
    """TCD's strategic stochastic sampling: `eta` as diffusers' pipelines pass it to
    TCDScheduler.step, the re-noising drawn from the runtime's step-noise stream."""
    import diffusers
    from diffusers.schedulers import scheduling_tcd

    model, bundle = tiny_bundle("sd15")
    runtime = Text2ImagePipeline.from_bundle(bundle, scheduler="tcd")
    shape = runtime.conditioning.latent_shape(SIZE, SIZE)
    latents = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    original = model.pipe.scheduler
    model.pipe.scheduler = diffusers.TCDScheduler.from_config(original.config)
    try:
        model.pipe.set_progress_bar_config(disable=True)
        refs = []
        for zero in (False, True):
            monkeypatch.setattr(scheduling_tcd, "randn_tensor", _runtime_step_noise(4))
            refs.append(_diffusers(model.pipe, latents, 5.0, None, zero=zero, eta=eta))
    finally:
        model.pipe.scheduler = original
    (ref_image, ref_latents), (_, no_model) = refs
    call = {"steps": STEPS, "guidance": 5.0, "size": (SIZE, SIZE), "latents": latents}
    result = runtime(PROMPT, seed=4, eta=eta, **call)
    _assert_close_to_diffusers(result.latents, ref_latents, no_model, f"tcd eta {eta}")
    assert _psnr(result.image, ref_image) >= 40.0
    deterministic = runtime(PROMPT, seed=4, **call).latents  # eta 0, diffusers' default
    assert np.abs(deterministic - result.latents).max() > 1e-2
    with pytest.raises(UserError, match="use a value from 0 to 1"):
        runtime(PROMPT, eta=1.5, **call)
    with pytest.raises(UserError, match="EulerDiscreteScheduler takes no eta"):
        Text2ImagePipeline.from_bundle(bundle, scheduler="euler")(PROMPT, eta=0.3, **call)


def test_scheduler_choice_errors(tiny_bundle):
    _, bundle = tiny_bundle("sd15")
    with pytest.raises(UserError, match=r"unknown scheduler 'k_euler'"):
        Text2ImagePipeline.from_bundle(bundle, scheduler="k_euler")
    mismatch = "samples the flow matching process, the model was trained for the discrete-time VP"
    with pytest.raises(UserError, match=mismatch):
        Text2ImagePipeline.from_bundle(bundle, scheduler="flow-euler")
    lcm = Text2ImagePipeline.from_bundle(bundle, scheduler="lcm")
    with pytest.raises(UserError, match=r"60 steps with LCMScheduler.*1\.\.50"):
        lcm(PROMPT, steps=60, size=(SIZE, SIZE), output="latent")


@pytest.fixture(scope="module")
def lcm_unet_bundle(tmp_path_factory):
    """tiny:<family> with an LCM-distilled UNet's guidance embedding (time_cond_proj_dim:
    `timestep_cond` in, no CFG batch) and LCMScheduler, tiny_bundle unfused (quicker)."""
    import diffusers
    from slimdiff.export import export_bundle

    from slimdiff.models import load_model

    def get(family: str):
        model = load_model(f"tiny:{family}")
        pipe = model.pipe
        config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
        torch.manual_seed(0)  # the new cond_proj layer; the rest keeps tiny's weights
        unet = diffusers.UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": 24})
        missing, _ = unet.load_state_dict(pipe.unet.state_dict(), strict=False)
        assert all(k.startswith("time_embedding.cond_proj") for k in missing)
        pipe.unet = unet
        pipe.scheduler = diffusers.LCMScheduler.from_config(pipe.scheduler.config)
        folder = tmp_path_factory.mktemp(f"lcm-{family}") / "model"
        pipe.save_pretrained(folder)
        saved = load_model(str(folder))  # loaded back as a user's LCM checkpoint folder
        export_bundle(saved, folder.parent / "bundle", optimize=False)
        return load_model(str(folder)), folder.parent / "bundle"

    return get


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_lcm_unet_matches_diffusers(lcm_unet_bundle, family, monkeypatch):
    """The guidance scale goes in as LCM's w-embedding, with no CFG batch, as diffusers'
    SD and SDXL pipelines run a UNet with time_cond_proj_dim; 4 LCM steps."""
    model, bundle = lcm_unet_bundle(family)
    runtime = Text2ImagePipeline.from_bundle(bundle)
    assert not runtime.config.uses_cfg
    assert runtime.config.kind.guidance_embedding_dim == 24
    assert "timestep_cond" in runtime.denoiser.input_names
    shape = runtime.conditioning.latent_shape(SIZE, SIZE)
    latents = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    module = "diffusers.schedulers.scheduling_lcm"
    model.pipe.set_progress_bar_config(disable=True)
    monkeypatch.setattr(f"{module}.randn_tensor", _runtime_step_noise(0))
    ref_image, ref_latents = _diffusers(model.pipe, latents, 8.0, None)
    monkeypatch.setattr(f"{module}.randn_tensor", _runtime_step_noise(0))
    _, no_model = _diffusers(model.pipe, latents, 8.0, None, zero=True)
    result = runtime(PROMPT, steps=STEPS, guidance=8.0, size=(SIZE, SIZE), latents=latents)
    _assert_close_to_diffusers(result.latents, ref_latents, no_model, family)
    assert _psnr(result.image, ref_image) >= 40.0
    # the embedding carries the guidance: another scale gives another image
    other = runtime(PROMPT, steps=STEPS, guidance=2.0, size=(SIZE, SIZE), latents=latents)
    assert np.abs(other.latents - result.latents).max() > 1e-3


def test_a_latent_consistency_pipeline_folder_loads_as_sd15(lcm_unet_bundle, tmp_path, monkeypatch):
    """LCM-Dreamshaper's hub layout: model_index.json names LatentConsistencyModelPipeline.
    Loaded (in memory or lazily) as the StableDiffusionPipeline it holds; its bundle draws
    what diffusers' LatentConsistencyModelPipeline draws."""
    import diffusers
    from slimdiff.export import export_bundle

    from slimdiff.models import load_model

    model, _ = lcm_unet_bundle("sd15")
    lcm = diffusers.LatentConsistencyModelPipeline(**model.pipe.components)
    lcm.save_pretrained(tmp_path / "lcm")
    index = json.loads((tmp_path / "lcm" / "model_index.json").read_text())
    assert index["_class_name"] == "LatentConsistencyModelPipeline"
    for weights in ("memory", "lazy"):
        loaded = load_model(str(tmp_path / "lcm"), weights=weights)
        assert type(loaded.pipe).__name__ == "StableDiffusionPipeline"
        assert loaded.arch.family == "sd15"
    export_bundle(loaded, tmp_path / "b", optimize=False)
    runtime = Text2ImagePipeline.from_bundle(tmp_path / "b")
    shape = runtime.conditioning.latent_shape(SIZE, SIZE)
    latents = np.random.default_rng(8).standard_normal(shape).astype(np.float32)
    lcm.set_progress_bar_config(disable=True)
    module = "diffusers.schedulers.scheduling_lcm"
    monkeypatch.setattr(f"{module}.randn_tensor", _runtime_step_noise(0))
    ref_image, ref_latents = _diffusers(lcm, latents, 8.0, None)
    monkeypatch.setattr(f"{module}.randn_tensor", _runtime_step_noise(0))
    _, no_model = _diffusers(lcm, latents, 8.0, None, zero=True)
    result = runtime(PROMPT, steps=STEPS, guidance=8.0, size=(SIZE, SIZE), latents=latents)
    _assert_close_to_diffusers(result.latents, ref_latents, no_model, "lcm pipeline folder")
    assert _psnr(result.image, ref_image) >= 40.0


def test_playground_like_sdxl_matches_diffusers(tmp_path):
    """Playground v2.5's layout: EDMDPMSolverMultistepScheduler (the UNet gets log(sigma)/4
    as its timestep, inputs scaled by c_in) and a VAE config with per-channel
    latents_mean/std, which SDXL's pipeline decodes as latents * std / scaling + mean."""
    import diffusers
    from slimdiff.export import export_bundle

    from slimdiff.models import load_model

    model = load_model("tiny:sdxl")
    mean, std = [0.5, -0.3, 0.2, 0.1], [0.8, 1.3, 0.9, 1.1]
    model.pipe.vae.register_to_config(latents_mean=mean, latents_std=std)
    model.pipe.scheduler = diffusers.EDMDPMSolverMultistepScheduler(**PLAYGROUND)
    export_bundle(model, tmp_path / "b", optimize=False)
    shipped = json.loads((tmp_path / "b/scheduler/scheduler_config.json").read_text())
    assert shipped["_class_name"] == "EDMDPMSolverMultistepScheduler"
    pipeline = json.loads((tmp_path / "b" / "manifest.json").read_text())["pipeline"]
    assert (pipeline["vae_latents_mean"], pipeline["vae_latents_std"]) == (mean, std)
    runtime = Text2ImagePipeline.from_bundle(tmp_path / "b")
    latents = (
        np.random.default_rng(4)
        .standard_normal(runtime.conditioning.latent_shape(SIZE, SIZE))
        .astype(np.float32)
    )
    model.pipe.set_progress_bar_config(disable=True)
    ref_image, ref_latents = _diffusers(model.pipe, latents, 5.0, None)
    _, no_model = _diffusers(model.pipe, latents, 5.0, None, zero=True)
    result = runtime(PROMPT, steps=STEPS, guidance=5.0, size=(SIZE, SIZE), latents=latents)
    _assert_close_to_diffusers(result.latents, ref_latents, no_model, "playground-like")
    assert _psnr(result.image, ref_image) >= 40.0
    with pytest.raises(UserError, match="the model was trained for the EDM one"):
        Text2ImagePipeline.from_bundle(tmp_path / "b", scheduler="euler")
    # the statistics matter: decoding without them gives another image
    from slimdiff.runtime.generate import decode_image

    plain = decode_image(runtime, result.latents, SIZE, SIZE)
    runtime.config = runtime.config.model_copy(update={"vae_latents_mean": None})
    assert _psnr(decode_image(runtime, result.latents, SIZE, SIZE), plain) < 30.0


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_guidance_rescale_matches_diffusers(tiny_bundle, family):
    """diffusers' guidance_rescale (rescale_noise_cfg), as SD1.5/SDXL pipelines apply it."""
    model, bundle = tiny_bundle(family)
    runtime = Text2ImagePipeline.from_bundle(bundle)
    shape = runtime.conditioning.latent_shape(SIZE, SIZE)
    latents = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    model.pipe.set_progress_bar_config(disable=True)
    ref_image, ref_latents = _diffusers(model.pipe, latents, 5.0, None, guidance_rescale=0.7)
    # the scheduler's arithmetic alone (a zero prediction has no std to rescale)
    _, no_model = _diffusers(model.pipe, latents, 5.0, None, zero=True)
    call = {"steps": STEPS, "guidance": 5.0, "size": (SIZE, SIZE), "latents": latents}
    result = runtime(PROMPT, guidance_rescale=0.7, **call)
    _assert_close_to_diffusers(result.latents, ref_latents, no_model, f"{family} rescale")
    assert _psnr(result.image, ref_image) >= 40.0
    plain = runtime(PROMPT, **call).latents  # and the rescale did something
    assert np.linalg.norm(plain - result.latents) > 1e-3 * np.linalg.norm(ref_latents - no_model)
    with pytest.raises(UserError, match="from 0 to 1"):
        runtime(PROMPT, guidance_rescale=1.5, **call)


def test_guidance_rescale_needs_a_model_that_uses_cfg(tiny_bundle):
    _, bundle = tiny_bundle("flux")
    runtime = Text2ImagePipeline.from_bundle(bundle)
    with pytest.raises(UserError, match="needs classifier-free guidance"):
        runtime(PROMPT, steps=1, size=(SIZE, SIZE), guidance_rescale=0.5)


def test_flux_true_cfg_matches_diffusers(tiny_bundle, caplog):
    """FluxPipeline's true_cfg_scale: a second transformer pass on the negative prompt,
    neg + scale * (pos - neg), the embedded guidance unchanged."""
    model, bundle = tiny_bundle("flux")
    runtime = Text2ImagePipeline.from_bundle(bundle)
    shape = runtime.conditioning.latent_shape(SIZE, SIZE)
    latents = np.random.default_rng(6).standard_normal(shape).astype(np.float32)
    model.pipe.set_progress_bar_config(disable=True)
    negative = "blurry, low quality"
    ref_image, ref_latents = _diffusers(model.pipe, latents, 3.5, negative, true_cfg_scale=4.0)
    _, no_model = _diffusers(model.pipe, latents, 3.5, negative, zero=True, true_cfg_scale=4.0)
    call = {"steps": STEPS, "guidance": 3.5, "size": (SIZE, SIZE), "latents": latents}
    result = runtime(PROMPT, negative_prompt=negative, true_cfg_scale=4.0, **call)
    _assert_close_to_diffusers(result.latents, ref_latents, no_model, "flux true cfg")
    assert _psnr(result.image, ref_image) >= 40.0
    plain = runtime(PROMPT, **call).latents  # the negative pass did something
    assert np.linalg.norm(plain - result.latents) > 1e-3 * np.linalg.norm(ref_latents - no_model)
    # without a negative prompt diffusers runs no second pass, and says so; so does this
    with caplog.at_level("WARNING", logger="slimdiff.runtime.pipeline"):
        alone = runtime(PROMPT, true_cfg_scale=4.0, **call).latents
    np.testing.assert_array_equal(alone, plain)
    assert "true_cfg_scale 4 needs a negative prompt" in caplog.text
    # an empty negative prompt is one, as diffusers tests `negative_prompt is not None`
    _, ref_empty = _diffusers(model.pipe, latents, 3.5, "", true_cfg_scale=4.0)
    empty = runtime(PROMPT, negative_prompt="", true_cfg_scale=4.0, **call).latents
    _assert_close_to_diffusers(empty, ref_empty, no_model, "flux true cfg, empty negative")
    assert np.linalg.norm(empty - plain) > 1e-3 * np.linalg.norm(ref_latents - no_model)


def test_true_cfg_is_fluxs_alone(tiny_bundle):
    _, bundle = tiny_bundle("sd15")
    runtime = Text2ImagePipeline.from_bundle(bundle)
    call = {"steps": 1, "size": (SIZE, SIZE), "negative_prompt": "x"}
    with pytest.raises(UserError, match=r"true_cfg_scale is FLUX's .* this sd15 model guides with"):
        runtime(PROMPT, true_cfg_scale=3.0, **call)
    with pytest.raises(UserError, match="true_cfg_scale nan: use a finite value from 0 to 100"):
        runtime(PROMPT, true_cfg_scale=float("nan"), **call)


def test_sd2_style_v_prediction_zero_snr_matches_diffusers(tmp_path, caplog):
    """SD 2.x's layout in the SD1.5 family: linear proj_in/out, upcast attention, a head
    count per block, and a v-prediction DDIM with zero terminal SNR and trailing steps
    (SD 2.1-v fine-tunes), saved to a folder and exported from it with the fused graph."""
    import diffusers
    from slimdiff.export import export_bundle

    from slimdiff.models import load_model

    model = load_model("tiny:sd15")
    old = model.pipe.unet.config
    torch.manual_seed(0)
    model.pipe.unet = diffusers.UNet2DConditionModel(
        **{k: v for k, v in old.items() if not k.startswith("_")}
        | {"attention_head_dim": (2, 4, 8, 8), "use_linear_projection": True}
        | {"upcast_attention": True}
    )
    model.pipe.scheduler = diffusers.DDIMScheduler.from_config(
        model.pipe.scheduler.config,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        clip_sample=False,
    )
    model.pipe.save_pretrained(tmp_path / "sd2")
    folder = load_model(str(tmp_path / "sd2"))
    assert folder.arch.family == "sd15"
    export_bundle(folder, tmp_path / "b")
    runtime = Text2ImagePipeline.from_bundle(tmp_path / "b")
    latents = (
        np.random.default_rng(6)
        .standard_normal(runtime.conditioning.latent_shape(SIZE, SIZE))
        .astype(np.float32)
    )
    pipe = folder.pipe
    pipe.set_progress_bar_config(disable=True)
    ref_image, ref_latents = _diffusers(pipe, latents, 5.0, None, guidance_rescale=0.7)
    _, no_model = _diffusers(pipe, latents, 5.0, None, zero=True)
    call = {"steps": STEPS, "guidance": 5.0, "size": (SIZE, SIZE), "latents": latents}
    result = runtime(PROMPT, guidance_rescale=0.7, **call)
    _assert_close_to_diffusers(result.latents, ref_latents, no_model, "sd2-style")
    assert _psnr(result.image, ref_image) >= 40.0
    # a sampler without rescale_betas_zero_snr would drop it: said once, when switched
    with caplog.at_level("WARNING"):
        Text2ImagePipeline.from_bundle(tmp_path / "b", scheduler="dpm++2s")
    assert "DPMSolverSinglestepScheduler has no rescale_betas_zero_snr" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        Text2ImagePipeline.from_bundle(tmp_path / "b", scheduler="euler")
    assert "rescale_betas_zero_snr" not in caplog.text


def test_seed_gives_the_same_image_as_the_same_noise_passed_in(tiny_bundle):
    _, bundle = tiny_bundle("sd15")
    runtime = Text2ImagePipeline.from_bundle(bundle)
    seeded = runtime(PROMPT, steps=2, seed=3, size=(SIZE, SIZE), output="latent")
    noise = np.random.default_rng(3).standard_normal((1, 4, SIZE // 8, SIZE // 8))
    given = runtime(PROMPT, steps=2, size=(SIZE, SIZE), latents=noise, output="latent")
    np.testing.assert_array_equal(seeded.latents, given.latents)
    assert seeded.image is None and "vae_decode" not in seeded.timings_ms
    other = runtime(PROMPT, steps=2, seed=4, size=(SIZE, SIZE), output="latent")
    assert not np.allclose(other.latents, seeded.latents)


def test_tampered_bundle_fails_before_anything_loads(tiny_bundle, tmp_path, monkeypatch):
    _, bundle = tiny_bundle("sd15")
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    onnx_file = (
        copy / json.loads((copy / "manifest.json").read_text())["components"]["unet"]["path"]
    )
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_file.write_bytes(bytes(data))

    from slimdiff.runtime.backends.ort import OrtBackend

    def no_load(self, path):
        raise AssertionError(f"{path} loaded before the bundle was verified")

    monkeypatch.setattr(OrtBackend, "load", no_load)
    with pytest.raises(BundleError, match=r"unet/model.onnx does not match its SHA-256"):
        Text2ImagePipeline.from_bundle(copy)


def test_bad_size_is_a_user_error(tiny_bundle):
    _, bundle = tiny_bundle("sd15")
    runtime = Text2ImagePipeline.from_bundle(bundle)
    match = r"size 128x130 \(width x height\) is not a multiple of 8; use e.g. 128x128"
    with pytest.raises(UserError, match=match):
        runtime(PROMPT, size=(130, 128))


def test_flux_size_must_be_a_multiple_of_16(tiny_bundle):
    _, bundle = tiny_bundle("flux")
    runtime = Text2ImagePipeline.from_bundle(bundle)
    # (height, width) = (72, 64): 64 wide, 72 high, 80 the nearest height
    match = r"size 64x72 \(width x height\) is not a multiple of 16; use e.g. 64x80"
    with pytest.raises(UserError, match=match):
        runtime(PROMPT, size=(72, 64))


def test_unknown_backend_is_a_user_error(tiny_bundle):
    _, bundle = tiny_bundle("sd15")
    with pytest.raises(UserError, match="unknown backend 'tensorflow'; known backends: ort-cpu"):
        Text2ImagePipeline.from_bundle(bundle, backend="tensorflow")


def test_missing_onnxruntime_says_what_to_install(tiny_bundle):
    _, bundle = tiny_bundle("sd15")
    code = textwrap.dedent(
        f"""
        import importlib.machinery

        # onnxruntime off the path, as where it was never installed
        find = importlib.machinery.PathFinder.find_spec

        def hidden(name, path=None, target=None):
            return None if name.split(".")[0] == "onnxruntime" else find(name, path, target)

        importlib.machinery.PathFinder.find_spec = hidden
        from slimdiff.errors import UserError
        from slimdiff.runtime import Text2ImagePipeline
        try:
            Text2ImagePipeline.from_bundle({str(bundle)!r})
        except UserError as err:
            print("USERERROR", err)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "USERERROR backend ort-cpu needs onnxruntime" in out.stdout
    assert "pip install 'slimdiff[cpu]'" in out.stdout


def test_missing_bundle_is_a_bundle_error(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        Text2ImagePipeline.from_bundle(Path(tmp_path) / "nope")


def test_sd3_without_t5_matches_diffusers(tiny_bundle, tmp_path):
    """`export --drop-text-encoder text_encoder_3`: no T5 graph or tokenizer in the bundle,
    and zeros in its place, as diffusers' SD3 pipeline feeds them with text_encoder_3=None;
    with a negative prompt, so both halves of the CFG batch get them."""
    from click.testing import CliRunner

    from slimdiff.cli import main
    from slimdiff.models import load_model

    out = tmp_path / "b"
    args = ["export", "tiny:sd3", "--out", str(out), "--drop-text-encoder", "text_encoder_3"]
    args.append("--vae-encoder")  # as the shared bundles
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    _, full = tiny_bundle("sd3")
    assert {p.name for p in full.iterdir()} - {p.name for p in out.iterdir()} == {
        "text_encoder_3",
        "tokenizer_3",
    }
    verify = CliRunner().invoke(main, ["verify", str(out)])
    assert "(without text_encoder_3: zeros in its place), 11 files" in verify.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pipeline"]["zero_text"] == [
        {"name": "text_encoder_3", "segment": 1, "max_length": 256, "hidden_size": 64}
    ]
    runtime = Text2ImagePipeline.from_bundle(out)
    shape = runtime.conditioning.latent_shape(SIZE, SIZE)
    latents = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    pipe = load_model("tiny:sd3", without=("text_encoder_3",)).pipe
    pipe.set_progress_bar_config(disable=True)
    ref_image, ref_latents = _diffusers(pipe, latents, 5.0, "blurry")
    _, no_model = _diffusers(pipe, latents, 5.0, "blurry", zero=True)
    call = {"steps": STEPS, "guidance": 5.0, "size": (SIZE, SIZE), "latents": latents}
    result = runtime(PROMPT, negative_prompt="blurry", **call)
    _assert_close_to_diffusers(result.latents, ref_latents, no_model, "sd3 without T5")
    assert _psnr(result.image, ref_image) >= 40.0
    # T5 mattered: the bundle with it samples something else from the same noise
    with_t5 = Text2ImagePipeline.from_bundle(full)(PROMPT, negative_prompt="blurry", **call)
    assert np.linalg.norm(with_t5.latents - result.latents) > 1e-2 * np.linalg.norm(
        ref_latents - no_model
    )


def test_low_memory_holds_one_phase_at_a_time(tiny_bundle, monkeypatch):
    """low_memory: the text encoders, then the denoiser, then the VAE decoder are loaded
    while they run and released after, every call; the image is the resident mode's."""
    from slimdiff.runtime.sessions import OnDemandSession

    _, bundle = tiny_bundle("sdxl")
    low = Text2ImagePipeline.from_bundle(bundle, low_memory=True)
    encoders = [enc.session for enc in low.conditioning.encoders]
    sessions = {"text": encoders, "denoiser": [low.denoiser], "vae": [low.vae_decoder]}
    every = [*encoders, low.denoiser, low.vae_decoder]
    assert all(isinstance(s, OnDemandSession) and not s.loaded for s in every)
    held = []  # per run: which phases have a session loaded
    real_run = OnDemandSession.run

    def run(self, feeds):
        held.append({k for k, group in sessions.items() if any(s.loaded for s in group)})
        return real_run(self, feeds)

    monkeypatch.setattr(OnDemandSession, "run", run)
    call = {"steps": 3, "guidance": 5.0, "size": (SIZE, SIZE), "seed": 2}
    first = low(PROMPT, **call)
    again = low(PROMPT, **call)
    assert held[:2] == [{"text"}, {"text"}]  # CLIP-L, CLIP-G
    assert held[2:5] == [{"denoiser"}] * 3 and held[5] == {"vae"}
    assert len(held) == 12 and held[6:] == held[:6]
    assert not any(s.loaded for s in every)
    assert all(s.loads == 2 for s in every)
    assert first.timings_ms["load"] > 0 and len(first.timings_ms["denoiser_steps"]) == 3
    resident = Text2ImagePipeline.from_bundle(bundle)(PROMPT, **call)
    np.testing.assert_array_equal(first.latents, resident.latents)
    np.testing.assert_array_equal(again.image, resident.image)


def test_on_step_reports_every_denoiser_call(tiny_bundle):
    """`on_step(done, total)` after each denoiser call: Heun's 2n - 1 calls counted."""
    _, bundle = tiny_bundle("sd15")
    calls = []
    runtime = Text2ImagePipeline.from_bundle(bundle, scheduler="heun")
    runtime(PROMPT, steps=3, size=(SIZE, SIZE), output="latent", on_step=lambda *a: calls.append(a))
    assert calls == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]


def test_cli_low_memory_prints_the_loads(tiny_bundle, tmp_path):
    from click.testing import CliRunner

    from slimdiff.cli import main

    _, bundle = tiny_bundle("sd15")
    out = tmp_path / "x.png"
    args = ["run", str(bundle), "--prompt", "a cat", "--size", "64x64", "--steps", "2"]
    result = CliRunner().invoke(main, [*args, "--low-memory", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert re.search(r"2 steps, vae \d+, loads \d+\)$", result.output.strip()), result.output
    assert out.stat().st_size > 0


# Several images per call (`images`, diffusers' num_images_per_prompt): one denoiser batch.
IMAGE_CASES = [c for c in CASES if c[1] > 1.0]  # CFG: the negative rows repeat per image too


@pytest.mark.parametrize(("family", "guidance", "negative"), IMAGE_CASES)
def test_several_images_match_diffusers_num_images_per_prompt(
    tiny_bundle, family, guidance, negative
):
    model, bundle = tiny_bundle(family)
    runtime = Text2ImagePipeline.from_bundle(bundle)
    shape = runtime.conditioning.latent_shape(SIZE, SIZE, images=3)
    latents = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    model.pipe.set_progress_bar_config(disable=True)
    call = {"num_images_per_prompt": 3}
    ref_images, ref_latents = _diffusers(model.pipe, latents, guidance, negative, **call)
    _, no_model = _diffusers(model.pipe, latents, guidance, negative, zero=True, **call)

    result = runtime(
        PROMPT, negative_prompt=negative, steps=STEPS, guidance=guidance, size=(SIZE, SIZE),
        latents=latents, images=3,
    )  # fmt: skip

    assert result.latents.shape == ref_latents.shape == shape and shape[0] == 3
    for i in range(3):
        _assert_close_to_diffusers(result.latents[i], ref_latents[i], no_model[i], f"{i}")
    assert len(result.images) == 3 and result.image is result.images[0]
    assert all(im.shape == (SIZE, SIZE, 3) and im.dtype == np.uint8 for im in result.images)
    # decoded one at a time here, as one batch there
    assert all(_psnr(a, b) >= 40.0 for a, b in zip(result.images, ref_images, strict=True))
    assert len(result.timings_ms["denoiser_steps"]) == STEPS


PROMPTS = ["a red circle on a blue background", "a green square at the top"]


@pytest.mark.parametrize(
    ("family", "negative"),
    [("sdxl", None), ("sdxl", ["blurry", "low quality"]), ("sd15", "blurry"), ("flux", None)],
)
def test_a_list_of_prompts_matches_diffusers(tiny_bundle, family, negative):
    """Two prompts x two images: diffusers' batch order (p0, p0, p1, p1), negatives one for
    all or one per prompt (SDXL without one: zeros), each image its own prompt's."""
    model, bundle = tiny_bundle(family)
    runtime = Text2ImagePipeline.from_bundle(bundle)
    guidance = 3.5 if family == "flux" else 5.0
    shape = runtime.conditioning.latent_shape(SIZE, SIZE, images=4)
    latents = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    model.pipe.set_progress_bar_config(disable=True)
    # diffusers wants a list of negatives beside a list of prompts; the runtime takes one too
    both_negatives = [negative] * 2 if isinstance(negative, str) else negative
    call = {"prompt": PROMPTS, "num_images_per_prompt": 2}
    ref, ref_latents = _diffusers(model.pipe, latents, guidance, both_negatives, **call)
    _, no_model = _diffusers(model.pipe, latents, guidance, both_negatives, zero=True, **call)
    result = runtime(
        PROMPTS, negative_prompt=negative, steps=STEPS, guidance=guidance, size=(SIZE, SIZE),
        latents=latents, images=2,
    )  # fmt: skip
    assert len(result.images) == 4 and result.latents.shape == ref_latents.shape
    for i in range(4):  # each image within 1e-4 of what its own denoiser calls contributed
        _assert_close_to_diffusers(result.latents[i], ref_latents[i], no_model[i], f"{i}")
    assert all(_psnr(a, np.array(b)) >= 40.0 for a, b in zip(result.images, ref, strict=True))
    # swapping the prompts' rows would be far off: p0's and p1's contributions differ
    swapped = np.linalg.norm(ref_latents[0] - ref_latents[2] - (no_model[0] - no_model[2]))
    assert swapped > 1e-2 * np.linalg.norm(ref_latents[0] - no_model[0])
    # the two prompts' images differ where the same noise is given to both
    same_noise = np.concatenate([latents[:1]] * 2)
    both = runtime(PROMPTS, steps=2, guidance=guidance, size=(SIZE, SIZE), latents=same_noise)
    assert not np.allclose(both.latents[0], both.latents[1])


def test_bad_prompt_lists_are_user_errors(tiny_bundle):
    _, bundle = tiny_bundle("sd15")
    runtime = Text2ImagePipeline.from_bundle(bundle)
    call = {"steps": 1, "size": (SIZE, SIZE)}
    for bad, message in [
        ([], "non-empty list of strings"),
        (["a", 3], "prompts must be strings, not int"),
        (None, "a string or a non-empty list"),
    ]:
        with pytest.raises(UserError, match=message):
            runtime(bad, **call)
    with pytest.raises(UserError, match=r"a list of one per prompt \(2\)"):
        runtime(["a", "b"], negative_prompt=["x"], **call)
    with pytest.raises(UserError, match="2 prompts x 40 images = 80 images per call"):
        runtime(["a", "b"], images=40, **call)


# The stochastic ones add noise every step: each image draws it from a stream of its own
# (before, image 0 of a batch got other noise than a run of one from the second step on:
# euler-a's latents 3.4 apart, lcm's 8.4).
@pytest.mark.parametrize("scheduler", [None, "euler-a", "dpm++2m-sde", "lcm"])
def test_the_first_of_several_seeded_images_is_the_one_image_of_that_seed(tiny_bundle, scheduler):
    _, bundle = tiny_bundle("sdxl")
    runtime = Text2ImagePipeline.from_bundle(bundle, scheduler=scheduler)
    call = {"steps": 3, "seed": 5, "size": (SIZE, SIZE)}
    one = runtime(PROMPT, **call)
    three = runtime(PROMPT, images=3, **call)
    # the same noise and conditioning; only the batch size of the graphs' arithmetic differs
    np.testing.assert_allclose(three.latents[:1], one.latents, rtol=0, atol=1e-4)
    assert _psnr(three.images[0], one.image) >= 40.0
    # the others are other images: the seed's noise continues, it does not repeat
    assert not np.allclose(three.latents[1], three.latents[0], atol=0.1)
    assert not np.allclose(three.latents[2], three.latents[1], atol=0.1)


def test_images_out_of_range_are_user_errors(tiny_bundle):
    _, bundle = tiny_bundle("sd15")
    runtime = Text2ImagePipeline.from_bundle(bundle)
    for bad in (0, 65, 1.5, True):
        with pytest.raises(UserError, match=r"images .*: use an integer from 1 to 64"):
            runtime(PROMPT, steps=1, size=(SIZE, SIZE), images=bad)
    wrong = np.zeros(runtime.conditioning.latent_shape(SIZE, SIZE), np.float32)
    with pytest.raises(UserError, match=r"needs \(2, 4, 8, 8\) for 2 images"):
        runtime(PROMPT, steps=1, size=(SIZE, SIZE), images=2, latents=wrong)


def test_a_shape_bound_backend_refuses_more_images_than_the_profile_holds(tiny_bundle, monkeypatch):
    """A backend that runs only the profile's shapes (TensorRT, AOTInductor) gets its batch
    checked before any component runs; the bundle was exported for one image per call."""
    from slimdiff.runtime.backends.ort import OrtBackend

    _, bundle = tiny_bundle("sd15")
    assert Text2ImagePipeline.from_bundle(bundle).max_batch is None  # onnxruntime: any batch
    monkeypatch.setattr(OrtBackend, "shape_bound", lambda self, path: True, raising=False)
    runtime = Text2ImagePipeline.from_bundle(bundle)
    assert runtime.max_batch == 2  # one image, CFG's pair

    def no_run(feeds):
        raise AssertionError("a component ran")

    monkeypatch.setattr(runtime.conditioning.encoders[0].session, "run", no_run)
    with pytest.raises(UserError, match=r"built for at most 1 on this backend.*--max-images 2"):
        runtime(PROMPT, steps=1, size=(SIZE, SIZE), images=2, guidance=5.0)
    monkeypatch.undo()
    # without CFG two images make the same batch of 2
    result = runtime(PROMPT, steps=1, size=(SIZE, SIZE), images=2, guidance=1.0)
    assert result.latents.shape[0] == 2


def test_cli_writes_one_file_per_image(tiny_bundle, tmp_path):
    from click.testing import CliRunner

    from slimdiff.cli import main

    _, bundle = tiny_bundle("sd15")
    out = tmp_path / "cat.png"
    args = ["run", str(bundle), "--prompt", "a cat", "--size", "64x64", "--steps", "1"]
    result = CliRunner().invoke(main, [*args, "--images", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["cat-0.png", "cat-1.png"], written
    assert (tmp_path / "cat-0.png").read_bytes() != (tmp_path / "cat-1.png").read_bytes()
    assert result.output.startswith(f"{tmp_path / 'cat-0.png'}, {tmp_path / 'cat-1.png'}  (")
    bad = CliRunner().invoke(main, [*args, "--images", "0", "--out", str(out)])
    assert bad.exit_code == 2 and "--images" in bad.output
    # two prompts x two images: four files, prompt by prompt
    two = tmp_path / "two"
    two.mkdir()
    prompts = ["--prompt", "a dog"]
    done = CliRunner().invoke(main, [*args, *prompts, "--images", "2", "--out", str(two / "x.png")])
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in two.iterdir()) == [f"x-{i}.png" for i in range(4)]


def test_cli_takes_one_negative_prompt_per_prompt(tiny_bundle, tmp_path):
    """--negative-prompt repeated pairs with --prompt in order (the API's list); another
    count is refused before the bundle loads, not paired in silence with the last one."""
    from click.testing import CliRunner
    from slimdiff.runtime import Text2ImagePipeline
    from slimdiff.runtime.image import save_image

    from slimdiff.cli import main

    _, bundle = tiny_bundle("sd15")
    args = ["run", str(bundle), "--prompt", "a cat", "--prompt", "a dog", "--steps", "2"]
    negatives = ["--negative-prompt", "green", "--negative-prompt", "yellow"]
    done = CliRunner().invoke(main, [*args, *negatives, "--out", str(tmp_path / "x.png")])
    assert done.exit_code == 0, done.output
    pipe = Text2ImagePipeline.from_bundle(bundle)
    want = pipe(["a cat", "a dog"], negative_prompt=["green", "yellow"], steps=2).images
    for i, image in enumerate(want):
        save_image(image, tmp_path / f"want-{i}.png")
        assert (tmp_path / f"x-{i}.png").read_bytes() == (tmp_path / f"want-{i}.png").read_bytes()
    three = [*negatives, "--negative-prompt", "blue"]
    bad = CliRunner().invoke(main, [*args, *three, "--out", str(tmp_path / "y.png")])
    assert bad.exit_code == 2
    assert "--negative-prompt given 3 times for 2 --prompt: give one for every prompt" in bad.output


def test_images_per_call_tool_prints_both_timings(tiny_bundle):
    _, bundle = tiny_bundle("sd15")
    tool = Path(__file__).resolve().parents[2] / "tools" / "images_per_call.py"
    args = [str(bundle), "--images", "2", "--steps", "1", "--repeats", "1"]
    done = subprocess.run([sys.executable, str(tool), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)
    assert row["images"] == 2 and row["one_image_calls_ms"] > 0 and row["one_batched_call_ms"] > 0
    assert row["speedup"] == pytest.approx(
        row["one_image_calls_ms"] / row["one_batched_call_ms"], abs=0.01
    )


def test_cli_sigmas_on_a_scheduler_without_them_is_one_line(tiny_bundle, tmp_path):
    from click.testing import CliRunner

    from slimdiff.cli import main

    _, bundle = tiny_bundle("sd15")
    args = ["run", str(bundle), "--prompt", "a cat", "--out", str(tmp_path / "x.png")]
    done = CliRunner().invoke(main, [*args, "--scheduler", "ddim", "--sigmas", "karras"])
    assert done.exit_code == 2
    assert "sigmas: DDIMScheduler has no karras sigmas; pick a scheduler that has them" in (
        done.output
    )
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(("family", "name"), [("sdxl", None), ("sd15", "dpm++2m")])
def test_timestep_spacing_matches_diffusers(tiny_bundle, family, name):
    """`run --timestep-spacing trailing` (SDXL-Lightning's): diffusers' class built with
    timestep_spacing="trailing", after any --scheduler."""
    import diffusers
    from slimdiff.runtime.schedulers import SCHEDULER_ALIASES

    model, bundle = tiny_bundle(family)
    runtime = Text2ImagePipeline.from_bundle(bundle, scheduler=name, timestep_spacing="trailing")
    original = model.pipe.scheduler
    assert original.config.timestep_spacing != "trailing"  # the bundle's own is another
    class_name, overrides = SCHEDULER_ALIASES.get(name, (type(original).__name__, {}))
    spaced = {**overrides, "timestep_spacing": "trailing"}
    ref = getattr(diffusers, class_name).from_config(original.config, **spaced)
    _assert_same_run(model, runtime, ref, seed=6, label=f"{family} {name} trailing")


def test_cli_timestep_spacing_on_a_flow_model_is_one_line(tiny_bundle, tmp_path):
    from click.testing import CliRunner

    from slimdiff.cli import main

    _, bundle = tiny_bundle("flux")
    args = ["run", str(bundle), "--prompt", "a cat", "--out", str(tmp_path / "x.png")]
    done = CliRunner().invoke(main, [*args, "--timestep-spacing", "trailing"])
    assert done.exit_code == 2
    assert (
        "timestep spacing: FlowMatchEulerDiscreteScheduler has no timestep spacing; pick a "
        "scheduler that has one" in done.output
    )
    assert not (tmp_path / "x.png").exists()
    export = ["export", "tiny:flux", "--out", str(tmp_path / "b"), "--timestep-spacing", "trailing"]
    refused = CliRunner().invoke(main, export)
    assert refused.exit_code == 2 and "--timestep-spacing: FlowMatchEuler" in refused.output
    assert not (tmp_path / "b").exists()


def test_run_works_with_the_base_install_alone(tiny_bundle, tmp_path):
    # `pip install 'slimdiff[cpu]'`: no torch, diffusers, transformers, onnx, ... The image
    # equals the one of a full install, byte for byte.
    from slimdiff.app.extras import COMPRESS
    from tests.unit.test_extras import cli_without

    _, bundle = tiny_bundle("sd15")
    args = ["--threads", "1", "run", str(bundle), "--prompt", PROMPT, "--steps", "2", "--seed", "3"]
    base = cli_without(COMPRESS, *args, "--out", "base.png", cwd=tmp_path)
    assert base.returncode == 0, base.stderr
    full = cli_without((), *args, "--out", "full.png", cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    assert (tmp_path / "base.png").read_bytes() == (tmp_path / "full.png").read_bytes()
