"""A graph whose outputs disagree with the manifest is refused in one line: at load where the
graph declares it (a dtype, a fixed size), at the first run where it leaves the size dynamic,
and onnxruntime's own failures inside a run (a node that cannot take what the pipeline
feeds) name the component instead of ending in a traceback.

Each case edits a copy of one tiny:sd15 bundle the way a damaged or hand-edited export would:
the graph's output is renamed and recomputed through a Slice or a Cast, its declared shape
cleared (onnxruntime infers what it can), and the manifest's hash fixed, so every file check
passes and only the graph check can tell.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from slimdiff.runtime import BundleError, Text2ImagePipeline
from slimdiff.runtime.backends.ort import OrtBackend

from slimdiff.errors import out_of_memory
from tests.unit.bundle_tampering import replace_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RUN = {"steps": 2, "size": (64, 64), "seed": 0}
TE, UNET, VAE = "text_encoder", "unet", "vae_decoder"
OUTPUT = {TE: "last_hidden_state", UNET: "out_sample", VAE: "sample"}


@pytest.fixture(scope="module")
def bundle(shared_bundle) -> Path:
    return shared_bundle("sd15", optimize=False).out  # read only: tests edit copies


@pytest.fixture
def copy(bundle, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


def _slice(axis: int, end: int):
    def nodes(x: str, y: str):
        consts = {"s": [0], "e": [end], "a": [axis]}
        inits = [numpy_helper.from_array(np.array(v), f"{k}_{y}") for k, v in consts.items()]
        return [helper.make_node("Slice", [x, f"s_{y}", f"e_{y}", f"a_{y}"], [y])], inits, None

    return nodes


def _cast(to: int):
    def nodes(x: str, y: str):
        return [helper.make_node("Cast", [x], [y], to=to)], [], to

    return nodes


def _edit_output(bundle: Path, component: str, make_nodes) -> None:
    """Recompute `component`'s output through `make_nodes(old, new)`, as a crafted bundle
    with consistent hashes."""
    rel = f"{component}/model.onnx"
    model = onnx.load(str(bundle / rel))
    name = OUTPUT[component]
    for node in model.graph.node:
        node.output[:] = [f"{o}_orig" if o == name else o for o in node.output]
    nodes, inits, new_type = make_nodes(f"{name}_orig", name)
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(inits)
    out = next(o for o in model.graph.output if o.name == name)
    if new_type is not None:
        out.type.tensor_type.elem_type = new_type
    out.type.tensor_type.ClearField("shape")
    replace_file(rel, model.SerializeToString(), rehash=True)(bundle)


# (id, component, edit, what the one line says)
AT_LOAD = [
    ("text-width", TE, _slice(2, 16), r"returns last_hidden_state of shape \[\?, \?, 16\], "
     r"but the manifest says text_encoder returns \[B, S, 32\]"),
    ("unet-channels", UNET, _slice(1, 3), r"returns out_sample of shape \[\?, 3, \?, \?\], "
     r"but the manifest says unet returns \[B, 4, H, W\]"),
    ("vae-one-channel", VAE, _slice(1, 1), r"returns sample of shape \[\?, 1, \?, \?\], but "
     r"the manifest says vae_decoder returns \[B, 3, 8h, 8w\]"),
    ("vae-int64", VAE, _cast(TensorProto.INT64), r"returns sample as int64, but the manifest "
     r"says vae_decoder returns it as float32"),
    ("vae-bool", VAE, _cast(TensorProto.BOOL), r"returns sample as bool, but"),
    ("vae-string", VAE, _cast(TensorProto.STRING), r"returns sample as tensor\(string\), but"),
    ("unet-fp16", UNET, _cast(TensorProto.FLOAT16), r"returns out_sample as float16, but the "
     r"manifest says unet returns it as float32"),
    ("text-float64", TE, _cast(TensorProto.DOUBLE), r"returns last_hidden_state as float64"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("component", "edit", "fragment"), [c[1:] for c in AT_LOAD], ids=[c[0] for c in AT_LOAD]
)
def test_a_declared_output_the_manifest_contradicts_is_refused_at_load(
    copy, component, edit, fragment
):
    _edit_output(copy, component, edit)
    with pytest.raises(BundleError, match=fragment) as caught:
        Text2ImagePipeline.from_bundle(copy)
    message = str(caught.value)
    assert message.startswith(f"{copy}: {component}/model.onnx ")
    assert message.endswith("export the bundle again with this slimdiff (`slimdiff export`)")
    assert "\n" not in message


# Sizes the graph leaves dynamic: it loads, and its first run is refused.
AT_RUN = [
    ("text-length", TE, _slice(1, 10), r"returned last_hidden_state of shape \[2, 10, 32\] "
     r"\(float32\) for inputs of shapes input_ids \[2, 77\], but the manifest says "
     r"text_encoder returns \[2, 77, 32\] \(float32\)"),
    ("unet-height", UNET, _slice(2, 4), r"returned out_sample of shape \[2, 4, 4, 8\] .*"
     r"sample \[2, 4, 8, 8\].* but the manifest says unet returns \[2, 4, 8, 8\]"),
    # 8x8 latents, scale factor 8: a 64x64 image, not 17 rows of it
    ("vae-height", VAE, _slice(2, 17), r"returned sample of shape \[1, 3, 17, 64\] \(float32\) "
     r"for inputs of shapes latent_sample \[1, 4, 8, 8\], but the manifest says vae_decoder "
     r"returns \[1, 3, 64, 64\]"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("component", "edit", "fragment"), [c[1:] for c in AT_RUN], ids=[c[0] for c in AT_RUN]
)
def test_an_output_of_another_size_is_refused_at_its_first_run(copy, component, edit, fragment):
    _edit_output(copy, component, edit)
    pipe = Text2ImagePipeline.from_bundle(copy)  # nothing the graph declares contradicts it
    with pytest.raises(BundleError, match=fragment) as caught:
        pipe("a red circle", **RUN)
    assert str(caught.value).startswith(f"{copy}: {component}/model.onnx returned ")
    assert "\n" not in str(caught.value) and caught.value.exit_code == 2


def _fails_in_a_run(x: str, y: str):
    """y = x through a Reshape to rows of 5 and back: the same declared shape, but the
    UNet's prediction (2 x 4 x 8 x 8 values at 64x64) has no rows of 5, so onnxruntime
    fails inside the run, where no load check can see it."""
    rows = numpy_helper.from_array(np.array([-1, 5]), f"rows_{y}")
    nodes = [
        helper.make_node("Shape", [x], [f"shape_{y}"]),
        helper.make_node("Reshape", [x, f"rows_{y}"], [f"flat_{y}"]),
        helper.make_node("Reshape", [f"flat_{y}", f"shape_{y}"], [y]),
    ]
    return nodes, [rows], None


def test_onnxruntime_failing_inside_a_run_names_the_component(copy):
    _edit_output(copy, UNET, _fails_in_a_run)
    pipe = Text2ImagePipeline.from_bundle(copy)
    with pytest.raises(BundleError) as caught:
        pipe("a red circle", **RUN)
    message = str(caught.value)
    assert message.startswith(
        f"{copy}/unet/model.onnx: onnxruntime failed running the unet graph "
        "(Fail: [ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running "
        "Reshape node."
    )
    assert re.search(r"cannot be reshaped .* Input shape:\{2,4,8,8\}", message)
    assert message.endswith(
        "the bundle's unet graph and its manifest disagree; export the bundle again with this "
        "slimdiff (`slimdiff export`)"
    )
    assert "\n" not in message and caught.value.exit_code == 1  # found running, not checked


def test_the_cli_says_it_in_one_line(copy, tmp_path):
    _edit_output(copy, UNET, _fails_in_a_run)
    out = tmp_path / "a.png"
    args = ["run", str(copy), "--prompt", "a red circle", "--steps", "2", "--size", "64x64"]
    child = subprocess.run(
        [sys.executable, "-m", "slimdiff", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 1, child.stderr
    lines = child.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {copy}/unet/model.onnx: ")
    assert not out.exists()


def test_verify_load_refuses_what_a_run_would(copy):
    _edit_output(copy, VAE, _cast(TensorProto.INT64))
    child = subprocess.run(
        [sys.executable, "-m", "slimdiff", "verify", str(copy), "--load"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 2 and child.stdout == ""
    assert child.stderr.splitlines() == [
        f"error: {copy}: vae_decoder/model.onnx returns sample as int64, but the manifest says "
        "vae_decoder returns it as float32; export the bundle again with this slimdiff "
        "(`slimdiff export`)"
    ]


def test_running_out_of_memory_and_bugs_are_not_called_a_broken_bundle(bundle, monkeypatch):
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    session = OrtBackend("ort-cpu", threads=1).load(bundle / VAE / "model.onnx")
    z = np.zeros((1, 4, 8, 8), np.float32)

    def arena_full(*args, **kwargs):
        raise Fail("bfc_arena.cc:360 Failed to allocate memory for requested buffer of size 1")

    monkeypatch.setattr(session._session, "run", arena_full)
    with pytest.raises(Fail) as caught:
        session.run({"latent_sample": z})
    assert out_of_memory(caught.value, "run") is not None  # the CLI's memory line, exit 1

    def bug(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(session._session, "run", bug)
    with pytest.raises(KeyError):  # keeps its traceback
        session.run({"latent_sample": z})


def test_an_untouched_bundle_still_runs_through_the_checks(bundle):
    pipe = Text2ImagePipeline.from_bundle(bundle)
    assert pipe.vae_decoder.output_dtypes == {"sample": "float32"}  # the backend's, reached
    image = pipe("a red circle", **RUN).image
    assert image.shape == (64, 64, 3)
