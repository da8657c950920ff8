"""A bundle that was tampered with, truncated or crafted is refused with one BundleError
line before any graph is loaded; harmless changes still give the identical image.

One tiny:sd15 bundle is exported per module; each case (tests/unit/bundle_tampering.py)
edits a fresh copy. onnxruntime's own refusal of external data outside a graph's folder is
proven here too, on graphs crafted with the onnx package (the runtime does not parse ONNX).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper
from slimdiff.runtime import BundleError, Text2ImagePipeline
from slimdiff.runtime.backends.ort import OrtBackend

from slimdiff.errors import UserError
from tests.unit.bundle_tampering import CASES, HARMLESS, UNET, replace_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "a red circle"
RUN = {"steps": 2, "size": (64, 64), "seed": 0}


@pytest.fixture(scope="module")
def bundle(shared_bundle) -> Path:
    return shared_bundle("sd15", optimize=False).out  # read only: tests edit copies


@pytest.fixture(scope="module")
def reference(bundle) -> np.ndarray:
    return Text2ImagePipeline.from_bundle(bundle)(PROMPT, **RUN).image


@pytest.fixture
def copy(bundle, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    (tmp_path / "outside").mkdir()
    return dst


@pytest.fixture
def no_load(monkeypatch):
    def fail(self, path):
        raise AssertionError(f"{path} loaded before the bundle was refused")

    monkeypatch.setattr(OrtBackend, "load", fail)


@pytest.mark.parametrize(("tamper", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_tampered_bundle_is_refused_before_anything_loads(copy, no_load, tamper, fragment):
    tamper(copy)
    with pytest.raises(BundleError, match=fragment) as caught:
        Text2ImagePipeline.from_bundle(copy)
    assert "\n" not in str(caught.value)


def test_the_table_covers_enough_tamperings():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("tamper", [c[1] for c in HARMLESS], ids=[c[0] for c in HARMLESS])
def test_harmless_change_gives_the_identical_image(copy, reference, tamper):
    tamper(copy)
    image = Text2ImagePipeline.from_bundle(copy)(PROMPT, **RUN).image
    np.testing.assert_array_equal(image, reference)


def test_bundle_root_may_be_a_symlink(copy, reference, tmp_path):
    current = tmp_path / "current"
    current.symlink_to(copy)
    np.testing.assert_array_equal(
        Text2ImagePipeline.from_bundle(current)(PROMPT, **RUN).image, reference
    )


def test_graph_swapped_for_another_is_refused_at_load(copy):
    replace_file(UNET, (copy / "vae_decoder/model.onnx").read_bytes(), rehash=True)(copy)
    with pytest.raises(BundleError, match=r"unet/model.onnx takes \['latent_sample'\]"):
        Text2ImagePipeline.from_bundle(copy)


# ---------------------------------------------------------------- through the CLI

CLI_CASES = [
    "link-graph-out",
    "unlisted-scheduler-edited",
    "vae-scaling-zero",
    "utf16",
    "deep-100000",
    "version-1",
    "files-key-dotdot",
]


@pytest.mark.parametrize("command", ["run", "verify"])
@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_refuses_with_one_line_and_exit_2(copy, tmp_path, case, command):
    tamper, fragment = next(c[1:] for c in CASES if c[0] == case)
    tamper(copy)
    args = [str(copy)]
    if command == "run":
        args += ["--prompt", PROMPT, "--out", str(tmp_path / "x.png")]
    out = subprocess.run(
        [sys.executable, "-m", "slimdiff", command, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert re.search(fragment, lines[0]), lines[0]
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "case",
    ["scheduler-class-rehashed", "scheduler-garbage-rehashed", "tokenizer-garbage-rehashed"],
)
def test_verify_parses_what_run_parses_before_it_says_ok(copy, case):
    """Files whose hashes match but that a run cannot read: verify says so, and no `ok`."""
    tamper, fragment = next(c[1:] for c in CASES if c[0] == case)
    tamper(copy)
    out = _cli("verify", str(copy))
    assert out.returncode == 2 and out.stdout == "", out
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and re.search(fragment, lines[0]), lines


def test_verify_load_checks_each_graph_against_the_manifest(copy):
    ok = _cli("verify", str(copy), "--load")
    assert ok.returncode == 0, ok.stderr
    names = ", ".join(json.loads((copy / "manifest.json").read_text())["components"])
    assert names.startswith("text_encoder, unet, vae_decoder")
    assert f"loaded: {names} on ort-cpu, as the manifest declares" in ok.stdout
    replace_file(UNET, (copy / "vae_decoder/model.onnx").read_bytes(), rehash=True)(copy)
    assert _cli("verify", str(copy)).returncode == 0  # the hashes match: only a load sees it
    out = _cli("verify", str(copy), "--load")
    assert out.returncode == 2 and out.stdout == ""
    assert re.search(r"^error: .*unet/model.onnx takes \['latent_sample'\]", out.stderr)
    assert _cli("verify", str(copy), "--load", "--backend", "nope").returncode == 2


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "slimdiff", *args], capture_output=True, text=True, timeout=120
    )


# ---------------------------------------------------------------- ONNX external data


def _graph_with_external_data(location: str, sparse: bool = False) -> bytes:
    """A graph whose one weight (4 floats) is external data at `location`, as a dense or a
    sparse initializer: onnxruntime, not the runtime, resolves the location."""
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        tensor.external_data.add(key=key, value=value)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    if sparse:
        indices = helper.make_tensor("w_idx", TensorProto.INT64, [4], [0, 1, 2, 3])
        init = {"sparse_initializer": [helper.make_sparse_tensor(tensor, indices, [4])]}
    else:
        init = {"initializer": [tensor]}
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [], [y], **init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize(
    "location",
    ["../outside/w.bin", "ABSOLUTE", "../tokenizer/tokenizer.json"],
    ids=["dotdot", "absolute", "other-folder-in-bundle"],
)
def test_onnxruntime_refuses_external_data_outside_the_graph_folder(copy, location, sparse):
    # A crafted bundle whose manifest lists the crafted graph with its true hash: every
    # runtime check passes, so only onnxruntime stands between the graph and the file.
    outside = copy.parent / "outside" / "w.bin"
    outside.write_bytes(np.arange(4, dtype=np.float32).tobytes())
    location = str(outside) if location == "ABSOLUTE" else location
    replace_file(UNET, _graph_with_external_data(location, sparse), rehash=True)(copy)
    refused = r"External data path escapes|Absolute path not allowed for external data"
    with pytest.raises(UserError, match=rf"{UNET}: onnxruntime could not load it .*({refused})"):
        Text2ImagePipeline.from_bundle(copy)


def test_external_data_inside_the_graph_folder_is_hashed_like_any_file(copy):
    # The same crafted graph reading unet/w.bin loads, once w.bin is listed; unlisted, the
    # runtime refuses it before onnxruntime could read it.
    (copy / "unet/w.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    replace_file(UNET, _graph_with_external_data("w.bin"), rehash=True)(copy)
    with pytest.raises(BundleError, match=r"unet/w.bin is not listed in manifest.json files"):
        Text2ImagePipeline.from_bundle(copy)
    session = OrtBackend().load(copy / UNET)  # what the runtime would hand it, once listed
    assert session.run({})["y"].tolist() == [0.0, 1.0, 2.0, 3.0]
