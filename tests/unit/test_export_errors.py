"""Bad arguments fail with one UserError line; a failed export leaves nothing behind."""

from __future__ import annotations

import pytest
import slimdiff.export as export_pkg
import torch
from slimdiff.export import ExportError, export_bundle
from slimdiff.runtime.manifest import MANIFEST_NAME, read_manifest

from slimdiff.errors import UserError
from slimdiff.models import LoadedModel, get_arch, load_model


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # Spinning OpenMP threads on a small shared CPU slow down 10-100x under contention.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sd3():
    return load_model("tiny:sd3")  # the quickest family to export (~2 s)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"target": "trt"},
            "export target 'trt' is not supported; supported: onnx, tensorrt, aoti",
        ),
        ({"target": "openvino"}, "supported: onnx, tensorrt, aoti"),
        ({"qdq": "modelopt"}, "qdq form 'modelopt' is not supported; use one of: ort, tensorrt"),
        ({"max_images": 0}, "build for at least one image per call"),
        ({"min_size": (256, 256)}, "min size 256x256 exceeds max size"),
        ({"min_size": (1024, 1024)}, "min size 1024x1024: this sd3 transformer holds positions"),
        ({"max_size": (100, 100)}, "multiples of 16 pixels"),
        ({"precision": "int8"}, "precision 'int8' is not supported; use one of: fp32, fp16"),
        ({"precision": "bf16"}, "use one of: fp32, fp16"),
        ({"vae_precision": "fp8"}, "vae_precision 'fp8' is not supported"),
        ({"external_data_threshold": 3 * 1024**3}, "protobuf cannot hold a graph over 2 GiB"),
    ],
)
def test_bad_arguments_raise_user_error_before_any_work(sd3, tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message):
        export_bundle(sd3, tmp_path / "bundle", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_lone_component_folder_is_refused(tmp_path):
    lone = LoadedModel(arch=get_arch("sdxl"), source="some/unet", pipe=None, denoiser=object())
    with pytest.raises(UserError, match="export needs the whole pipeline"):
        export_bundle(lone, tmp_path / "bundle")


def test_out_folder_that_is_not_a_bundle_is_left_alone(sd3, tmp_path):
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "cat.png").write_bytes(b"meow")
    with pytest.raises(UserError, match="exists and was not written by slimdiff"):
        export_bundle(sd3, precious)
    assert (precious / "cat.png").read_bytes() == b"meow"


def test_the_current_folder_is_not_replaced(sd3, tmp_path, monkeypatch):
    """An empty current folder would be swapped for the bundle, leaving the shell in a
    deleted folder: refused, as is a folder holding the current one."""
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    (tmp_path / "a" / ".slimdiff").write_text('{"kind": "bundle"}')  # a bundle's folder
    monkeypatch.chdir(inner)
    for out in (".", str(tmp_path / "a")):
        with pytest.raises(UserError, match="is the current folder \\(or holds it\\)"):
            export_bundle(sd3, out)
    assert inner.is_dir() and not any(inner.iterdir())


def _fail_on(monkeypatch, component_name: str):
    """Make the export of `component_name` raise midway, after earlier components wrote files."""
    real = export_pkg.check_parity

    def check_parity(component, path, precision, reference=None):
        if component.name == component_name:
            assert path.is_file()  # its graph is already on disk in the temp folder
            raise ExportError(f"{component_name}: simulated failure")
        return real(component, path, precision, reference)

    monkeypatch.setattr(export_pkg, "check_parity", check_parity)


def test_export_killed_midway_leaves_no_folder(sd3, tmp_path, monkeypatch):
    _fail_on(monkeypatch, "transformer")
    with pytest.raises(ExportError, match="simulated failure"):
        export_bundle(sd3, tmp_path / "bundle")
    # Neither the bundle nor the hidden .bundle.*.partial folder it was built in.
    assert list(tmp_path.iterdir()) == []


def test_failed_reexport_keeps_the_previous_bundle(sd3, tmp_path, monkeypatch):
    out = tmp_path / "bundle"
    first = export_bundle(sd3, out, optimize=False)
    _fail_on(monkeypatch, "vae_decoder")
    with pytest.raises(ExportError):
        export_bundle(sd3, out, precision="fp16", optimize=False)
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
    kept = read_manifest(out)  # verifies every hash: the old bundle is intact
    assert kept.files == first.files
    assert {c.precision for c in kept.components.values()} == {"fp32"}
    assert (out / MANIFEST_NAME).is_file()


def test_parity_failure_raises_export_error_naming_the_component(sd3, tmp_path, monkeypatch):
    # A graph that disagrees with torch must stop the export, not ship with passed=False.
    real = export_pkg.check_parity

    def off_by_much(component, path, precision, reference=None):
        record = real(component, path, precision, reference)
        if component.name == "text_encoder_2":
            record.update(rel_err=0.5, passed=False)
        return record

    monkeypatch.setattr(export_pkg, "check_parity", off_by_much)
    with pytest.raises(ExportError, match=r"text_encoder_2: ONNX \(fp32\) differs from torch"):
        export_bundle(sd3, tmp_path / "bundle", optimize=False)
    assert list(tmp_path.iterdir()) == []
    # the CLI: one line naming its own option, exit 1 (not the user's input), nothing left
    from click.testing import CliRunner

    from slimdiff.cli import main

    result = CliRunner().invoke(main, ["export", "tiny:sd3", "--out", str(tmp_path / "b")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert (
        result.output.strip()
        .splitlines()[-1]
        .startswith("error: text_encoder_2: ONNX (fp32) differs from torch: rel err 0.5")
    )
    assert "export with --no-optimize (API: optimize=False)" in result.output
    assert list(tmp_path.iterdir()) == []


def test_options_that_change_nothing_are_said(sd3, tmp_path, caplog):
    """--qdq on a model without quantized layers, and a range that leaves out the model's
    default size, are warned of (the export goes on: here it stops at the file --out)."""
    from slimdiff.export.profiles import size_range

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with caplog.at_level("WARNING"), pytest.raises(UserError, match="is a file; pass a folder"):
        export_bundle(sd3, a_file, qdq="tensorrt")
    assert "qdq tensorrt has no effect: tiny:sd3 has no quantized layers" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        sizes = size_range(sd3, max_size=(64, 96))
    assert sizes.opt_size == (64, 96)
    assert "default size 128x128 is outside the range built for (64x64 to 96x64)" in caplog.text


def test_quantized_layers_export_fp32_only(tmp_path):
    """Q/DQ layers have no fp16 form in onnxruntime: refused before any export work."""
    from slimdiff.lowbit import INT4_DIGEST_ATTR

    model = load_model("tiny:sd3")
    layer = next(m for m in model.denoiser.modules() if isinstance(m, torch.nn.Linear))
    setattr(layer, INT4_DIGEST_ATTR, None)  # what a quantized layer carries
    with pytest.raises(UserError, match=r"precision fp16: tiny:sd3 has quantized layers"):
        export_bundle(model, tmp_path / "bundle", precision="fp16")
    assert list(tmp_path.iterdir()) == []
