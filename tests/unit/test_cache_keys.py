"""Cache keys follow what changes a result: every byte of the weights, the contents of the
files a recipe names (not their paths), the device passes run on, onnxruntime's version."""

from __future__ import annotations

import copy

import pytest
import torch

from slimdiff.app.flow import compress_hash, export_hash
from slimdiff.models import load_model
from slimdiff.models.fingerprint import fingerprint, module_digest
from slimdiff.recipe import Recipe, validate_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _quest(prompts) -> dict:
    return {
        "model": "tiny:sd15",
        "calibration": {"prompts": prompts, "num_prompts": 2, "steps": 2},
        "passes": [{"pass": "quant.quest", "weights": "int8", "activations": "int8"}],
    }


def test_a_prompts_file_keys_by_its_contents_named_relative_or_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("a red cube\na blue ball\n")
    relative = compress_hash(validate_recipe(_quest("prompts.txt")), {"m": 1})
    absolute = compress_hash(validate_recipe(_quest(str(tmp_path / "prompts.txt"))), {"m": 1})
    assert relative == absolute
    (tmp_path / "prompts.txt").write_text("a green cone\na blue ball\n")  # same path, new prompts
    assert compress_hash(validate_recipe(_quest("prompts.txt")), {"m": 1}) != relative
    # the built-in set and an inline list are keyed as written, as before
    assert compress_hash(validate_recipe(_quest("builtin")), {"m": 1}) != relative
    listed = compress_hash(validate_recipe(_quest(["a red cube", "a blue ball"])), {"m": 1})
    assert listed not in (relative, compress_hash(validate_recipe(_quest("builtin")), {"m": 1}))


def _lora_recipe(*paths: str, scales=(1.0, 0.5)) -> Recipe:
    loras = [{"path": p, "scale": s} for p, s in zip(paths, scales, strict=False)]
    return validate_recipe(
        {"model": "tiny:sdxl", "passes": [{"pass": "lora.fuse", "loras": loras}]}
    )


def test_pass_files_key_by_their_contents_named_relative_or_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.safetensors").write_bytes(b"lora a")
    (tmp_path / "b.safetensors").write_bytes(b"lora b")
    first = compress_hash(_lora_recipe("a.safetensors", "b.safetensors"), {"m": 1})
    absolute = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    assert compress_hash(_lora_recipe(*absolute), {"m": 1}) == first
    # each file keeps its own scale: swapped, they are another recipe
    assert compress_hash(_lora_recipe("b.safetensors", "a.safetensors"), {"m": 1}) != first
    (tmp_path / "b.safetensors").write_bytes(b"lora b, retrained")
    assert compress_hash(_lora_recipe("a.safetensors", "b.safetensors"), {"m": 1}) != first

    # vae.replace names a folder: its files' contents key it, not the folder's name
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text('{"_class_name": "AutoencoderTiny"}')
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")

    def vae_key(path: str) -> str:
        recipe = {"model": "tiny:sdxl", "passes": [{"pass": "vae.replace", "path": path}]}
        return compress_hash(validate_recipe(recipe), {"m": 1})

    vae_first = vae_key("vae")
    assert vae_key(str(vae)) == vae_key("./vae/") == vae_first
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(b"other weights")
    assert vae_key("vae") != vae_first


def test_the_compress_key_holds_the_device_passes_run_on():
    recipe = validate_recipe(_quest("builtin"))
    on_cpu = compress_hash(recipe, {"m": 1}, device="cpu")
    assert compress_hash(recipe, {"m": 1}, device="cpu") == on_cpu
    assert compress_hash(recipe, {"m": 1}, device="cuda") != on_cpu


def test_the_export_key_holds_onnxruntimes_version(monkeypatch):
    import onnxruntime

    recipe = validate_recipe({"model": "tiny:sd15"})
    before = export_hash("c", recipe, "onnx")
    monkeypatch.setattr(onnxruntime, "__version__", "0.0.1")
    assert export_hash("c", recipe, "onnx") != before


@pytest.mark.parametrize("target", ["onnx", "aoti"])
def test_the_export_key_holds_torchs_version_and_the_artifacts_does_not(monkeypatch, target):
    """Another torch traces other graphs and compiles packages another torch may not load:
    the bundle is exported again. The artifact (a diffusers folder) is reused."""
    recipe = validate_recipe({"model": "tiny:sd15"})
    before = export_hash("c", recipe, target), compress_hash(recipe, {"m": 1})
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    after = export_hash("c", recipe, target), compress_hash(recipe, {"m": 1})
    assert after[0] != before[0] and after[1] == before[1]


def test_the_calibration_key_holds_the_device(monkeypatch):
    from slimdiff.calib import Calibration
    from slimdiff.recipe import CalibrationSpec

    model = load_model("tiny:sd15")
    spec = CalibrationSpec(num_prompts=1, steps=2)
    on_cpu = Calibration(model.pipe, model.arch, spec).key
    # as if the pipeline were on a GPU (nothing runs: the key is all that is asked)
    monkeypatch.setattr(Calibration, "device", property(lambda self: torch.device("cuda")))
    assert Calibration(model.pipe, model.arch, spec).key != on_cpu


def _edit_one_token_row(pipe) -> None:
    """The probe's edit: 5.0 added to one token's embedding row, in place."""
    with torch.no_grad():
        pipe.text_encoder.get_input_embeddings().weight[5].add_(5.0)


def test_a_one_row_edit_changes_every_key_the_fingerprint_feeds(monkeypatch):
    """The compress artifact's, the calibration trajectories' and the bench reference's
    keys all come from `fingerprint`: a sample of 32 values per tensor missed this edit."""
    from slimdiff.calib import Calibration
    from slimdiff.recipe import CalibrationSpec

    model = load_model("tiny:sd15")
    spec = CalibrationSpec(num_prompts=1, steps=2)
    recipe = validate_recipe({"model": "tiny:sd15"})
    before = fingerprint(model.pipe)
    calib_before = Calibration(model.pipe, model.arch, spec).key
    _edit_one_token_row(model.pipe)
    after = fingerprint(model.pipe)
    assert {k for k in before if before[k] != after[k]} == {"text_encoder"}
    assert compress_hash(recipe, after, "cpu") != compress_hash(recipe, before, "cpu")
    assert Calibration(model.pipe, model.arch, spec).key != calib_before
    # bench keys its reference by {"fingerprint": fingerprint(pipe), ...} (app/bench.py)


def test_every_byte_counts_whatever_the_chunks_and_threads(monkeypatch):
    import slimdiff.models.fingerprint as fp

    monkeypatch.setattr(fp, "_CHUNK", 1024)  # a 40 kB weight: 40 chunks, batched on threads
    layer = torch.nn.Linear(100, 100, dtype=torch.float32)
    monkeypatch.setenv("SLIMDIFF_THREADS", "1")
    one = module_digest(layer)
    monkeypatch.setenv("SLIMDIFF_THREADS", "2")
    assert module_digest(layer) == one  # the digest does not depend on the threads
    with torch.no_grad():
        layer.weight[77, 33] += 1e-6  # one value, in the 31st chunk
    assert module_digest(layer) != one
    # a bfloat16 copy (no numpy dtype) hashes its own bytes; tied weights count for each name
    assert module_digest(copy.deepcopy(layer).to(torch.bfloat16)) != module_digest(layer)
    tied = torch.nn.Sequential(torch.nn.Embedding(4, 3), torch.nn.Linear(3, 4, bias=False))
    tied[1].weight = tied[0].weight
    untied = torch.nn.Sequential(torch.nn.Embedding(4, 3), torch.nn.Linear(3, 4, bias=False))
    untied.load_state_dict(tied.state_dict())
    assert module_digest(tied) == module_digest(untied)
