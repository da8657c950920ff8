"""A huggingface_hub cache folder (models--org--name, its files symlinks from
snapshots/<commit>/ into blobs/) is read as the snapshot refs/main names, wherever a
model, a ControlNet or a VAE folder is taken; an ambiguous or broken one is refused in
one line."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from slimdiff.cli import main
from slimdiff.errors import UserError
from slimdiff.models import load_model
from slimdiff.models.hub import local_path
from slimdiff.models.loading import pipeline_class_of

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _as_hub_cache(folder: Path, root: Path, commit: str = COMMIT) -> Path:
    """`folder` laid out as huggingface_hub caches a download: each file a blob named by
    its content, linked from snapshots/<commit>/ (relative links, as the hub client makes
    them), and refs/main holding the commit."""
    repo = root / "models--org--tiny"
    blobs = repo / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = file.relative_to(folder)
        blob = blobs / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    saved = tmp_path_factory.mktemp("saved") / "pipe"
    load_model("tiny:sd15").pipe.save_pretrained(saved)
    return _as_hub_cache(saved, tmp_path_factory.mktemp("hub"))


def test_the_cache_folder_is_its_snapshot(cache):
    assert local_path(str(cache)) == cache / "snapshots" / COMMIT
    assert pipeline_class_of(str(cache)) == "StableDiffusionPipeline"
    for weights in ("memory", "lazy"):
        model = load_model(str(cache), weights=weights)
        assert model.arch.family == "sd15"
    reference = load_model("tiny:sd15").pipe.unet.state_dict()
    loaded = load_model(str(cache)).pipe.unet.state_dict()
    assert all((loaded[k] == v).all() for k, v in reference.items())


def test_paths_that_are_not_cache_folders_pass_through(tmp_path):
    plain = tmp_path / "models--but-no-snapshots"
    plain.mkdir()
    assert local_path(str(plain)) == plain
    assert local_path("~/x") == Path.home() / "x"


def test_the_cli_takes_a_cache_folder(cache):
    result = CliRunner().invoke(main, ["inspect", str(cache)])
    assert result.exit_code == 0, result.output
    assert "sd15" in result.output


def test_without_refs_the_only_snapshot(tmp_path):
    repo = tmp_path / "models--a--b"
    (repo / "snapshots" / "abc").mkdir(parents=True)
    assert local_path(repo) == repo / "snapshots" / "abc"


@pytest.mark.parametrize("case", ["two-snapshots", "ref-to-missing", "no-snapshot"])
def test_ambiguous_or_broken_caches_are_refused(tmp_path, case):
    repo = tmp_path / "models--a--b"
    (repo / "snapshots").mkdir(parents=True)
    if case == "two-snapshots":
        (repo / "snapshots" / "aaa").mkdir()
        (repo / "snapshots" / "bbb").mkdir()
    elif case == "ref-to-missing":
        (repo / "snapshots" / "aaa").mkdir()
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("bbb\n")
    with pytest.raises(UserError, match="hub cache folder") as err:
        local_path(repo)
    assert "snapshots" in str(err.value)
    result = CliRunner().invoke(main, ["inspect", str(repo)])
    assert result.exit_code == 2
    assert "hub cache folder" in result.output
    assert "Traceback" not in result.output
