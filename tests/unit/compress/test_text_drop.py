"""SD3 without T5: loading folders saved without it, leaving it out at load, the text.drop
pass, and the manifest's zero_text record (slimdiff/models/text_encoders.py)."""

from __future__ import annotations

import json

import pytest
import torch
from slimdiff.compress.runner import compress_model
from slimdiff.export.bundle import pipeline_constants
from slimdiff.runtime.manifest import BundleError, PipelineSpec

from slimdiff.errors import UserError
from slimdiff.models import load_model
from slimdiff.models.text_encoders import drop_text_encoders
from slimdiff.recipe import validate_recipe
from tests.unit.compress.pass_contract import PassContract

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    """tiny:sd3 saved by diffusers' save_pretrained with T5 set to None."""
    folder = tmp_path_factory.mktemp("sd3") / "no-t5"
    pipe = load_model("tiny:sd3").pipe
    pipe.text_encoder_3 = pipe.tokenizer_3 = None
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def test_diffusers_writes_null_entries_that_its_own_loader_refuses(sd3_folder):
    """Why slimdiff passes the [null, null] components back as None (null_components)."""
    import diffusers

    index = json.loads((sd3_folder / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    assert not (sd3_folder / "text_encoder_3").exists()
    with pytest.raises(ValueError, match="expected"):
        diffusers.StableDiffusion3Pipeline.from_pretrained(sd3_folder)


@pytest.mark.parametrize("weights", ["memory", "lazy"])
def test_a_folder_saved_without_t5_loads(sd3_folder, weights):
    model = load_model(str(sd3_folder), weights=weights)
    assert model.arch.family == "sd3"
    assert model.pipe.text_encoder_3 is None and model.pipe.tokenizer_3 is None
    assert model.components == ("text_encoder", "text_encoder_2", "transformer", "vae_decoder")
    assert [s.name for s in model.text_encoders] == ["text_encoder", "text_encoder_2"]


def test_the_manifest_records_zeros_where_t5_was(sd3_folder):
    model = load_model(str(sd3_folder))
    spec = pipeline_constants(model)
    assert [r.name for r in spec.text_encoders] == ["text_encoder", "text_encoder_2"]
    (zero,) = spec.zero_text
    width = model.pipe.transformer.config.joint_attention_dim
    # diffusers 0.42: (batch, max_sequence_length 256, joint_attention_dim) zeros, segment 1
    assert (zero.name, zero.segment, zero.max_length, zero.hidden_size) == (
        "text_encoder_3",
        1,
        256,
        width,
    )
    full = pipeline_constants(load_model("tiny:sd3"))
    assert full.zero_text is None
    assert "zero_text" not in full.model_dump(mode="json")  # other manifests as they were


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        (lambda z, p: z.update(name="text_encoder"), "name the same encoder"),
        (lambda z, p: z.update(segment=0), "also holds an encoder's states"),
        (lambda z, p: z.update(width=64), "Extra inputs are not permitted"),
        (lambda z, p: z.update(hidden_size=0), "greater than or equal to 1"),
        (lambda z, p: p.update(zero_text=[]), "at least 1 item"),
    ],
)
def test_zero_text_records_are_checked(sd3_folder, edit, error):
    record = pipeline_constants(load_model(str(sd3_folder))).model_dump(mode="json")
    edit(record["zero_text"][0], record)
    with pytest.raises((BundleError, ValueError), match=error):
        PipelineSpec.model_validate_json(json.dumps(record))


def test_leaving_t5_out_at_load_never_loads_it(sd3_folder, tmp_path, monkeypatch):
    import transformers

    full = tmp_path / "full"
    load_model("tiny:sd3").pipe.save_pretrained(full, safe_serialization=True)
    loaded = []
    original = transformers.T5EncoderModel.from_pretrained.__func__
    monkeypatch.setattr(
        transformers.T5EncoderModel,
        "from_pretrained",
        classmethod(lambda cls, *a, **k: loaded.append(a) or original(cls, *a, **k)),
    )
    model = load_model(str(full), without=("text_encoder_3",))
    assert model.pipe.text_encoder_3 is None and model.pipe.tokenizer_3 is None
    assert loaded == []
    lazy = load_model(str(full), weights="lazy", without=("text_encoder_3",))
    assert lazy.pipe.text_encoder_3 is None
    built = load_model("tiny:sd3", without=("text_encoder_3",))  # built, then dropped
    assert built.components == model.components
    # a folder already without T5 (model_index.json's [null, null]) takes the same request
    again = load_model(str(sd3_folder), without=("text_encoder_3",))
    assert again.components == model.components


@pytest.mark.parametrize(
    ("model", "names", "error"),
    [
        ("tiny:sd3", ("text_encoder_2",), "sd3's pipeline needs it; only text_encoder_3"),
        ("tiny:sd3", ("text_encoder_9",), "no such text encoder .*only text_encoder_3"),
        ("tiny:sdxl", ("text_encoder_2",), "sdxl's pipeline needs every one"),
        ("tiny:flux", ("text_encoder_2",), "flux's pipeline needs every one"),
    ],
)
def test_only_optional_encoders_can_be_dropped(model, names, error):
    with pytest.raises(UserError, match=error):
        load_model(model, without=names)


def test_a_pipeline_without_a_needed_encoder_is_still_refused(tmp_path):
    pipe = load_model("tiny:sd3").pipe
    pipe.text_encoder_2 = pipe.tokenizer_2 = None
    pipe.save_pretrained(tmp_path / "m", safe_serialization=True)
    with pytest.raises(UserError, match="has no text_encoder_2, tokenizer_2"):
        load_model(str(tmp_path / "m"))


def test_t5_without_its_tokenizer_is_refused():
    from slimdiff.models.loading import _wrap

    pipe = load_model("tiny:sd3").pipe
    pipe.tokenizer_3 = None
    with pytest.raises(UserError, match="has no tokenizer_3"):
        _wrap(pipe, "m")


def test_the_text_drop_pass_runs_before_the_teacher_is_recorded(tmp_path):
    """Passes after text.drop learn from the pipeline as deployed: the calibration's
    teacher runs without T5, and the artifact reloads without it."""
    from slimdiff.compress import Pass, PassReport, Stage, register_pass, unregister_pass

    seen = {}

    class Watch(Pass):
        name = "test.watch_t5"
        stage = Stage.STRUCTURAL
        needs_calibration = True

        def preflight(self, pipe, calib):
            seen["preflight"] = calib.pipe.text_encoder_3

        def apply(self, pipe, calib):
            calib.record()
            seen["apply"] = calib.pipe.text_encoder_3
            return PassReport(self.name)

    register_pass(Watch)
    try:
        recipe = validate_recipe(
            {
                "model": "tiny:sd3",
                "calibration": {
                    "prompts": ["a cat"],
                    "num_prompts": 1,
                    "steps": 2,
                    "size": (64, 64),
                },
                "passes": [{"pass": "text.drop"}, {"pass": "test.watch_t5"}],
            }
        )
        model = load_model("tiny:sd3")
        t5_params = sum(p.numel() for p in model.pipe.text_encoder_3.parameters())
        artifact = compress_model(model, recipe, tmp_path / "a")
    finally:
        unregister_pass("test.watch_t5")
    assert seen == {"preflight": None, "apply": None}
    assert artifact.pipe.text_encoder_3 is None
    report = json.loads((tmp_path / "a" / "report.json").read_text())["passes"][0]
    assert report["summary"] == {"dropped": ["text_encoder_3"], "params_removed": t5_params}
    index = json.loads((tmp_path / "a" / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None]
    assert load_model(str(tmp_path / "a"), weights="lazy").pipe.text_encoder_3 is None


def test_text_drop_comes_first_in_a_recipe():
    with pytest.raises(UserError, match="components -> structural"):
        validate_recipe(
            {
                "model": "tiny:sd3",
                "passes": [{"pass": "blocks.remove", "preset": "ssd-1b"}, {"pass": "text.drop"}],
            }
        )
    with pytest.raises(UserError, match=r"text\.drop.*encoders"):
        validate_recipe({"model": "tiny:sd3", "passes": [{"pass": "text.drop", "encoders": []}]})


def test_compress_skips_what_the_recipe_drops_and_hashes_the_same(tmp_path, monkeypatch):
    """slimdiff compress loads no T5 for a recipe that drops it; the compress hash is the
    one bench gets with the full model (loaded for its reference), so either reuses the
    other's artifact."""
    from slimdiff.app import flow

    recipe = validate_recipe(
        {"model": "tiny:sd3", "passes": [{"pass": "text.drop"}], "export": {"optimize": False}}
    )
    calls = []
    real = flow_load = load_model

    def spy(model, **kw):
        calls.append(kw.get("without"))
        return flow_load(model, **kw)

    monkeypatch.setattr("slimdiff.models.load_model", spy)
    first = flow.compress_and_export(recipe, tmp_path / "out")
    assert calls[0] == ("text_encoder_3",)
    assert first.reused == []
    again = flow.compress_and_export(recipe, tmp_path / "out", model=real("tiny:sd3"))
    assert again.reused == ["compress", "export:onnx"]


def test_drop_is_idempotent_and_counts_parameters():
    model = load_model("tiny:sd3")
    expected = sum(p.numel() for p in model.pipe.text_encoder_3.parameters())
    assert drop_text_encoders(model.pipe, model.arch, None) == {"text_encoder_3": expected}
    assert drop_text_encoders(model.pipe, model.arch, ["text_encoder_3"]) == {"text_encoder_3": 0}
    assert model.pipe.config.text_encoder_3 == (None, None)
    with torch.no_grad():  # and the pipeline still runs, as diffusers runs it
        model.pipe.set_progress_bar_config(disable=True)
        out = model.pipe("a", num_inference_steps=1, height=64, width=64, output_type="latent")
    assert out.images.shape == (1, model.pipe.transformer.config.in_channels, 8, 8)


class TestTextDropSD3(PassContract):
    pass_name = "text.drop"
    family = "sd3"


def test_a_hub_id_is_loaded_without_the_dropped_encoder_and_checked_after():
    """The family of a hub id is known only once loaded: from_pretrained gets None for the
    encoder and its tokenizer (diffusers' naming), and the drop is checked then."""
    from slimdiff.models.loading import _skipped

    assert _skipped("org/sd3-medium", ("text_encoder_3",)) == {
        "text_encoder_3": None,
        "tokenizer_3": None,
    }
    assert _skipped("tiny:sd3", ()) == {}
    with pytest.raises(UserError, match="sdxl's pipeline needs every one"):
        _skipped("tiny:sdxl", ("text_encoder_2",))  # a built-in: checked before the load
