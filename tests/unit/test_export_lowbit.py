"""int4 weight packing in ONNX graphs: a packed constant unpacks (in onnxruntime) to the
int8 values it replaced, one function call a weight, shapes shared by value."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from slimdiff.export.lowbit import UNPACK_FUNCTION, pack_int4_weights

from slimdiff.lowbit import int4_digest


def _graph(weights: list[np.ndarray]) -> onnx.ModelProto:
    """y_i = DequantizeLinear(w_i) for int8 weights: the weights come out as floats."""
    inits, nodes, outputs = [], [], []
    for i, w in enumerate(weights):
        inits += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array(np.float32(0.5), f"s{i}"),
        ]
        nodes.append(helper.make_node("DequantizeLinear", [f"w{i}", f"s{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, list(w.shape)))
    graph = helper.make_graph(nodes, "g", [], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_packed_weights_unpack_to_the_same_values_in_onnxruntime():
    rng = np.random.default_rng(0)
    # an odd element count (3 x 5: the last byte half empty), a repeated shape, an int8
    # constant that is not 4-bit (left alone)
    four = [rng.integers(-7, 8, size=s).astype(np.int8) for s in ((3, 5), (4, 2, 3), (4, 2, 3))]
    eight = rng.integers(-127, 128, size=(6,)).astype(np.int8)
    model = _graph([*four, eight])
    packed = pack_int4_weights(model, {int4_digest(w) for w in four})
    assert packed == 3
    onnx.checker.check_model(model, full_check=True)
    calls = [n for n in model.graph.node if n.op_type == UNPACK_FUNCTION]
    assert len(calls) == 3 and len(model.functions) == 1
    shapes = [i for i in model.graph.initializer if i.name.startswith("slimdiff_int4_shape")]
    assert len(shapes) == 2  # (4, 2, 3) once
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert "w3" in inits and not {"w0", "w1", "w2"} & set(inits)
    for i, w in enumerate(four):
        stored = inits[f"w{i}_int4"]
        assert stored.dtype == np.uint8 and stored.size == (w.size + 1) // 2
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {})
    for w, y in zip([*four, eight], got, strict=True):
        assert np.array_equal(y, w.astype(np.float32) * 0.5)


def test_nothing_to_pack_leaves_the_graph_alone():
    model = _graph([np.arange(4, dtype=np.int8)])
    copy = model.SerializeToString()
    assert pack_int4_weights(model, set()) == 0
    assert pack_int4_weights(model, {"not-a-digest"}) == 0
    assert model.SerializeToString() == copy
