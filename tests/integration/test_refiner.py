"""The SDXL refiner from a bundle reproduces diffusers' StableDiffusionXLImg2ImgPipeline
with requires_aesthetics_score: as image-to-image, and after a base model's
denoising_end as the "ensemble of expert denoisers" (denoising_start on the base's
latents). Final latents within 1e-4 of the denoisers' contribution, images to 40 dB, as in
test_runtime_vs_diffusers.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from slimdiff.runtime import Text2ImagePipeline, run_ensemble

from slimdiff.errors import UserError
from slimdiff.models.families import SDXL_REFINER
from tests.integration.test_img2img import _compare, test_image
from tests.integration.test_runtime_vs_diffusers import (
    PROMPT,
    SIZE,
    _assert_close_to_diffusers,
    _psnr,
)

pytestmark = pytest.mark.slow

STEPS = 10  # 0.8 of 10 leading-spaced steps: the base runs 8, the refiner 2
GUIDANCE = 5.0


@pytest.fixture(scope="module")
def refiner(shared_bundle):
    shared = shared_bundle("sdxl-refiner")
    return shared.model, shared.out


def test_the_refiner_loads_exports_and_says_so(refiner):
    model, bundle = refiner
    assert model.arch is SDXL_REFINER and model.arch.family == "sdxl"
    assert [s.name for s in model.text_encoders] == ["text_encoder_2"]
    runtime = Text2ImagePipeline.from_bundle(bundle)
    assert runtime.config.kind.aesthetic_score is True
    assert [r.name for r in runtime.config.text_encoders] == ["text_encoder_2"]
    assert runtime.config.force_zeros_for_empty_prompt is False


@pytest.mark.parametrize(("score", "negative"), [(None, None), (8.0, 1.0)])
def test_refiner_img2img_matches_diffusers(refiner, score, negative):
    model, bundle = refiner
    runtime = Text2ImagePipeline.from_bundle(bundle)
    scores = {"aesthetic_score": score, "negative_aesthetic_score": negative}
    result, ref_image, _ = _compare_scores(model, runtime, scores)
    assert _psnr(result.image, ref_image) >= 40.0


def _compare_scores(model, runtime, scores):
    given = {k: v for k, v in scores.items() if v is not None}
    return _compare(model, "sdxl", runtime, GUIDANCE, given=given)


def test_the_scores_reach_the_time_ids(refiner):
    _, bundle = refiner
    runtime = Text2ImagePipeline.from_bundle(bundle)
    args = {"steps": 4, "guidance": GUIDANCE, "image": test_image(), "strength": 0.5}
    plain = runtime(PROMPT, **args)
    same = runtime(PROMPT, aesthetic_score=6.0, negative_aesthetic_score=2.5, **args)
    other = runtime(PROMPT, aesthetic_score=9.0, **args)
    np.testing.assert_array_equal(plain.latents, same.latents)
    assert np.abs(plain.latents - other.latents).max() > 1e-4
    # the refiner's default strength is diffusers' 0.3: int(4 x 0.3) = 1 step
    assert len(runtime(PROMPT, steps=4, image=test_image()).timings_ms["denoiser_steps"]) == 1


def _diffusers_ensemble(base, ref, noise, scheduler_config, zero=False):
    """diffusers' base (denoising_end) then refiner (denoising_start) on `noise`; the
    refiner's final latents and image, and the base's latents."""
    # pipelines of their own: the shared models keep their schedulers
    pipes = base_pipe, ref_pipe = tuple(type(m.pipe).from_pipe(m.pipe) for m in (base, ref))
    handles = []
    for pipe in pipes:
        pipe.scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(
            scheduler_config
        )
        pipe.set_progress_bar_config(disable=True)
        if zero:
            handles.append(
                pipe.unet.register_forward_hook(
                    lambda _m, _a, out: (torch.zeros_like(out[0]), *out[1:])
                )
            )
    common = {"num_inference_steps": STEPS, "guidance_scale": GUIDANCE}
    handoff = base_pipe(
        PROMPT,
        latents=torch.from_numpy(noise),
        height=SIZE,
        width=SIZE,
        denoising_end=0.8,
        output_type="latent",
        **common,
    ).images
    final = {}

    def keep_last(_pipe, _step, _t, kwargs):
        final["latents"] = kwargs["latents"].numpy().copy()
        return kwargs

    image = ref_pipe(
        PROMPT, image=handoff, denoising_start=0.8, callback_on_step_end=keep_last, **common
    ).images[0]
    for handle in handles:
        handle.remove()
    return final["latents"], np.array(image), handoff.numpy()


@pytest.mark.parametrize("scheduler", [None, "heun", "dpm++2m"])
def test_ensemble_matches_diffusers(shared_bundle, refiner, scheduler):
    """diffusers' base + refiner recipe: the base stops at 0.8 and the refiner continues
    its latents; Heun (two calls per step) exercises the start's second-order rule."""
    base = shared_bundle("sdxl", False)
    ref_model, ref_bundle = refiner
    base_rt = Text2ImagePipeline.from_bundle(base.out, scheduler=scheduler)
    ref_rt = Text2ImagePipeline.from_bundle(ref_bundle, scheduler=scheduler)
    shape = base_rt.conditioning.latent_shape(SIZE, SIZE)
    noise = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    args = (base.model, ref_model, noise)
    ref_latents, ref_image, ref_handoff = _diffusers_ensemble(*args, base_rt.scheduler_config)
    no_model, _, _ = _diffusers_ensemble(*args, base_rt.scheduler_config, zero=True)
    seen = []
    first, second = run_ensemble(
        base_rt,
        ref_rt,
        PROMPT,
        steps=STEPS,
        guidance=GUIDANCE,
        size=(SIZE, SIZE),
        latents=noise,
        on_step=lambda stage, done, total: seen.append((stage, done, total)),
    )
    np.testing.assert_allclose(first.latents, ref_handoff, rtol=0, atol=1e-4)
    assert first.images == [] and second.image.shape == (SIZE, SIZE, 3)
    _assert_close_to_diffusers(second.latents, ref_latents, no_model, f"ensemble {scheduler}")
    assert _psnr(second.image, ref_image) >= 40.0
    base_calls = len(first.timings_ms["denoiser_steps"])
    refiner_calls = len(second.timings_ms["denoiser_steps"])
    assert seen[base_calls - 1] == ("base", base_calls, base_calls)
    assert seen[-1] == ("refiner", refiner_calls, refiner_calls)
    if scheduler is None:  # Euler, leading spacing: 901 ... 201 | 101, 1
        assert (base_calls, refiner_calls) == (8, 2)
    if scheduler == "heun":  # 19 calls; the refiner's count made odd: it takes 3
        assert refiner_calls % 2 == 1


def test_ensemble_refusals(shared_bundle, refiner):
    base = Text2ImagePipeline.from_bundle(shared_bundle("sdxl", False).out)
    ref = Text2ImagePipeline.from_bundle(refiner[1])
    with pytest.raises(UserError, match="not an SDXL refiner"):
        run_ensemble(base, base, PROMPT, steps=2)
    with pytest.raises(UserError, match="itself an SDXL refiner"):
        run_ensemble(ref, ref, PROMPT, steps=2)
    with pytest.raises(UserError, match="strictly between 0 and 1"):
        run_ensemble(base, ref, PROMPT, steps=2, refiner_start=1.0)
    with pytest.raises(UserError, match="inpainting with a refiner"):
        run_ensemble(base, ref, PROMPT, image=test_image(), mask_image=test_image())
    with pytest.raises(UserError, match="refines an image"):
        ref(PROMPT, steps=2)
    with pytest.raises(UserError, match="SDXL refiner only"):
        base(PROMPT, steps=2, aesthetic_score=5.0)
    with pytest.raises(UserError, match="from 0 to 10"):
        ref(PROMPT, steps=2, image=test_image(), aesthetic_score=11.0)
    with pytest.raises(UserError, match="not a finite number"):
        ref(PROMPT, steps=2, image=test_image(), negative_aesthetic_score=float("nan"))
    with pytest.raises(UserError, match="partly denoised latents"):
        ref(PROMPT, steps=2, image=test_image(), denoising_start=0.5)
    with pytest.raises(UserError, match="must be below denoising_end"):
        ref(
            PROMPT,
            steps=2,
            latents=np.zeros((1, 4, 16, 16)),
            denoising_start=0.6,
            denoising_end=0.5,
        )
    with pytest.raises(UserError, match="leaves no step"):  # 2 steps: 501, 1 -> none below 1
        ref(PROMPT, steps=2, latents=np.zeros((1, 4, 16, 16), np.float32), denoising_start=0.999)
    with pytest.raises(UserError, match="latents have shape"):
        ref(PROMPT, steps=2, size=(64, 64), latents=np.zeros((1, 4, 4, 4)), denoising_start=0.5)


def _cli(*args):
    from click.testing import CliRunner

    from slimdiff.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_a_saved_refiner_folder_and_its_artifact(refiner, tmp_path):
    """A refiner folder as diffusers saves it (text_encoder null, requires_aesthetics_score)
    loads as the refiner into memory, lazily and as a lone UNet; compressed (vae.replace,
    with its own VAE) the artifact keeps it, and its bundle (with the VAE encoder, which a
    refiner always gets) draws what the built-in's does."""
    from slimdiff.models.loading import load_for_export, load_model

    model, bundle = refiner
    folder = tmp_path / "refiner"
    model.pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["requires_aesthetics_score"] is True
    assert load_model(str(folder)).arch is SDXL_REFINER
    lazy = load_for_export(str(folder))
    assert lazy.arch is SDXL_REFINER and type(lazy.pipe).__name__ == index["_class_name"]
    assert load_model(str(folder / "unet")).arch is SDXL_REFINER

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"version: 1\nmodel: {folder}\npasses:\n  - pass: vae.replace\n    path: {folder}\n"
    )  # no export.vae_encoder: the refiner's is always exported
    out = tmp_path / "out"
    result = _cli("compress", recipe, "--out", out)
    assert result.exit_code == 0, result.output
    artifact = json.loads((out / "artifact" / "model_index.json").read_text())
    assert artifact["requires_aesthetics_score"] is True and artifact["text_encoder"] == [
        None,
        None,
    ]
    assert load_model(str(out / "artifact")).arch is SDXL_REFINER
    image = tmp_path / "in.png"
    Image.fromarray(test_image()).save(image)
    args = ("--prompt", PROMPT, "--image", image, "--steps", 4, "--strength", 0.5)
    for name, source in (("ours", out / "bundle"), ("builtin", bundle)):
        result = _cli("run", source, *args, "--out", tmp_path / f"{name}.png")
        assert result.exit_code == 0, result.output
    ours, builtin = (np.array(Image.open(tmp_path / f"{n}.png")) for n in ("ours", "builtin"))
    assert ours.shape == (SIZE, SIZE, 3) and _psnr(ours, builtin) >= 60.0


def test_run_with_a_refiner_from_the_cli(shared_bundle, refiner, tmp_path):
    base = shared_bundle("sdxl", False).out
    ref = refiner[1]
    out = tmp_path / "refined.png"
    common = ("--prompt", PROMPT, "--steps", 10, "--size", f"{SIZE}x{SIZE}", "--seed", 2)
    result = _cli("run", base, *common, "--refiner", ref, "--out", out)
    assert result.exit_code == 0, result.output
    assert "base" in result.output and "refiner" in result.output
    assert "8 steps" in result.output and "2 steps" in result.output
    refined = np.array(Image.open(out))
    # the same through the API
    base_rt, ref_rt = (Text2ImagePipeline.from_bundle(b) for b in (base, ref))
    _, api = run_ensemble(base_rt, ref_rt, PROMPT, steps=10, size=(SIZE, SIZE), seed=2)
    np.testing.assert_array_equal(refined, api.image)
    # a later hand-off and other scores change the image
    later = tmp_path / "later.png"
    result = _cli(
        "run", base, *common, "--refiner", ref, "--refiner-start", 0.6,
        "--aesthetic-score", 8, "--out", later,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "6 steps" in result.output and "4 steps" in result.output
    assert not np.array_equal(np.array(Image.open(later)), refined)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("--refiner-start", 0.5), "--refiner-start needs --refiner"),
        (("--aesthetic-score", 5), "SDXL refiner only"),
        (("--refiner", "BASE"), "not an SDXL refiner"),
        (("--refiner", "REF", "--refiner-start", 1), "--refiner-start"),
        (("--aesthetic-score", 12), "--aesthetic-score"),
        (("--refiner", "FILE"), "is a file; a bundle is the folder"),
        (("--refiner-expect-sha256", "0" * 64), "--refiner-expect-sha256 needs --refiner"),
        (("--expect-sha256", "PIN", "--refiner", "REF"), "pin it too"),
        (
            ("--expect-sha256", "PIN", "--refiner", "REF", "--refiner-expect-sha256", "PIN"),
            "this is not the pinned bundle",
        ),
    ],
)
def test_refiner_options_are_checked(shared_bundle, refiner, tmp_path, args, error):
    base = shared_bundle("sdxl", False).out
    (tmp_path / "a.txt").write_text("not a bundle")
    pin = hashlib.sha256((base / "manifest.json").read_bytes()).hexdigest()  # BASE's
    swap = {"BASE": base, "REF": refiner[1], "FILE": tmp_path / "a.txt", "PIN": pin}
    args = [swap.get(a, a) if isinstance(a, str) else a for a in args]
    result = _cli("run", base, "--prompt", "a", "--steps", 2, *args, "--out", tmp_path / "x.png")
    assert result.exit_code == 2, result.output
    assert error in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.png").exists()


def test_the_refiner_alone_needs_an_image(refiner, tmp_path):
    result = _cli("run", refiner[1], "--prompt", "a", "--out", tmp_path / "x.png")
    assert result.exit_code == 2 and "refines an image" in result.output


def test_a_refiner_single_file_converts_with_its_config(refiner, tmp_path):
    """sd_xl_refiner_1.0.safetensors' layout, converted with a refiner folder as config:
    the refiner again, with the file's weights."""
    from slimdiff.models.loading import load_model
    from tests.ldm_checkpoint import write_sdxl_refiner_single_file

    model, _ = refiner
    config = tmp_path / "config"
    model.pipe.save_pretrained(config)
    single = tmp_path / "refiner.safetensors"
    write_sdxl_refiner_single_file(model.pipe, single)
    result = _cli("convert", single, "--config", config, "--out", tmp_path / "conv")
    assert result.exit_code == 0, result.output
    converted = load_model(str(tmp_path / "conv"))
    assert converted.arch is SDXL_REFINER
    for name in ("unet", "text_encoder_2", "vae"):
        ours = getattr(converted.pipe, name).state_dict()
        theirs = getattr(model.pipe, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name


def test_ensemble_checks_everything_before_the_base_runs(shared_bundle, refiner):
    """Bad pairs, keywords and splits are refused before the base's first step."""
    from types import SimpleNamespace

    base = Text2ImagePipeline.from_bundle(shared_bundle("sdxl", False).out)
    ref = Text2ImagePipeline.from_bundle(refiner[1])
    ran = []
    calls = {"on_step": lambda stage, done, total: ran.append(stage)}
    sd15 = SimpleNamespace(config=base.config, manifest=SimpleNamespace(family="sd15"))
    other_vae = SimpleNamespace(
        config=base.config.model_copy(update={"vae_scaling_factor": 0.18215}),
        manifest=base.manifest,
    )
    cases = [
        ((sd15, ref), {}, "is sd15's"),
        ((other_vae, ref), {}, "their VAEs differ: vae_scaling_factor"),
        (("base-b", ref), {}, "not a loaded bundle"),
        ((base, ref), {"denoising_end": 0.5}, "sets denoising_end itself"),
        ((base, ref), {"bogus": 1}, "unknown keywords bogus"),
        ((base, ref), {"refiner_start": None}, "strictly between 0 and 1"),
        ((base, ref), {"refiner_start": "0.5"}, "is not a number"),
        ((base, ref), {"steps": "abc"}, "use a whole number"),
        ((base, ref), {"steps": 10.7}, "use a whole number"),
        ((base, ref), {"steps": 1}, "at least 2 steps"),
        ((base, ref), {"steps": 4, "refiner_start": 1e-9}, "leaves the base no step"),
        ((base, ref), {"steps": 4, "refiner_start": 0.999999}, "leaves the refiner no step"),
        (
            (base, ref),
            {
                "steps": 4,
                "image": np.zeros((64, 64, 3), np.uint8),
                "strength": 0.5,
                "refiner_start": 0.3,
            },
            r"refiner start 0.3 leaves the base no step .* after the image's strength 0.5",
        ),
        ((base, ref), {"aesthetic_score": float("nan")}, "aesthetic score nan is not a finite"),
        ((base, ref), {"negative_aesthetic_score": 12}, "negative aesthetic score 12"),
    ]
    for pair, kwargs, error in cases:
        with pytest.raises(UserError, match=error):
            run_ensemble(*pair, PROMPT, **{"steps": 10, **calls, **kwargs})
    assert ran == []  # nothing ran
    # DPM-Solver++'s 4-step schedule here has no timestep below the cutoff at 0.8 (200):
    # refused before the base runs, not after
    dpm = Text2ImagePipeline.from_bundle(refiner[1], scheduler="dpm++2m")
    with pytest.raises(UserError, match="leaves the refiner no step of the 4-step"):
        run_ensemble(base, dpm, PROMPT, steps=4, **calls)
    assert ran == []
    first, _ = run_ensemble(base, ref, PROMPT, steps=4, size=(SIZE, SIZE))
    with pytest.raises(UserError, match="strength has no effect with denoising_start"):
        ref(PROMPT, steps=4, latents=first.latents, denoising_start=0.8, strength=0.3)


def test_convert_refuses_what_no_command_could_load(refiner, tmp_path):
    """A refiner file converted with a config that does not say requires_aesthetics_score
    would be an SDXL without its first text encoder: refused, nothing written."""
    from tests.ldm_checkpoint import write_sdxl_refiner_single_file

    model, _ = refiner
    config = tmp_path / "config"
    model.pipe.save_pretrained(config)
    index = json.loads((config / "model_index.json").read_text())
    index.pop("requires_aesthetics_score")
    (config / "model_index.json").write_text(json.dumps(index))
    single = tmp_path / "refiner.safetensors"
    write_sdxl_refiner_single_file(model.pipe, single)
    result = _cli("convert", single, "--config", config, "--out", tmp_path / "conv")
    assert result.exit_code == 2 and "has no text_encoder" in result.output, result.output
    assert not (tmp_path / "conv").exists()


def test_a_folder_missing_a_component_says_which(refiner, tmp_path):
    """Without unet/ diffusers would take the subfolder for a hub repo and retry the
    network: one line names the folder instead, in memory and lazily."""
    from slimdiff.models.loading import load_model

    model, _ = refiner
    folder = tmp_path / "refiner"
    model.pipe.save_pretrained(folder)
    shutil.rmtree(folder / "unet")
    for weights in ("memory", "lazy"):
        with pytest.raises(
            UserError, match=r"unet: could not build unet \(UNet2DConditionModel\): model_index"
        ):
            load_model(str(folder), weights=weights)
