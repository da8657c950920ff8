"""CLI surface: listing, validation, dry runs, and bad input -> one line + exit code 2."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from slimdiff.cli import main


def _run(*args):
    return CliRunner().invoke(main, list(args))


def _assert_one_line_error(result, pattern):
    import re

    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output  # one line, no traceback
    assert lines[0].startswith("error: "), lines
    assert re.search(pattern, lines[0]), lines[0]
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_recipes_lists_builtins_one_line_each():
    result = _run("recipes")
    assert result.exit_code == 0
    lines = result.output.strip().splitlines()
    assert any(line.startswith("tiny-sdxl-fp32 ") and "tiny:sdxl" in line for line in lines)


def test_validate_ok_and_bad(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nmodel: tiny:sdxl\nbench: {steps: -1}\n")
    ok = _run("validate", "tiny-sdxl-fp32")
    assert ok.exit_code == 0 and ok.output.startswith("ok: tiny-sdxl-fp32")
    result = _run("validate", str(bad))
    assert result.exit_code == 2
    assert "field 'bench.steps'" in result.output
    bad.write_text("version: 1\nmodel: tiny:sdxl\nbench: {steps: -1, sizes: 3}\n")
    result = _run("validate", str(bad), "tiny-sdxl-fp32")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 3 and lines[2].startswith("ok: tiny-sdxl-fp32"), lines
    assert "field 'bench.sizes': unknown key" in lines[1] and "more" not in lines[1]


def test_unknown_recipe_key_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nmodel: tiny:sdxl\npases: []\n")
    _assert_one_line_error(
        _run("compress", str(bad), "--out", str(tmp_path / "o")), r"field 'pases': unknown key"
    )


def test_wrong_type_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nmodel: tiny:sdxl\nexport: {precision: int3}\n")
    _assert_one_line_error(
        _run("compress", str(bad), "--out", str(tmp_path / "o")), r"field 'export.precision'"
    )


def test_compress_dry_run_prints_resolved_recipe_with_overrides(tmp_path):
    result = _run(
        "compress",
        "tiny-sdxl-fp32",
        "--model",
        "tiny:sd15",
        "--set",
        "export.precision=fp16",
        "--out",
        str(tmp_path / "o"),
        "--dry-run",
    )
    assert result.exit_code == 0, result.output
    assert "model: tiny:sd15" in result.output and "precision: fp16" in result.output
    assert not (tmp_path / "o").exists()


def test_bench_dry_run_applies_cli_options(tmp_path):
    result = _run(
        "bench",
        "tiny-sdxl-fp32",
        "--steps",
        "2",
        "--size",
        "64x96",
        "--out",
        str(tmp_path / "b"),
        "--dry-run",
    )
    assert result.exit_code == 0, result.output
    assert "steps: 2" in result.output and "- 96\n  - 64" in result.output


def test_missing_model_folder_exits_2(tmp_path):
    _assert_one_line_error(
        _run("export", str(tmp_path / "missing"), "--out", str(tmp_path / "b")), "not found"
    )


def test_non_diffusers_folder_exits_2(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "weights.bin").write_bytes(b"\0")
    _assert_one_line_error(
        _run("export", str(tmp_path / "m"), "--out", str(tmp_path / "b")),
        "not a diffusers model folder",
    )


def test_a_bundle_and_a_model_folder_swapped_say_which_is_which(tmp_path):
    """The usual mix-ups: a bundle given to export, a model folder or a bundle's component
    folder given to run; each names the command that takes it."""
    bundle, model = tmp_path / "bundle", tmp_path / "model"
    (bundle / "unet").mkdir(parents=True)
    (bundle / "manifest.json").write_text("{}")
    model.mkdir()
    (model / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    _assert_one_line_error(
        _run("export", str(bundle), "--out", str(tmp_path / "b")),
        f"{bundle} is a slimdiff bundle, already exported: run it with `slimdiff run",
    )
    png = str(tmp_path / "x.png")
    _assert_one_line_error(
        _run("run", str(model), "--prompt", "x", "--out", png),
        f"{model} is a diffusers model folder, not a slimdiff bundle: export it first",
    )
    _assert_one_line_error(
        _run("run", str(bundle / "unet"), "--prompt", "x", "--out", png),
        f"is a folder inside a bundle: pass the bundle, {bundle}",
    )
    # compress's output folder: its bundle is OUT/bundle
    _assert_one_line_error(
        _run("run", str(tmp_path), "--prompt", "x", "--out", png),
        f"{tmp_path} is not a bundle, it holds one: pass {bundle}",
    )


def test_hub_id_while_offline_exits_2(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _assert_one_line_error(
        _run("export", "someorg/some-model", "--out", str(tmp_path / "b")),
        "could not load hub model 'someorg/some-model'",
    )


def test_bad_size_argument_exits_2(tmp_path):
    _assert_one_line_error(_run("inspect", "tiny:sd15", "--size", "huge"), "WIDTHxHEIGHT")


def test_missing_bundle_exits_2(tmp_path):
    _assert_one_line_error(
        _run("run", str(tmp_path / "nobundle"), "--prompt", "x", "--out", str(tmp_path / "i.png")),
        "not found",
    )


def test_inspect_json_on_tiny_model():
    result = _run("inspect", "tiny:sd15", "--size", "128x128", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["denoiser"]["params"] > 0 and report["denoiser"]["flops_per_step"] > 0


@pytest.mark.parametrize(
    "cmd", ["recipes", "validate", "compress", "export", "run", "bench", "inspect"]
)
def test_every_command_has_help(cmd):
    result = _run(cmd, "--help")
    assert result.exit_code == 0 and "Usage:" in result.output


def test_a_reader_that_quit_ends_the_command_quietly_with_141():
    """stdout into a pipe whose reader is gone (`| head` done): exit 141 (128 + SIGPIPE),
    as a shell tool ends, and nothing on stderr."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "slimdiff", "validate", "tiny-sdxl-fp32"],
            stdout=write,
            stderr=subprocess.PIPE,
            timeout=120,
        )
    finally:
        os.close(write)
    assert out.returncode == 141 and out.stderr == b""


def test_latents_from_a_pipe_are_read_once(tmp_path):
    """`--latents <(...)`: a pipe cannot be opened twice, so the file is read whole once."""
    import os
    import threading

    import numpy as np

    from slimdiff.app.args import read_latents

    noise = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.save(tmp_path / "n.npy", noise)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    data = (tmp_path / "n.npy").read_bytes()
    writer = threading.Thread(target=lambda: fifo.write_bytes(data))
    writer.start()
    try:
        np.testing.assert_array_equal(read_latents(fifo), noise)
    finally:
        writer.join(timeout=10)
