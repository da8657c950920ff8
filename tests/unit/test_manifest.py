"""The manifest schema: what export writes is what the runtime reads back, byte for byte;
the bundle identity (SHA-256 of manifest.json) is the same wherever it is shown, and pins
the bundle; no edit of a manifest gives anything but a valid manifest or a BundleError."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
from slimdiff.runtime import bundle_files
from slimdiff.runtime.bundle_files import open_bundle
from slimdiff.runtime.manifest import (
    SCHEMA_VERSION,
    BundleError,
    Manifest,
    PipelineSpec,
    parse_manifest,
    read_manifest,
)
from slimdiff.runtime.pipeline import Text2ImagePipeline

from slimdiff.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "slimdiff", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, str]:
    """(bundle, the identity `slimdiff export` printed)."""
    out = tmp_path_factory.mktemp("m") / "bundle"
    result = _cli("export", "tiny:sd15", "--out", str(out), "--no-optimize")
    assert result.returncode == 0, result.stderr
    match = re.search(
        rf"^bundle: {re.escape(str(out))}  sha256 ([0-9a-f]{{64}})$", result.stdout, re.M
    )
    assert match, result.stdout
    return out, match.group(1)


def test_identity_printed_by_export_equals_verify_and_the_file_hash(exported):
    out, printed = exported
    verify = _cli("verify", str(out))
    assert verify.returncode == 0, verify.stderr
    first, summary, usage = verify.stdout.splitlines()
    assert first == f"bundle: {out}  sha256 {printed}"
    assert re.fullmatch(
        r"ok: sd15 bundle, 3 components \(text_encoder, unet, vae_decoder\), "
        r"\d+ files, [\d.]+ MB, every SHA-256 matches",
        summary,
    )
    # tiny:sd15's defaults and scheduler; nothing beyond a prompt (no VAE encoder)
    assert usage == (
        "runs: default 128x128, 30 steps, guidance 7.5, EulerDiscreteScheduler; unet onnx "
        "fp32; sides in multiples of 8"
    )
    assert printed == hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()
    assert open_bundle(out).sha256 == read_manifest(out, verify=False).sha256 == printed
    assert Text2ImagePipeline.from_bundle(out, expect_sha256=printed.upper()).manifest.sha256


def test_schema_round_trip_is_byte_identical(exported):
    out, _ = exported
    data = (out / "manifest.json").read_bytes()
    manifest = parse_manifest(data, out)
    assert manifest.to_bytes() == data
    assert parse_manifest(manifest.to_bytes(), out).to_bytes() == data  # deterministic
    assert json.loads(data)["schema_version"] == SCHEMA_VERSION == 2


def test_the_writer_builds_the_same_strict_model(exported):
    out, _ = exported
    data = json.loads((out / "manifest.json").read_text())
    Manifest.model_validate_json(json.dumps(data), strict=True)
    bad = {**data["pipeline"], "vae_scaling_factor": 0.0}
    with pytest.raises(pydantic.ValidationError, match="vae_scaling_factor"):
        PipelineSpec.model_validate(bad)  # what export/bundle.py builds the record with


def test_expect_sha256_mismatch_is_refused_before_other_files_are_hashed(exported, monkeypatch):
    out, printed = exported

    def no_hash(*args, **kwargs):
        raise AssertionError("a file was hashed before the identity was checked")

    monkeypatch.setattr(bundle_files, "_hash", no_hash)
    with pytest.raises(BundleError, match=rf"SHA-256 {printed} is not the expected 0{{64}}"):
        Text2ImagePipeline.from_bundle(out, expect_sha256="0" * 64)
    with pytest.raises(UserError, match=r"is not 64 hex digits"):
        open_bundle(out, expect_sha256="abc")


@pytest.mark.parametrize("command", ["run", "verify"])
def test_cli_expect_sha256_mismatch_exits_2_with_one_line(exported, tmp_path, command):
    out, printed = exported
    wrong = printed[::-1]
    extra = ["--prompt", "x", "--out", str(tmp_path / "x.png")] if command == "run" else []
    result = _cli(command, str(out), "--expect-sha256", wrong, *extra)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "is not the pinned bundle" in lines[0], result.stderr
    ok = _cli(command, str(out), "--expect-sha256", printed, *extra)
    assert ok.returncode == 0, ok.stderr


def _paths(node, prefix=()):
    """Every path into a JSON document, containers included."""
    yield prefix
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, child in items:
        yield from _paths(child, (*prefix, key))


REPLACEMENTS = [None, True, False, -1, 0, 3, 2**63, -1e308, 0.5, "", "x" * 300, "../x", [], {}, [0]]


def test_no_edit_of_a_manifest_gives_anything_but_bundle_error(exported):
    out, _ = exported
    base = json.loads((out / "manifest.json").read_text())
    outcomes = {"refused": 0, "valid": 0}
    for path in list(_paths(base))[1:]:
        for value in [*REPLACEMENTS, "DELETE"]:
            data = copy.deepcopy(base)
            node = data
            for key in path[:-1]:
                node = node[key]
            if value == "DELETE":
                del node[path[-1]]
            else:
                node[path[-1]] = value
            try:
                parse_manifest(json.dumps(data).encode(), out)
                outcomes["valid"] += 1
            except BundleError as err:
                assert "\n" not in str(err)
                outcomes["refused"] += 1
    # Some edits are legitimate (source text, parity numbers); most must be refused.
    assert outcomes["refused"] > 10 * outcomes["valid"] > 0, outcomes


@pytest.mark.parametrize(
    ("stats", "error"),
    [
        ({"vae_latents_mean": [0.1] * 4, "vae_latents_std": [0.9] * 4}, None),
        ({"vae_latents_mean": [0.1] * 4}, "come together"),
        ({"vae_latents_mean": [0.1] * 3, "vae_latents_std": [0.9] * 3}, "need 4 values each"),
        ({"vae_latents_mean": [0.1] * 4, "vae_latents_std": [0.9, 0.9, 0.9, 0]}, "std"),
        ({"vae_latents_mean": [0.1] * 4, "vae_latents_std": "0.9"}, "std"),
    ],
)
def test_vae_latent_statistics_are_optional_and_checked(exported, stats, error):
    """Written only when the VAE has them (other manifests stay as they were); when
    present, one value per latent channel each, the std positive."""
    out, _ = exported
    base = json.loads((out / "manifest.json").read_text())
    assert "vae_latents_mean" not in base["pipeline"]  # tiny:sd15's VAE has none
    base["pipeline"].update(stats)
    data = json.dumps(base).encode()
    if error is None:
        assert parse_manifest(data, out).pipeline.vae_latents_std == (0.9,) * 4
    else:
        with pytest.raises(BundleError, match=error):
            parse_manifest(data, out)


@pytest.mark.parametrize(
    ("writer", "fix"),
    [("99.0.1", "newer than this"), ("0.0.1", "export the bundle again"), ("dev", "again")],
)
def test_a_field_from_a_newer_slimdiff_says_upgrade(exported, writer, fix):
    """Optional fields are added within a schema version (LCM's guidance_embedding_dim,
    Playground's latent statistics): an unknown field in a manifest a newer slimdiff wrote
    means this one is too old, not that the bundle is bad."""
    out, _ = exported
    base = json.loads((out / "manifest.json").read_text())
    base["slimdiff_version"] = writer
    base["pipeline"]["kind"]["some_future_field"] = 1
    with pytest.raises(BundleError, match=fix) as info:
        parse_manifest(json.dumps(base).encode(), out)
    assert "some_future_field" in str(info.value)
    if writer == "99.0.1":
        assert "upgrade slimdiff (pip install -U slimdiff)" in str(info.value)
