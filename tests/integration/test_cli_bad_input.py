"""Bad CLI input: one line, exit 2, before any heavy work, and nothing written or replaced.

The cases are those a review tried on run/export/inspect/compress/bench (tracebacks then),
and sizes it found the graph could not run though the torch model could (they run now).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from slimdiff.cli import main

pytestmark = pytest.mark.slow


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _refused(result, fragment: str) -> None:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert fragment in lines[0], lines[0]
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from slimdiff.export import export_bundle

    from slimdiff.models import load_model

    out = tmp_path_factory.mktemp("b") / "bundle"
    export_bundle(load_model("tiny:sdxl"), out, optimize=False)
    return out


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lat")
    np.save(folder / "strings.npy", np.array(["a", "b"]))
    np.save(folder / "nan.npy", np.full((1, 4, 8, 8), np.nan, np.float32))
    np.save(folder / "shape.npy", np.zeros((1, 3, 8, 8), np.float32))
    np.save(folder / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (folder / "garbage.npy").write_bytes(b"not numpy at all")
    np.save(folder / "huge.npy", np.full((1, 4, 8, 8), 3e38, np.float32))
    return folder


RUN_CASES = [
    (["--size", "0x0"], "--size 0x0: each side must be 1 to 8192"),
    (["--size", "7x7"], "size 7x7: each side must be 8 to 8192"),  # the bundle's multiple
    (["--size", "100000x100000"], "each side must be 1 to 8192"),
    (["--size", "130x128"], "size 130x128 (width x height) is not a multiple of 8; use e.g. 128"),
    (["--size", "big"], "is not WIDTHxHEIGHT"),
    (["--steps", "1000000000"], "1000000000 is not in the range 1<=x<=1000"),
    (["--steps", "0"], "is not in the range 1<=x<=1000"),
    (["--seed", "-1"], "is not in the range 0<=x<=4294967295"),
    (["--seed", str(2**70)], "is not in the range 0<=x<=4294967295"),
    (["--guidance", "nan"], "--guidance nan: use a finite value from 0 to 100"),
    (["--guidance", "inf"], "use a finite value"),
    (["--guidance", "-inf"], "use a finite value"),
    (["--guidance", "1e308"], "use a finite value"),
    (["--guidance-rescale", "1.5"], "1.5 is not in the range 0.0<=x<=1.0"),
    (["--guidance-rescale", "nan"], "guidance rescale nan: use a value from 0 to 1"),
    (["--eta", "1.5"], "1.5 is not in the range 0.0<=x<=1.0"),
    (["--eta", "nan"], "eta nan: use a value from 0 to 1"),
    (["--eta", "0.3"], "takes no eta here (only TCD's gamma is ported as eta, not DDIM's"),
    (["--backend", "bogus"], "unknown backend 'bogus'"),
    (["--backend", "aoti"], "has no AOTInductor package (its components are ONNX graphs); export"),
    (["--expect-sha256", "0" * 64], "this is not the pinned bundle"),
]


@pytest.mark.parametrize(("args", "fragment"), RUN_CASES)
def test_bad_run_arguments(bundle, tmp_path, args, fragment):
    out = tmp_path / "x.png"
    _refused(_run("run", bundle, "--prompt", "x", "--out", out, *args), fragment)
    assert not out.exists()


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("strings.npy", "not numbers"),
        ("nan.npy", "NaN or infinite"),
        ("shape.npy", "latents have shape (1, 3, 8, 8)"),
        ("objects.npy", "not a plain .npy array"),
        ("garbage.npy", "not a .npy file; write one with numpy.save"),
    ],
)
def test_bad_latents(bundle, latents, tmp_path, name, fragment):
    out = tmp_path / "x.png"
    args = ("run", bundle, "--prompt", "x", "--size", "64x64", "--latents", latents / name)
    _refused(_run(*args, "--out", out), fragment)
    assert not out.exists()


def test_a_run_whose_numbers_break_down_stops_instead_of_writing_a_black_image(
    bundle, latents, tmp_path, monkeypatch
):
    from slimdiff.runtime.denoise_loop import Guidance

    out = tmp_path / "x.png"
    args = ("run", bundle, "--prompt", "x", "--size", "64x64", "--steps", "2")
    # latents far beyond any model's scale are refused before the run starts ...
    huge = _run(*args, "--latents", latents / "huge.npy", "--out", out)
    _refused(huge, "latents reach 3e+38 in magnitude, far above their scale")
    # ... and a denoiser whose numbers overflow mid-run (an fp16 graph) stops the run
    monkeypatch.setattr(
        Guidance, "predict", lambda self, denoiser, feeds, x: np.full_like(x, np.inf)
    )
    result = _run(*args, "--out", out)
    assert result.exit_code == 1, result.output
    assert (
        result.output.strip()
        .splitlines()[-1]
        .startswith(
            "error: NaN or infinite values in the latents after step 1 of 2; try the bundle's own "
            "scheduler"
        )
    )
    assert not out.exists()


def test_bad_run_outputs(bundle, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    _refused(_run("run", bundle, "--prompt", "x", "--out", folder), "is a folder")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    _refused(_run("run", bundle, "--prompt", "x", "--out", fifo), "not a regular file")
    assert fifo.exists() and not fifo.is_file()  # left as it was
    if Path("/dev/full").exists():
        _refused(_run("run", bundle, "--prompt", "x", "--out", "/dev/full"), "not a regular file")
        assert not Path("/dev/full").is_file()
    for bad in ("/proc/slimdiff-test.png", "/sys/slimdiff-test.png"):
        _refused(_run("run", bundle, "--prompt", "x", "--out", bad), "cannot write in")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _refused(_run("run", bundle, "--prompt", "x", "--out", blocker / "x.png"), "Not a directory")
    gif = tmp_path / "x.gif"
    _refused(_run("run", bundle, "--prompt", "x", "--out", gif), "written as .png, .jpg or .webp")
    assert not gif.exists()


@pytest.mark.parametrize("size", ["8x8", "16x16", "24x24", "72x72", "136x128"])
def test_sizes_the_torch_model_runs_at_run_from_the_bundle(bundle, tmp_path, size):
    out = tmp_path / "x.png"
    result = _run("run", bundle, "--prompt", "x", "--steps", "2", "--size", size, "--out", out)
    assert result.exit_code == 0, result.output
    w, h = (int(v) for v in size.split("x"))
    from PIL import Image

    assert Image.open(out).size == (w, h)


def test_bad_export_inspect_compress_bench_input(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    _refused(_run("export", "tiny:sd15", "--out", a_file), "is not a folder")
    _refused(_run("export", "tiny:sd15", "--out", "/proc/slimdiff-b"), "cannot write in")
    _refused(_run("export", "tiny:sd15", "--out", tmp_path / "b", "--precision", "int3"), "int3")
    _refused(_run("inspect", "tiny:sd15", "--size", "0x0"), "each side must be 8 to 8192")
    for option, size, fragment in (
        ("--min-size", "13x13", "--min-size 13x13: each side must be a multiple of 8; use e.g."),
        ("--max-size", "99999x8", "--max-size 99999x8: each side must be 8 to 8192"),
    ):
        _refused(_run("export", "tiny:sd15", "--out", tmp_path / "s", option, size), fragment)
    for model, name, fragment in (
        ("tiny:sdxl", "text_encoder_2", "sdxl's pipeline needs every one of its text encoders"),
        ("tiny:sd3", "text_encoder", "sd3's pipeline needs it; only text_encoder_3 can be"),
        ("tiny:sd3", "t5", "sd3 has no such text encoder"),
    ):
        drop = ("--drop-text-encoder", name)
        _refused(_run("export", model, "--out", tmp_path / "d", *drop), fragment)
        assert not (tmp_path / "d").exists()
    _refused(_run("compress", "tiny-sdxl-fp32", "--out", a_file), "is not a folder")
    binary = tmp_path / "r.yaml"
    binary.write_bytes(b"\x00\x01\xffbinary")
    _refused(_run("compress", binary, "--out", tmp_path / "c"), "r.yaml")
    for sets, fragment in (
        ("bench.seed=-1", "bench.seed"),
        ("calibration.size=[7, 7]", "a side must be a multiple of 8"),
        ("export.targets=[trt]", "unknown target 'trt'"),
        ("export.max_images=0", "export.max_images"),
        ("bench.guidance=.nan", "bench.guidance"),
        ("bench.guidance_rescale=2", "bench.guidance_rescale"),
        ("calibration.guidance_rescale=-1", "calibration.guidance_rescale"),
        ("bench.steps=[1", "not valid YAML"),
    ):
        _refused(
            _run("compress", "tiny-sdxl-fp32", "--out", tmp_path / "c", "--set", sets), fragment
        )
    _refused(_run("compress", "tiny-sdxl-fp32", "--out", tmp_path / "c", "--device", "gpu"), "gpu")
    _refused(
        _run("compress", "tiny-sdxl-fp32", "--out", tmp_path / "c", "--model", "dir #2"),
        "model 'dir #2' not found",
    )
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_a_folder_slimdiff_did_not_write_is_never_replaced(tmp_path):
    users = tmp_path / "d" / "artifact"
    users.mkdir(parents=True)
    (users / "thesis.txt").write_text("mine")
    start = time.perf_counter()
    _refused(_run("compress", "tiny-sdxl-fp32", "--out", tmp_path / "d"), "not written by slimdiff")
    assert time.perf_counter() - start < 30  # refused before the model loads: no compress
    assert (users / "thesis.txt").read_text() == "mine"


def test_bench_refuses_a_bad_backend_before_any_work(tmp_path):
    result = _run("bench", "tiny-sdxl-fp32", "--backend", "bogus", "--out", tmp_path / "o")
    _refused(result, "unknown backend 'bogus'")
    assert not (tmp_path / "o" / "_reference").exists()  # no reference was computed
    # a backend whose bundle the recipe does not export: refused before any work too
    result = _run("bench", "tiny-sdxl-fp32", "--backend", "aoti", "--out", tmp_path / "o")
    _refused(result, "add aoti to export.targets")
    assert not (tmp_path / "o" / "_reference").exists()
    # a guidance rescale the model's pipeline does not have (SD3's): refused before any work
    args = ("--model", "tiny:sd3", "--set", "bench.guidance_rescale=0.5")
    result = _run("bench", "tiny-sdxl-fp32", *args, "--out", tmp_path / "o")
    _refused(result, "bench.guidance_rescale: StableDiffusion3Pipeline has no guidance rescale")
    assert not (tmp_path / "o" / "_reference").exists()


def test_killed_runs_partials_are_removed_on_the_next_run(tmp_path, caplog):
    from slimdiff.export import export_bundle

    from slimdiff.models import load_model

    stale = tmp_path / ".bundle.999999-1.deadbeef.partial"  # a dead process's build folder
    stale.mkdir()
    (stale / "unet.onnx").write_bytes(b"x" * 1000)
    export_bundle(load_model("tiny:sd3"), tmp_path / "bundle", optimize=False, check=False)
    assert not stale.exists()
    assert any(
        "removed stale partial .bundle.999999-1.deadbeef.partial" in r.getMessage()
        for r in caplog.records
    )


def test_bad_image_to_image_arguments(bundle, latents, tmp_path):
    from PIL import Image

    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    out = tmp_path / "x.png"
    run = ("run", bundle, "--prompt", "x", "--out", out)
    # the module's bundle was exported without --vae-encoder
    _refused(_run(*run, "--image", image), "export it again with --vae-encoder")
    _refused(_run(*run, "--strength", "0.5"), "--strength needs --image")
    _refused(_run(*run, "--mask", image), "--mask needs --image")
    _refused(_run(*run, "--image", image, "--strength", "0"), "is not in the range 0.0<x<=1.0")
    _refused(_run(*run, "--image", image, "--strength", "1.5"), "is not in the range")
    _refused(_run(*run, "--image", tmp_path / "missing.png"), "does not exist")
    _refused(_run(*run, "--image", image, "--latents", latents / "shape.npy"), "exclusive")
    assert not out.exists()


def test_bad_controlnet_arguments(bundle, tmp_path):
    """ControlNet options: refused in one line before any model loads or graph runs."""
    import json

    from PIL import Image

    image = tmp_path / "edges.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    out = tmp_path / "x.png"
    run = ("run", bundle, "--prompt", "x", "--out", out)
    # the module's bundle was exported without --controlnet
    _refused(_run(*run, "--control-image", image), "export it again with --controlnet DIR")
    _refused(_run(*run, "--control-scale", "0.5"), "--control-scale needs --control-image")
    _refused(_run(*run, "--control-end", "0.5"), "--control-end needs --control-image")
    _refused(_run(*run, "--control-image", image, "--control-scale", "-1"), "is not in the range")
    _refused(_run(*run, "--control-image", image, "--control-scale", "nan"), "use a finite value")
    _refused(
        _run(*run, "--control-image", image, "--control-start", "0.6", "--control-end", "0.3"),
        "--control-start 0.6 must be below --control-end 0.3",
    )
    _refused(_run(*run, "--control-image", tmp_path / "missing.png"), "does not exist")
    assert not out.exists()

    flux = tmp_path / "flux-cn"
    flux.mkdir()
    (flux / "config.json").write_text(json.dumps({"_class_name": "FluxControlNetModel"}))
    broken = tmp_path / "broken-cn"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    export = ("export", "tiny:sd15", "--out", tmp_path / "b")
    cases = [
        ((tmp_path / "nowhere",), "no such folder"),
        ((image,), "a ControlNet file is a .safetensors file"),
        ((tmp_path,), "has no config.json"),
        ((broken,), "is not readable JSON"),
        ((flux,), "is a FLUX ControlNet (FluxControlNetModel)"),
        ((flux, "--target", "aoti"), "is a FLUX ControlNet (FluxControlNetModel)"),
        ((flux, "--weights", "stream"), "which --weights stream never loads"),
        ((*[broken, "--controlnet"] * 4, flux), "5 ControlNets: a bundle takes at most 4"),
    ]
    for args, fragment in cases:
        start = time.perf_counter()
        _refused(_run(*export, "--controlnet", *args), fragment)
        assert time.perf_counter() - start < 5  # before the model loads
    assert not (tmp_path / "b").exists()
