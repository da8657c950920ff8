"""Graphs over the threshold keep their weights in model.onnx.data, hashed and loadable."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from slimdiff.export import export_bundle
from slimdiff.export.components import plan_components
from slimdiff.export.dummy_inputs import Sizes
from slimdiff.runtime.manifest import MANIFEST_NAME, read_manifest

from slimdiff.models import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    model = load_model("tiny:flux")
    out = tmp_path_factory.mktemp("ext") / "bundle"
    # 1 KiB forces every graph over the threshold (the default is protobuf's 2 GiB).
    manifest = export_bundle(model, out, optimize=False, external_data_threshold=1024)
    return model, out, manifest


def test_every_graph_has_hashed_external_data(bundle):
    _, out, manifest = bundle
    for name, entry in manifest.components.items():
        data = f"{name}/model.onnx.data"
        assert entry.extra["external_data"] is True
        assert (out / data).stat().st_size > (out / entry.path).stat().st_size
        assert data in manifest.files
        locations = {
            kv.value
            for t in onnx.load(str(out / entry.path), load_external_data=False).graph.initializer
            for kv in t.external_data
            if kv.key == "location"
        }
        assert locations == {"model.onnx.data"}  # one file, relative: the bundle can move
    read_manifest(out)  # the runtime's reader checks the data files' hashes too


def test_bundle_is_readable_like_a_plain_copy(bundle):
    # mkdtemp (0700) and onnx's external data writer (0600) create private files; a bundle
    # is deployed and read by other users (a service running the runtime).
    _, out, manifest = bundle
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask
    for rel in [*manifest.files, MANIFEST_NAME]:
        assert (out / rel).stat().st_mode & 0o777 == 0o666 & ~mask, rel


def test_external_data_graph_loads_and_runs_in_ort(bundle):
    model, out, manifest = bundle
    entry = manifest.components["transformer"]
    component = next(c for c in plan_components(model) if c.name == "transformer")
    feeds = component.make_inputs(
        Sizes(batch=1, height=8, width=8, text_len=5, full_text=True, seed=7)
    )
    session = ort.InferenceSession(str(out / entry.path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["out_sample"], {k: v.numpy() for k, v in feeds.items()})
    with torch.inference_mode():
        expected = model.denoiser(**feeds).sample.numpy()
    assert got.shape == expected.shape == (1, 16, 64)
    assert np.abs(got - expected).max() / np.abs(expected).max() <= 1e-4


def test_small_graphs_stay_in_one_file_by_default(tmp_path):
    manifest = export_bundle(load_model("tiny:sd3"), tmp_path / "b", optimize=False, check=False)
    assert not any(name.endswith(".data") for name in manifest.files)
    assert all(e.extra["external_data"] is False for e in manifest.components.values())
    assert all(e.parity == {} for e in manifest.components.values())  # check=False
