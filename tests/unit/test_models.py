"""Built-in models, family detection and loading from folders, component folders, hub ids."""

from __future__ import annotations

import json

import pytest
import torch

from slimdiff.errors import UserError
from slimdiff.models import FAMILIES, get_arch, load_model

FAMILY_CLASSES = {
    "sd15": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_pipeline_is_complete_and_seeded(family):
    a = load_model(f"tiny:{family}")
    b = load_model(f"tiny:{family}")
    assert type(a.pipe).__name__ == FAMILY_CLASSES[family]
    assert a.arch.family == family
    for te in a.arch.text_encoders:  # every encoder has a real tokenizer
        assert getattr(a.pipe, te.name) is not None
        ids = getattr(a.pipe, te.tokenizer)("a red circle").input_ids
        assert len(ids) >= 3
    pa = dict(a.denoiser.named_parameters())
    for name, p in b.denoiser.named_parameters():  # same seed -> same weights
        assert torch.equal(p, pa[name]), name
    assert sum(p.numel() for p in a.denoiser.parameters()) < 10_000_000


def test_tiny_sdxl_keeps_sdxl_topology():
    unet = load_model("tiny:sdxl").denoiser
    cfg = unet.config
    assert cfg.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert list(cfg.transformer_layers_per_block) == [1, 2, 4]
    assert cfg.addition_embed_type == "text_time"
    assert type(unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"


@pytest.mark.parametrize(("family", "params"), [("sd15", 859_520_964), ("sdxl", 2_567_463_684)])
def test_random_models_have_the_published_size(family, params):
    m = load_model(f"random:{family}", device="meta")
    assert sum(p.numel() for p in m.denoiser.parameters()) == params
    assert next(m.denoiser.parameters()).device.type == "meta"


def test_random_flux_is_flux_dev_sized():
    m = load_model("random:flux", device="meta")
    n = sum(p.numel() for p in m.denoiser.parameters())
    assert 11.8e9 < n < 12.0e9


def test_pipeline_folder_round_trip(tmp_path):
    m = load_model("tiny:sd15")
    m.pipe.save_pretrained(tmp_path / "p")
    again = load_model(str(tmp_path / "p"))
    assert again.arch.family == "sd15"
    for (n, p), (_, q) in zip(
        m.denoiser.named_parameters(), again.denoiser.named_parameters(), strict=True
    ):
        assert torch.equal(p, q), n


def _with_safety_checker(model):
    """The tiny SD1.5 pipeline as the hub folder has it: a safety checker and feature
    extractor, whose model_index.json entry names diffusers' pipeline module
    ["stable_diffusion", "StableDiffusionSafetyChecker"], not an importable package."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )
    from transformers import CLIPConfig, CLIPImageProcessor

    tiny = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config={**tiny, "num_hidden_layers": 1, "vocab_size": 100},
        vision_config={**tiny, "num_hidden_layers": 1, "image_size": 32, "patch_size": 8},
        projection_dim=32,
    )
    p = model.pipe
    return StableDiffusionPipeline(
        vae=p.vae,
        text_encoder=p.text_encoder,
        tokenizer=p.tokenizer,
        unet=p.unet,
        scheduler=p.scheduler,
        safety_checker=StableDiffusionSafetyChecker(config),
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
    )


def test_hub_sd15_layout_with_a_safety_checker_loads_both_ways(tmp_path):
    """The checker (1.2 GB in runwayml's repo) is left out: no bundle runs it."""
    m = load_model("tiny:sd15")
    _with_safety_checker(m).save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    for weights in ("memory", "lazy"):
        again = load_model(str(tmp_path / "p"), weights=weights)
        assert again.arch.family == "sd15"
        assert again.pipe.safety_checker is None and again.pipe.feature_extractor is None
    lazy = load_model(str(tmp_path / "p"), weights="lazy")
    from slimdiff.models.lazy import materialize

    materialize(lazy.denoiser)
    for (n, p), (_, q) in zip(
        m.denoiser.named_parameters(), lazy.denoiser.named_parameters(), strict=True
    ):
        assert torch.equal(p, q), n
    index["safety_checker"] = ["no_such_library", "Checker"]  # never read: no error
    (tmp_path / "p" / "model_index.json").write_text(json.dumps(index))
    assert load_model(str(tmp_path / "p"), weights="lazy").pipe.safety_checker is None
    index["scheduler"] = ["no_such_library", "Scheduler"]
    (tmp_path / "p" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"scheduler is \['no_such_library', 'Scheduler'\]"):
        load_model(str(tmp_path / "p"), weights="lazy")


def test_component_folder_loads_the_denoiser_only(tmp_path):
    m = load_model("tiny:sdxl")
    m.denoiser.save_pretrained(tmp_path / "unet")
    comp = load_model(str(tmp_path / "unet"))
    assert comp.arch.family == "sdxl" and comp.pipe is None
    with pytest.raises(UserError, match=r"single component folder.*model_index\.json"):
        comp.require_pipeline("export")


def test_missing_and_non_diffusers_folders_get_clear_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="not a diffusers model folder"):
        load_model(str(tmp_path / "junk"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text(
        json.dumps({"_class_name": "KandinskyPipeline"})
    )
    with pytest.raises(UserError, match="unsupported pipeline class 'KandinskyPipeline'"):
        load_model(str(tmp_path / "other"))
    # folders other tools exported already (optimum's ORT/OpenVINO, diffusers' Onnx ones)
    for name in ("ORTStableDiffusionXLPipeline", "OVStableDiffusionPipeline"):
        (tmp_path / "other" / "model_index.json").write_text(json.dumps({"_class_name": name}))
        for weights in ("memory", "lazy"):
            with pytest.raises(UserError, match=rf"^this is {name}, an already exported model"):
                load_model(str(tmp_path / "other"), weights=weights)


def test_hub_id_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        UserError, match=r"could not load hub model 'someorg/some-model'.*local-dir"
    ):
        load_model("someorg/some-model")


def test_unknown_builtin_family():
    with pytest.raises(UserError, match="unknown built-in model 'tiny:sd9'"):
        load_model("tiny:sd9")
    with pytest.raises(UserError, match="unknown model family"):
        get_arch("sd9")


def test_latent_shape_follows_packing():
    from slimdiff.models.kinds import latent_shape

    assert latent_shape(get_arch("sdxl").kind, 1, 4, 16, 8) == (1, 4, 16, 8)
    assert latent_shape(get_arch("flux").kind, 1, 16, 16, 8) == (1, 32, 64)


def test_pickled_weights_are_refused_unless_allowed(tmp_path):
    """A folder whose UNet has only diffusion_pytorch_model.bin (a pickle) is refused with
    the fix; --allow-pickle (allow_pickle=True) loads it for files the user trusts."""
    model = load_model("tiny:sd15")
    folder = tmp_path / "m"
    model.pipe.save_pretrained(folder, safe_serialization=True)
    model.pipe.unet.save_pretrained(folder / "unet", safe_serialization=False)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match=r"unet has only pickled weights \(diffusion_pytorch"):
        load_model(str(folder))
    with pytest.raises(UserError, match="only pickled weights"):
        load_model(str(folder / "unet"))  # a lone component folder too
    loaded = load_model(str(folder), allow_pickle=True)
    assert torch.equal(loaded.pipe.unet.conv_in.weight, model.pipe.unet.conv_in.weight)


def test_hub_errors_say_what_failed_and_others_keep_their_traceback(monkeypatch):
    import diffusers

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", unreachable)
    with pytest.raises(UserError, match=r"couldn't connect to 'https://huggingface\.co'"):
        load_model("org/some-model")

    def out_of_memory(*args, **kwargs):
        raise MemoryError("cannot allocate 10 GB")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", out_of_memory)
    with pytest.raises(MemoryError):  # not reported as "hub unreachable"
        load_model("org/some-model")


def test_pipeline_classes_holding_a_text_to_image_model_load_as_it(monkeypatch):
    import diffusers

    from slimdiff.models.families import family_of_pipeline

    assert family_of_pipeline("LatentConsistencyModelPipeline") == "sd15"
    assert family_of_pipeline("StableDiffusionXLImg2ImgPipeline") == "sdxl"
    assert family_of_pipeline("FluxImg2ImgPipeline") == "flux"
    # inpainting pipelines hold the family's components (an inpainting UNet is told apart
    # by its channels: KindSpec.inpainting, tests/integration/test_img2img.py)
    assert family_of_pipeline("StableDiffusionInpaintPipeline") == "sd15"
    assert family_of_pipeline("StableDiffusionXLInpaintPipeline") == "sdxl"
    assert family_of_pipeline("StableDiffusion3InpaintPipeline") == "sd3"
    assert family_of_pipeline("FluxInpaintPipeline") == "flux"
    with pytest.raises(UserError, match="unsupported pipeline class 'FluxFillPipeline'"):
        family_of_pipeline("FluxFillPipeline")  # its transformer takes packed masks
    # a hub id whose model_index.json names LatentConsistencyModelPipeline (LCM-Dreamshaper)
    parts = load_model("tiny:sd15").pipe.components
    hub = diffusers.LatentConsistencyModelPipeline(**parts)
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", lambda *a, **k: hub)
    loaded = load_model("org/lcm-model")
    assert type(loaded.pipe).__name__ == "StableDiffusionPipeline"
    assert loaded.pipe.unet is parts["unet"] and loaded.arch.family == "sd15"


def test_a_refiner_folder_with_the_base_unet_is_refused_on_both_routes(tmp_path):
    """The SDXL refiner's layout (StableDiffusionXLImg2ImgPipeline with
    requires_aesthetics_score, without the first text encoder) around SDXL base's UNet,
    which takes six time ids and both encoders' states: refused in one line naming the
    fix, instead of failing deep in the export. The real refiner loads (test_refiner.py)."""
    import diffusers

    parts = load_model("tiny:sdxl").pipe.components
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline(
        **{k: parts[k] for k in ("vae", "text_encoder_2", "tokenizer_2", "unet", "scheduler")},
        text_encoder=None,
        tokenizer=None,
        requires_aesthetics_score=True,
    )
    refiner.save_pretrained(tmp_path / "refiner")
    for weights in ("memory", "lazy"):
        with pytest.raises(UserError, match=r"not conditioned as the SDXL refiner's"):
            load_model(str(tmp_path / "refiner"), weights=weights)


def test_resolve_device():
    from slimdiff.device import resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="is not one of: auto, cpu, cuda, cuda:N"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="torch sees no CUDA GPU here"):
            resolve_device("cuda:0")
    with pytest.raises(UserError, match="device 0: use a name"):
        resolve_device(0)


def test_the_python_api_checks_the_device_as_the_cli_does():
    """slimdiff.load("tiny:sdxl", device="gpu") is one UserError, not torch's RuntimeError
    (or, for "cuda" on a CPU-only torch, its AssertionError) from deep in the load."""
    import slimdiff

    with pytest.raises(UserError, match=r"device 'gpu' is not one of: auto, cpu, cuda"):
        slimdiff.load("tiny:sdxl", device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"device 'cuda': torch sees no CUDA GPU here"):
            slimdiff.load("tiny:sdxl", device="cuda")
    pipe = slimdiff.load("tiny:sd15", device="auto")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert pipe.unet.device.type == want


def test_bench_prompts_are_not_calibration_prompts():
    from slimdiff.prompts import BENCH_PROMPTS, CALIBRATION_PROMPTS

    assert len(BENCH_PROMPTS) == 4 and not set(BENCH_PROMPTS) & set(CALIBRATION_PROMPTS)


def test_a_refiner_saved_by_the_sdxl_inpaint_pipeline_loads_as_the_refiner(tmp_path):
    """diffusers' docs load the refiner with StableDiffusionXLInpaintPipeline too: its
    requires_aesthetics_score says which model the folder holds."""
    import diffusers

    from slimdiff.models.families import SDXL_REFINER

    parts = load_model("tiny:sdxl-refiner").pipe.components
    diffusers.StableDiffusionXLInpaintPipeline(
        **parts, requires_aesthetics_score=True
    ).save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.arch is SDXL_REFINER and loaded.pipe.text_encoder is None


def test_a_missing_required_encoder_names_what_may_be_left_out(tmp_path):
    import json

    load_model("tiny:sd3").pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["text_encoder_2"] = [None, None]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError) as err:
        load_model(str(tmp_path))
    assert str(err.value).endswith(
        "has no text_encoder_2 (null in model_index.json); a sd3 model needs every one (only "
        "text_encoder_3 may be left out)"
    )
