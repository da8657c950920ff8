"""Quantized graphs: int4 weights packed on disk, and proof that ORT runs them in integers.

The layers of `quant.quest` trace as QuantizeLinear/DequantizeLinear around MatMul and
Conv with int8 weight constants (slimdiff/lowbit.py says why there is no import between
the two). Here:

- `pack_int4_weights`: each int8 weight constant whose digest a layer declares as 4-bit is
  stored two to a byte (uint8), unpacked by a model-local ONNX function (a 256-entry table
  Gather, Reshape, Slice: ops every ONNX runtime has at opset 17). onnxruntime inlines and
  folds it when the session loads, so the graph it runs has the int8 constant again and
  fuses it into its integer kernels: 4 bits a weight on disk, the W8A8 kernels at run
  time. (onnxruntime's MatMulNBits would pack linear weights too, but it quantizes its
  activations itself, blockwise and dynamically, which would bypass the activation step
  sizes QuEST learns, and it needs block-wise weight scales; convolutions have no 4-bit
  kernel at all.)
- `integer_kernels`: the node types of the graph ORT's CPU EP actually runs (the
  session's optimized graph), counted: QLinearConv, QLinearMatMul and
  MatMulIntegerToFloat are integer kernels; what stayed Conv/MatMul runs in float.
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from slimdiff.lowbit import INT4_DIGEST_ATTR, int4_digest, pack_int4

__all__ = [
    "INTEGER_OPS",
    "UNPACK_FUNCTION",
    "compact_names",
    "int4_digests",
    "integer_kernels",
    "is_quantized",
    "pack_int4_weights",
]

log = logging.getLogger(__name__)

# Ops of ORT's optimized CPU graph that compute in integers.
INTEGER_OPS = (
    "QLinearConv",
    "QLinearMatMul",
    "MatMulIntegerToFloat",
    "MatMulInteger",
    "ConvInteger",
    "DynamicQuantizeMatMul",
    "MatMulNBits",
    "QAttention",
)
_COUNTED = (
    *INTEGER_OPS,
    "QuantizeLinear",
    "DequantizeLinear",
    "Conv",
    "MatMul",
    "Gemm",
    "FusedConv",
    "FusedMatMul",
    "MultiHeadAttention",
    "Attention",
)


def int4_digests(model) -> set[str]:
    """Digests of the int8 constants that hold 4-bit weights, as the layers declare them."""
    found = set()
    for m in model.modules():
        digest = getattr(m, INT4_DIGEST_ATTR, None)
        if isinstance(digest, str):
            found.add(digest)
    return found


def is_quantized(graph: onnx.ModelProto) -> bool:
    return any(n.op_type == "QuantizeLinear" for n in graph.graph.node)


def pack_int4_weights(model: onnx.ModelProto, digests: set[str]) -> int:
    """Replace the int8 constants named by `digests` with packed uint8 ones, each unpacked
    by one call of the model-local function UNPACK_FUNCTION; returns how many were packed.

    One function, not a subgraph per weight: onnxruntime inlines it at load and folds the
    result, and the file holds one node (and a shared shape) a weight instead of twelve
    (measured on toy:shapes W4A8: 3.6k nodes, 0.2 MB of a 2.8 MB graph)."""
    if not digests:
        return 0
    graph = model.graph
    added: dict[str, onnx.TensorProto] = {}
    new_nodes: list[onnx.NodeProto] = []
    keep_inits = []
    for init in graph.initializer:
        if init.data_type == TensorProto.INT8 and _digest(init) in digests:
            new_nodes.append(_unpack_call(added, init.name, numpy_helper.to_array(init)))
        else:
            keep_inits.append(init)
    kept_nodes = []
    for node in graph.node:
        value = _constant_value(node)
        if value is not None and value.dtype == np.int8 and int4_digest(value) in digests:
            new_nodes.append(_unpack_call(added, node.output[0], value))
        else:
            kept_nodes.append(node)
    if not new_nodes:
        return 0
    del graph.initializer[:]
    graph.initializer.extend(keep_inits + list(added.values()))
    del graph.node[:]
    graph.node.extend(new_nodes + kept_nodes)  # producers first: the graph stays sorted
    model.functions.append(_unpack_function())
    if not any(o.domain == _DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(_DOMAIN, 1))
    log.info("packed %d int4 weight constants", len(new_nodes))
    return len(new_nodes)


_DOMAIN = "slimdiff"
UNPACK_FUNCTION = "Int4Unpack"


def _digest(init: onnx.TensorProto) -> str:
    return int4_digest(numpy_helper.to_array(init))


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
    return None


def _unpack_call(added: dict, name: str, value: np.ndarray) -> onnx.NodeProto:
    """The packed constant of int8 `name` (its own) and its shape (shared by value)."""
    packed = f"{name}_int4"
    added[packed] = numpy_helper.from_array(pack_int4(value), packed)
    shape = "slimdiff_int4_shape_" + "x".join(str(d) for d in value.shape)
    if shape not in added:
        added[shape] = numpy_helper.from_array(np.array(value.shape, np.int64), shape)
    return helper.make_node(UNPACK_FUNCTION, [packed, shape], [name], domain=_DOMAIN)


def _unpack_function() -> onnx.FunctionProto:
    """int8 out[shape] from two 4-bit values a byte (low nibble first, stored + 8): each byte
    indexes a 256 x 2 table of its two signed values (Gather), then the pairs are laid flat,
    cut to the element count and shaped. Ops every ONNX runtime has at opset 17.

    A table, not arithmetic: onnxruntime folds the function at load and keeps every
    intermediate tensor of the fold until it ends, so what the unpacking computes on the way
    is memory at load. Cast/Div/Mul/Sub/Concat in int32 held about 66 bytes a packed byte
    (the full-size SD1.5 UNet at W4 was killed at 23 GB loading); the table about 12."""
    table = np.array([[(b & 15) - 8, (b >> 4) - 8] for b in range(256)], np.int8)

    def const(name, value):
        return helper.make_node(
            "Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name)
        )

    nodes = [
        const("table", table),
        const("flat", np.array([-1], np.int64)),
        const("start", np.array([0], np.int64)),
        helper.make_node("Cast", ["packed"], ["index"], to=TensorProto.INT32),
        helper.make_node("Gather", ["table", "index"], ["pairs"], axis=0),
        helper.make_node("Reshape", ["pairs", "flat"], ["both"]),
        helper.make_node("ReduceProd", ["shape"], ["count"], keepdims=1),
        helper.make_node("Slice", ["both", "start", "count"], ["cut"]),
        helper.make_node("Reshape", ["cut", "shape"], ["out"]),
    ]
    return helper.make_function(
        _DOMAIN,
        UNPACK_FUNCTION,
        ["packed", "shape"],
        ["out"],
        nodes,
        [helper.make_opsetid("", 17)],
    )


def integer_kernels(path: Path) -> dict[str, int]:
    """Counts of the node types ORT's CPU EP runs for the graph at `path` (its optimized
    graph, written by a session with every optimization on), for the types that tell
    integer from float compute."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="slimdiff-ortopt-") as tmp:
        out = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(out)
        options.log_severity_level = 3  # the "hardware specific optimizations" note
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", "optimized.onnx.data"
        )
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
        )
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(str(out), load_external_data=False).graph
        counts = Counter(n.op_type for n in graph.node)
    return {op: counts[op] for op in _COUNTED if counts[op]}


def compact_names(model: onnx.ModelProto) -> None:
    """Short value names and no node names, graph inputs and outputs kept.

    A quantized graph's weights are small enough that the traced names ("/denoiser/
    up_blocks.0/resnets.0/conv1/Constant_2_output_0", three a node) become a large part of
    the file: 3.7 MB of a 6.9 MB toy:shapes W4 UNet. Left alone when a node holds a
    subgraph (its inner names would need the same renaming)."""
    graph = model.graph
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for n in graph.node
        for a in n.attribute
    ):
        return
    keep = {v.name for v in (*graph.input, *graph.output)}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in names:
            names[name] = f"v{len(names):x}"
        return names[name]

    for init in graph.initializer:
        init.name = short(init.name)
    for node in graph.node:
        node.name = ""
        node.input[:] = [short(i) for i in node.input]
        node.output[:] = [short(o) for o in node.output]
    for vi in graph.value_info:
        vi.name = short(vi.name)
