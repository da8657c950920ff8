"""A cached artifact is reused only as it was written, and writes the same bytes either way.

The compress cache is what these tests exercise, so `export_bundle` is replaced by a stub
that records its calls: exporting tiny:sd15 takes ~15 s a run on a shared 2-CPU machine,
and tests/unit/test_bench_measures.py covers the bundle cache with real exports.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimdiff.app.flow import ARTIFACT_HASHES, compress_and_export
from slimdiff.models import load_model
from slimdiff.recipe import validate_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

UNET = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture
def exports(monkeypatch) -> list[Path]:
    """The bundles the flow asked for; none is written."""
    import slimdiff.export

    asked: list[Path] = []
    monkeypatch.setattr(
        slimdiff.export, "export_bundle", lambda model, out, **kw: asked.append(out)
    )
    return asked


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _truncate(artifact: Path) -> None:
    path = artifact / UNET
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _change_a_value(artifact: Path) -> None:
    """A byte of the last tensor's data changed: the file still parses and loads."""
    path = artifact / UNET
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))


def _remove_a_file(artifact: Path) -> None:
    (artifact / "vae" / "config.json").unlink()


def _unrecord(artifact: Path) -> None:
    """As a run killed between the artifact's swap and its hashes' write leaves it."""
    (artifact / ARTIFACT_HASHES).unlink()


def _damage_recorded_as_written(artifact: Path) -> None:
    """Hashes that match a damaged file: the load fails, and that is caught too."""
    _truncate(artifact)
    from slimdiff.app.flow import _record_artifact_hashes

    _record_artifact_hashes(artifact)


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (_truncate, f"{UNET} is not the file written"),
        (_change_a_value, f"{UNET} is not the file written"),
        (_remove_a_file, "vae/config.json is missing"),
        (_unrecord, f"no readable {ARTIFACT_HASHES}"),
        (_damage_recorded_as_written, "the cached artifact does not load"),
    ],
    ids=["truncated", "changed", "missing", "unrecorded", "loads-not"],
)
def test_a_damaged_cached_artifact_is_compressed_again(tmp_path, caplog, exports, damage, why):
    recipe = validate_recipe({"model": "tiny:sd15"})
    first = compress_and_export(recipe, tmp_path / "out")
    # copies: load_file's tensors may map the file, which the damage rewrites in place
    written = {k: v.clone() for k, v in load_file(first.artifact / UNET).items()}
    assert sorted(json.loads((first.artifact / ARTIFACT_HASHES).read_text())["files"]) == sorted(
        p.relative_to(first.artifact).as_posix()
        for p in first.artifact.rglob("*")
        if p.is_file() and p.name != ARTIFACT_HASHES
    )
    damage(first.artifact)
    with caplog.at_level(logging.WARNING, logger="slimdiff.app.flow"):
        again = compress_and_export(recipe, tmp_path / "out")
    assert "compress" not in again.reused
    assert f"compressing {first.artifact} again" in caplog.text
    assert why in caplog.text
    assert _same_weights(load_file(again.artifact / UNET), written)
    assert compress_and_export(recipe, tmp_path / "out").reused == ["compress"]
    assert len(exports) == 3  # the stub writes no bundle: asked each time


def test_a_one_row_edit_of_the_model_folder_is_compressed_again(tmp_path, exports):
    """The probe's edit: one token's embedding row changed in the saved model, in place."""
    folder = tmp_path / "sd15"
    load_model("tiny:sd15").pipe.save_pretrained(folder, safe_serialization=True)
    recipe = validate_recipe({"model": str(folder)})
    assert compress_and_export(recipe, tmp_path / "out").reused == []
    assert compress_and_export(recipe, tmp_path / "out").reused == ["compress"]
    edited = load_model(str(folder))
    with torch.no_grad():
        edited.pipe.text_encoder.get_input_embeddings().weight[5].add_(5.0)
    edited.pipe.save_pretrained(folder, safe_serialization=True)
    again = compress_and_export(recipe, tmp_path / "out")
    assert again.reused == []
    row = load_model(str(again.artifact)).pipe.text_encoder.get_input_embeddings().weight[5]
    assert torch.equal(row, edited.pipe.text_encoder.get_input_embeddings().weight[5])


def _files(folder: Path, under: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / under).iterdir())}


def test_tokenizers_are_saved_alike_before_and_after_a_pipeline_call(tmp_path):
    """The pipeline's call leaves padding and truncation in its tokenizer; an artifact or a
    bundle saved after it (calibration ran) had other tokenizer files, hence another bundle
    SHA-256, than one saved without it (calibration came from its cache)."""
    from slimdiff.export.bundle import write_support_files

    from slimdiff.models.saving import save_pipeline

    model = load_model("tiny:sd15")
    save_pipeline(model.pipe, tmp_path / "artifact-before")
    write_support_files(model, tmp_path / "bundle-before")
    model.pipe("a red cube", num_inference_steps=1, height=64, width=64, output_type="latent")
    assert model.pipe.tokenizer.backend_tokenizer.padding is not None  # the call's state
    save_pipeline(model.pipe, tmp_path / "artifact-after")
    write_support_files(model, tmp_path / "bundle-after")
    before = _files(tmp_path / "artifact-before", "tokenizer")
    assert _files(tmp_path / "artifact-after", "tokenizer") == before
    assert json.loads(before["tokenizer.json"])["padding"] is None
    bundle = _files(tmp_path / "bundle-before", "tokenizer")
    assert _files(tmp_path / "bundle-after", "tokenizer") == bundle
    # the tokenizer keeps its call state for the caller, as it was
    assert model.pipe.tokenizer.backend_tokenizer.padding["length"] == 77
    # the flow exports the artifact loaded again: the same bundle files from either
    for when in ("before", "after"):
        loaded = load_model(str(tmp_path / f"artifact-{when}"))
        write_support_files(loaded, tmp_path / f"bundle-of-artifact-{when}")
    of_after = _files(tmp_path / "bundle-of-artifact-after", "tokenizer")
    assert of_after == _files(tmp_path / "bundle-of-artifact-before", "tokenizer")
    assert "max_length" not in json.loads(of_after["tokenizer_config.json"])


def test_each_tokenizer_kind_is_saved_without_its_call_state(tmp_path):
    from slimdiff.models.saving import save_tokenizer

    pipe = load_model("tiny:sd3").pipe
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):  # CLIP, CLIP, T5
        tokenizer = getattr(pipe, name)
        save_tokenizer(tokenizer, tmp_path / name / "before")
        tokenizer(["a cat"], padding="max_length", max_length=16, truncation=True)
        save_tokenizer(tokenizer, tmp_path / name / "after")
        assert _files(tmp_path / name, "after") == _files(tmp_path / name, "before"), name
        assert tokenizer.backend_tokenizer.truncation["max_length"] == 16
