"""End to end: every tiny family exports to an fp32 ONNX bundle the runtime can trust.

One bundle per family (module-scoped); the checks read it back from disk and re-run the
denoiser with onnxruntime on inputs of their own, against the torch denoiser called the
way the diffusers pipeline calls it (not through the exporter's wrapper).

Exports use the defaults (ORT fusions on) except tiny:sdxl, whose UNet goes through the
same fusion code as tiny:sd15's at 2.5x the graph size (~35 s on a 2-core CPU).
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from slimdiff.runtime.manifest import MANIFEST_NAME, read_manifest, sha256_file

from slimdiff.fsutil import MARKER_NAME
from tests.conftest import _processors
from tests.onnx_check import denoiser_rel_err, rel_err

OPTIMIZE = {"sd15": True, "sdxl": False, "sd3": True, "flux": True}
# Contrib ops with no CPU kernel in onnxruntime (CUDA/ROCm only).
GPU_ONLY_OPS = {"GroupNorm", "SkipGroupNorm", "NhwcConv", "BiasSplitGelu", "BiasAdd"}
PIPELINE_KEYS = {
    "denoiser", "kind", "uses_cfg", "default_size", "default_steps", "default_guidance",
    "vae_scale_factor", "size_multiple", "latent_channels", "vae_scaling_factor",
    "vae_shift_factor", "force_zeros_for_empty_prompt", "text_encoders", "scheduler",
    "default_strength",
}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=list(OPTIMIZE))
def exported(request, shared_bundle):
    return shared_bundle(request.param, OPTIMIZE[request.param])


def test_manifest_lists_components_with_their_io_names(exported):
    model, _, manifest, _ = exported
    arch = model.arch
    # the shared bundles carry the optional VAE encoder (image-to-image), last
    assert list(manifest.components) == [*arch.components, "vae_encoder"]
    for spec in arch.text_encoders:
        entry = manifest.components[spec.name]
        assert [i["name"] for i in entry.inputs] == ["input_ids"]
        assert entry.inputs[0]["dtype"] == "int64"
        assert entry.inputs[0]["shape"] == ["B", "S"]
        assert [o["name"] for o in entry.outputs] == list(spec.outputs)
    den = manifest.components[arch.denoiser]
    # The tiny FLUX is FLUX.1-dev-like (guidance_embeds=True), so every ArchSpec input stays,
    # but LCM's timestep_cond (the tiny UNets are not LCM-distilled: time_cond_proj_dim None).
    expected = [s.name for s in arch.denoiser_inputs if s.name != "timestep_cond"]
    assert [i["name"] for i in den.inputs] == expected
    assert [s.name for s in arch.present_inputs(model.denoiser.config)] == expected
    assert [o["name"] for o in den.outputs] == ["out_sample"]
    assert all(i["dtype"] == "float32" for i in den.inputs)
    assert den.outputs[0]["shape"] == den.inputs[0]["shape"]  # prediction has the latent's layout
    timestep = next(i for i in den.inputs if i["name"] == "timestep")
    assert timestep["shape"] == ["B"]
    vae = manifest.components["vae_decoder"]
    latent_channels = model.pipe.vae.config.latent_channels
    assert vae.inputs == [
        {"name": "latent_sample", "dtype": "float32", "shape": ["B", latent_channels, "h", "w"]}
    ]
    assert vae.outputs == [{"name": "sample", "dtype": "float32", "shape": ["B", 3, "8h", "8w"]}]
    encoder = manifest.components["vae_encoder"]
    assert encoder.inputs == [{"name": "image", "dtype": "float32", "shape": ["B", 3, "8h", "8w"]}]
    latent = {"dtype": "float32", "shape": ["B", latent_channels, "h", "w"]}
    assert encoder.outputs == [{"name": n, **latent} for n in ("latent_mean", "latent_std")]


def test_every_component_matches_torch_on_fresh_inputs(exported):
    """Checked here again, on inputs of the test's own: the export's own check passed (an
    export that fails it raises, tests/unit/test_export_errors.py)."""
    model, out, manifest, _ = exported
    for entry in manifest.components.values():
        assert (entry.parity["tolerance"], entry.precision, entry.format) == (1e-4, "fp32", "onnx")
    prompts = ["two small red squares", "a cat"]
    for spec in model.arch.text_encoders:
        ids = getattr(model.pipe, spec.tokenizer)(
            prompts, padding="max_length", max_length=spec.max_length, truncation=True
        ).input_ids
        ids = np.asarray(ids, np.int64)
        session = ort.InferenceSession(
            str(out / manifest.components[spec.name].path), providers=["CPUExecutionProvider"]
        )
        got = dict(
            zip(spec.outputs, session.run(list(spec.outputs), {"input_ids": ids}), strict=True)
        )
        with torch.inference_mode():
            ref = getattr(model.pipe, spec.name)(torch.from_numpy(ids), output_hidden_states=True)
        for name in spec.outputs:
            want = ref.hidden_states[-2] if name == "penultimate_hidden_state" else ref[name]
            assert rel_err(got[name], want.numpy()) <= 1e-4, (spec.name, name)
    vae = model.pipe.vae
    z = np.random.default_rng(5).standard_normal((2, vae.config.latent_channels, 5, 7))
    z = z.astype(np.float32)
    session = ort.InferenceSession(
        str(out / manifest.components["vae_decoder"].path), providers=["CPUExecutionProvider"]
    )
    (image,) = session.run(["sample"], {"latent_sample": z})
    with torch.inference_mode():
        expected = vae.decode(torch.from_numpy(z)).sample.numpy()
    assert image.shape == expected.shape == (2, 3, 40, 56)
    assert rel_err(image, expected) <= 1e-4
    assert denoiser_rel_err(model, out / manifest.components[model.arch.denoiser].path) <= 1e-4


def _denoiser_feeds(model, manifest, batch=2, height=8, width=16, text_len=12):
    """Fresh inputs from the manifest shapes: not the exporter's trace or check sizes."""
    entry = manifest.components[model.arch.denoiser]
    axes = {"B": batch, "H": height, "W": width, "S": text_len, "L": height * width // 4}
    rng = np.random.default_rng(123)
    feeds = {}
    for spec in entry.inputs:
        shape = [axes[d] if isinstance(d, str) else d for d in spec["shape"]]
        feeds[spec["name"]] = rng.standard_normal(shape).astype(np.float32)
    # FLUX passes timestep / 1000; the others pass the scheduler's timestep.
    scale = 1.0 if model.arch.family == "flux" else 1000.0
    feeds["timestep"] = (rng.random(batch) * scale).astype(np.float32)
    if "img_ids" in feeds:
        h, w = height // 2, width // 2
        feeds["img_ids"] = np.stack(
            [np.zeros(h * w), np.repeat(np.arange(h), w), np.tile(np.arange(w), h)], axis=1
        ).astype(np.float32)
        feeds["txt_ids"] = np.zeros((text_len, 3), np.float32)
        feeds["guidance"] = np.full(batch, 3.5, np.float32)
    return feeds


def _torch_denoiser(model, feeds):
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.inference_mode():
        if "sample" in t:  # UNet2DConditionModel, as StableDiffusion(XL)Pipeline calls it
            added = {k: t.pop(k) for k in ("text_embeds", "time_ids") if k in t}
            out = model.denoiser(
                t["sample"],
                t["timestep"],
                t["encoder_hidden_states"],
                added_cond_kwargs=added or None,
            ).sample
        else:  # SD3 / FLUX transformers take keyword inputs
            out = model.denoiser(**t).sample
    return out.numpy()


def test_denoiser_onnx_matches_torch_on_new_inputs(exported):
    model, out, manifest, _ = exported
    entry = manifest.components[model.arch.denoiser]
    feeds = _denoiser_feeds(model, manifest)
    session = ort.InferenceSession(str(out / entry.path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["out_sample"], feeds)
    expected = _torch_denoiser(model, feeds)
    assert got.shape == expected.shape
    rel = np.abs(got - expected).max() / np.abs(expected).max()
    assert rel <= 1e-4


def test_every_file_is_hashed_and_no_temp_folder_is_left(exported):
    _, out, manifest, _ = exported
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    # the manifest pins every file but itself and the marker saying slimdiff wrote the folder
    assert on_disk - {MANIFEST_NAME, MARKER_NAME} == set(manifest.files)
    for rel, digest in manifest.files.items():
        assert sha256_file(out / rel) == digest
    for name in manifest.components:
        assert f"{name}/model.onnx" in manifest.files
    for record in manifest.pipeline.text_encoders:
        assert f"{record.tokenizer}/tokenizer.json" in manifest.files
    assert manifest.pipeline.scheduler in manifest.files
    # Only the bundle beside it: no .partial build folder, no .work exports inside.
    assert [p.name for p in out.parent.iterdir()] == ["bundle"]
    assert [p.name for p in out.rglob(".*")] == [MARKER_NAME]  # its own marker alone
    # The runtime's reader verifies every hash and accepts it: the same manifest, the same
    # identity (SHA-256 of manifest.json's bytes).
    assert read_manifest(out) == manifest
    assert read_manifest(out).sha256 == manifest.sha256 == sha256_file(out / MANIFEST_NAME)


def test_pipeline_constants_come_from_the_model(exported):
    model, out, manifest, _ = exported
    pipeline = json.loads((out / MANIFEST_NAME).read_text())["pipeline"]
    # SD3's transformer bounds the side (pos_embed_max_size), the others do not
    assert set(pipeline) == PIPELINE_KEYS | ({"max_side"} if model.arch.family == "sd3" else set())
    vae = model.pipe.vae.config
    assert pipeline["denoiser"] == model.arch.denoiser
    assert pipeline["vae_scale_factor"] == 2 ** (len(vae.block_out_channels) - 1) == 8
    assert pipeline["latent_channels"] == vae.latent_channels
    assert pipeline["vae_scaling_factor"] == pytest.approx(vae.scaling_factor)
    assert pipeline["vae_shift_factor"] == (
        None if vae.shift_factor is None else pytest.approx(vae.shift_factor)
    )
    kind = pipeline["kind"]
    assert ("time_ids" in kind["extra_inputs"]) == (model.arch.family == "sdxl")
    assert pipeline["force_zeros_for_empty_prompt"] == (model.arch.family == "sdxl")
    assert ("guidance" in kind["extra_inputs"]) == (model.arch.family == "flux")
    assert kind["token_patch"] == (2 if model.arch.family in ("sd3", "flux") else 1)
    assert kind["latent_packing"] == (2 if model.arch.family == "flux" else 1)
    assert kind["timestep_divisor"] == (1000.0 if model.arch.family == "flux" else 1.0)
    assert kind["sample_input"] == den_inputs(manifest, model)[0]
    multiple = {"sd15": 8, "sdxl": 8, "sd3": 16, "flux": 16}[model.arch.family]
    assert pipeline["size_multiple"] == multiple
    encoders = pipeline["text_encoders"]
    assert [e["name"] for e in encoders] == [s.name for s in model.arch.text_encoders]
    for record, spec in zip(encoders, model.arch.text_encoders, strict=True):
        tok = getattr(model.pipe, spec.tokenizer)
        assert record["max_length"] == spec.max_length
        if spec.kind == "clip":
            assert record["max_length"] == tok.model_max_length
        assert record["pad_token_id"] == tok.pad_token_id
        assert record["eos_token_id"] == tok.eos_token_id
        config = getattr(model.pipe, spec.name).config
        assert record["max_positions"] == getattr(config, "max_position_embeddings", None)
        assert record["outputs"] == list(spec.outputs)
        assert record["segment"] == (1 if spec.name == "text_encoder_3" else 0)
        assert record["hidden_size"] == manifest.components[spec.name].outputs[0]["shape"][-1]


def test_cpu_fusions_are_recorded_and_run_on_the_cpu_ep(exported):
    model, out, manifest, _ = exported
    entry = manifest.components[model.arch.denoiser]
    ops = Counter(n.op_type for n in onnx.load(str(out / entry.path)).graph.node)
    assert not GPU_ONLY_OPS & set(ops)
    plan = model.arch.denoiser_onnx
    if OPTIMIZE[model.arch.family] and plan.on_cpu:
        # Every attention layer fused: tiny:sd15 has 16 (8 self -> Attention, 8 cross ->
        # MultiHeadAttention, per direction), tiny:sd3 2 joint ones; no Softmax left.
        fused = entry.extra["ort_fusions"]
        attention = fused.get("Attention", 0) + fused.get("MultiHeadAttention", 0)
        assert attention == {"sd15": 32, "sd3": 2}[model.arch.family]
        assert ops["Softmax"] == 0
        assert entry.extra["attention"] == plan.attention
    else:
        assert entry.extra["ort_fusions"] == {}
    for name in (*model.arch.text_encoder_names, "vae_decoder"):
        assert manifest.components[name].extra["ort_fusions"] == {}  # no CPU win there


def den_inputs(manifest, model) -> list[str]:
    return [i["name"] for i in manifest.components[model.arch.denoiser].inputs]


def test_export_leaves_the_callers_model_as_it_was(exported):
    model = exported.model
    # Fusion exports swap in diffusers' classic AttnProcessor and an exportable RMSNorm;
    # both are put back.
    assert _processors(model) == exported.processors_before
    for module in (model.denoiser, model.pipe.vae, model.pipe.text_encoder):
        assert not module.training
    assert not any("forward" in vars(m) for m in model.denoiser.modules())


def test_shape_profiles_hold_what_the_runtime_feeds(exported, monkeypatch):
    """Each component's profile (TensorRT's optimization profile) at opt is exactly what
    the runtime feeds at the default size with CFG, and a run at the smallest size stays
    within min..max."""
    from slimdiff.runtime.backends.ort import OrtSession
    from slimdiff.runtime.pipeline import Text2ImagePipeline

    _, bundle, manifest, _ = exported
    fed: dict[str, list[dict[str, list[int]]]] = {}
    run = OrtSession.run

    def recording(self, feeds):
        fed.setdefault(self.path.parent.name, []).append(
            {n: list(v.shape) for n, v in feeds.items()}
        )
        return run(self, feeds)

    monkeypatch.setattr(OrtSession, "run", recording)
    pipe = Text2ImagePipeline.from_bundle(bundle)
    pipe("a red circle", steps=2, guidance=5.0, seed=0)
    height, width = manifest.pipeline.default_size
    image = np.zeros((height, width, 3), np.uint8)
    pipe("a red circle", steps=2, guidance=5.0, seed=0, image=image, strength=1.0)
    profiles = {name: entry.profile for name, entry in manifest.components.items()}
    assert set(fed) == set(profiles)
    for name, calls in fed.items():
        assert all(call == profiles[name]["opt"] for call in calls), name
    fed.clear()
    # the smallest image: the VAE decoder's smallest latent (B, C, h, w) in pixels
    lo = profiles["vae_decoder"]["min"]["latent_sample"]
    h, w = (d * manifest.pipeline.vae_scale_factor for d in lo[-2:])
    pipe("a red circle", steps=1, guidance=5.0, seed=0, size=(h, w))
    pipe(
        "a red circle",
        steps=1,
        guidance=5.0,
        seed=0,
        image=np.zeros((h, w, 3), np.uint8),
        strength=1.0,
    )
    for name, calls in fed.items():
        for call in calls:
            for tensor, shape in call.items():
                low, high = profiles[name]["min"][tensor], profiles[name]["max"][tensor]
                assert all(a <= d <= b for a, d, b in zip(low, shape, high, strict=True)), (
                    name,
                    tensor,
                    shape,
                )
