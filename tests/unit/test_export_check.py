"""onnx's checker on saved graphs (export/onnx.py check_saved): ORT's contrib ops that its
fusions put in the default domain pass as what they are, with weights inside or beside the
graph; anything else the checker refuses is still refused."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from slimdiff.export.onnx import save_model


def _graph(op: str) -> onnx.ModelProto:
    """y = op(x, scale) over the last axis, 2 KiB of weights (external data keeps tensors
    past 1 KiB): ORT's SimplifiedLayerNormalization is RMSNorm."""
    scale = numpy_helper.from_array(np.linspace(0.5, 1.5, 512, dtype=np.float32), "scale")
    node = helper.make_node(op, ["x", "scale"], ["y"], axis=-1, epsilon=1e-6)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 512])],
        [scale],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("threshold", [1 << 30, 16], ids=["inline", "external-data"])
def test_ort_default_domain_ops_pass_and_run(tmp_path, threshold):
    path = tmp_path / "model.onnx"
    external = save_model(_graph("SimplifiedLayerNormalization"), path, threshold)
    assert external is (threshold == 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"] + (
        ["model.onnx.data"] if external else []
    )  # the checked copy is gone
    saved = onnx.load(str(path))
    assert saved.graph.node[0].domain == ""  # where ORT looks for it
    x = np.random.default_rng(0).standard_normal((2, 512)).astype(np.float32)
    (y,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    rms = np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(y, x / rms * np.linspace(0.5, 1.5, 512), rtol=1e-5, atol=1e-6)


def test_other_unknown_ops_are_still_refused(tmp_path):
    with pytest.raises(onnx.checker.ValidationError, match="No Op registered for Bogus"):
        save_model(_graph("Bogus"), tmp_path / "model.onnx", 1 << 30)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_missing_external_data_is_still_refused(tmp_path):
    path = tmp_path / "model.onnx"
    save_model(_graph("SimplifiedLayerNormalization"), path, 16)
    (tmp_path / "model.onnx.data").unlink()
    from slimdiff.export.onnx import check_saved

    with pytest.raises(onnx.checker.ValidationError, match=r"model\.onnx\.data"):
        check_saved(path)
