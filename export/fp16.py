"""fp16 conversion of an exported graph, with the parts fp16 cannot hold kept in fp32.

A graph is traced in fp32 and converted afterwards (onnxruntime.transformers' float16
converter), so the places where PyTorch's fp16 models compute in fp32 on purpose would
turn fp16 with the rest. ORT's CPU EP hides that (it casts around ops without fp16
kernels, and the export's parity check runs there); the CUDA EP and TensorRT's strongly
typed engines (runtime/trt_build.py, build.sh) compute what the graph says. Kept in fp32:

- T5's RMSNorm, its feed-forward output projection `wo`, the residual adds between them
  and the attention softmax: transformers computes T5LayerNorm's variance in fp32, keeps
  `wo` in fp32 (T5's `_keep_in_fp32_modules`) and so the residual stream after it, and
  takes the softmax in fp32. Converted whole, a T5-XXL-sized activation (hundreds) squares
  past fp16's 65504 in the first norm: measured on tiny:flux's T5 with its embeddings
  scaled x400 and run with native fp16 arithmetic (onnx's reference evaluator), 59% of
  the first Pow's output was inf and the encoder's output all zeros, while the parity
  check on ORT-CPU passed (tests/unit/test_fp16_kept_fp32.py).
- The sinusoidal embeddings of the timestep, FLUX's guidance, SDXL's size ids and FLUX's
  position ids (TIME_INPUTS), from the graph input to the first MatMul, with the constants
  they read: diffusers computes them in fp32 in fp16 pipelines. In fp16, t = 801.3 reads
  801.5 and the phase of the highest frequency is off by 0.2 rad (FLUX's guidance x 1000:
  1 rad).

`_join_float_casts` then joins the converter's Cast(fp32 -> fp16) at a kept input with the
Cast back to fp32 before its first fp32 node (a lossless Cast fp32 -> fp32), so the
timestep reaches its embedding unrounded.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import onnx
from slimdiff.export.onnx import PROTOBUF_LIMIT, tensor_bytes
from slimdiff.export.optimize import has_contrib_ops, quiet

__all__ = ["convert_fp16", "fp32_nodes"]

log = logging.getLogger(__name__)

# Node names from torch.onnx's export of transformers' T5EncoderModel (module paths)
_T5_NORM = r"/(final_)?layer_norm/"  # T5LayerNorm: the variance and the scaling
_T5_FP32 = re.compile(
    _T5_NORM
    + r"|/DenseReluDense/wo/"  # the FFN's output projection (_keep_in_fp32_modules)
    + r"|/layer\.\d+/Add(_\d+)?$"  # the residual adds, which take wo's fp32 output
    + r"|/SelfAttention/Softmax"  # softmax(scores.float())
)

# Denoiser inputs embedded as sinusoids of their values: timesteps reach 1000, FLUX's
# guidance is multiplied by 1000, SDXL's size ids are pixel counts, FLUX's position ids
# reach 128 (its rotary embedding: diffusers computes the phases in float64 and applies
# them to q and k in float32, x.float() * cos + ...)
TIME_INPUTS = ("timestep", "guidance", "time_ids", "img_ids", "txt_ids")
# Where an embedding's fp32 part ends: its first linear layer takes sines and cosines
_STOP = {"MatMul", "Gemm", "Conv", "ConvTranspose", "MatMulNBits", "FusedMatMul"}
# Ops whose outputs are not float values (shapes, masks): nothing to keep past them
_NOT_FLOAT = {"Shape", "Size", "NonZero", "ArgMax", "ArgMin", "Equal", "Greater", "Less"}


def fp32_nodes(graph: onnx.ModelProto, t5: bool = False) -> list[str]:
    """Names of the nodes of `graph` that its fp16 form computes in fp32 (module docstring):
    with `t5`, T5's norms, `wo`, residual adds and softmax; in every graph, what the
    TIME_INPUTS feed before their first linear layer. Empty when neither is found."""
    names = []
    if t5:
        names = [n.name for n in graph.graph.node if _T5_FP32.search(n.name)]
        if not any(re.search(_T5_NORM, n) for n in names):
            log.warning(
                "fp16: no T5 layer norm found by its node names in this graph; it converts "
                "whole, and may overflow to inf on a GPU (export it in fp32 if it does)"
            )
    inputs = {i.name for i in graph.graph.input} & set(TIME_INPUTS)
    names += _fed_by(graph.graph.node, inputs)
    return names + _constants_for(graph.graph, set(names))


def _constants_for(graph: onnx.GraphProto, kept: set[str]) -> list[str]:
    """Nodes computing constants (from no graph input) that kept nodes read: the embedding's
    frequencies, exp(-log(10000) * k / half), in fp32 as diffusers has them (in fp16 the
    k = 1 frequency 0.5623 reads 0.5625, 0.2 rad at t = 800)."""
    constant = {i.name for i in graph.initializer}
    for node in graph.node:
        if all(i in constant or not i for i in node.input):
            constant.update(node.output)
    needed = {i for n in graph.node if n.name in kept for i in n.input}
    names = []
    for node in reversed(graph.node):  # consumers before producers
        reads = node.name not in kept and any(o in needed for o in node.output)
        if reads and all(o in constant for o in node.output):
            names.append(node.name)
            needed.update(node.input)
    return names[::-1]


def _fed_by(nodes: Iterable[onnx.NodeProto], inputs: set[str]) -> list[str]:
    """Nodes computing from `inputs` alone up to (not including) the first _STOP op, in
    graph order (the export's order is topological)."""
    reached, names = set(inputs), []
    for node in nodes:
        if node.op_type in _STOP or not any(i in reached for i in node.input):
            continue
        names.append(node.name)
        if node.op_type not in _NOT_FLOAT:
            reached.update(node.output)
    return names


def convert_fp16(
    model: onnx.ModelProto, keep_float32: bool | list[str] = True, t5: bool = False
) -> onnx.ModelProto:
    """Weights and compute to float16 but `fp32_nodes`, graph inputs and outputs float32.

    keep_io_types=True puts Casts at the graph edges, so the runtime feeds float32 whatever
    the component's precision (the mixed-IO dtype mismatch optimum users hit with an fp32
    SDXL VAE does not arise). ORT's CPU EP runs fp16 graphs by casting around ops that lack
    fp16 kernels: fp16 is a size and GPU format here, not a CPU speed-up.

    `keep_float32`: the inputs and outputs kept float32 (True: all). A graph whose weights
    are inputs (export/streamed.py) names its real IO, and its weight inputs turn fp16,
    those of fp32 nodes too (cast back to fp32 where read: the compute stays fp32, the
    stored weights are fp16). `t5`: the graph is a T5 encoder.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    kept = fp32_nodes(model, t5)
    if kept:
        log.debug("fp16: %d nodes kept in fp32", len(kept))
    # The converter needs every tensor's type. ONNX shape inference gives them in a second
    # but knows none of ORT's contrib ops (MultiHeadAttention, ...) and fails past 2 GiB in
    # memory. ORT's OnnxModel route handles both through its symbolic shape inference, which
    # costs ~20 s on a UNet-sized graph (30x the plain route), so only when needed.
    if has_contrib_ops(model) or tensor_bytes(model) >= PROTOBUF_LIMIT:
        wrapped = OnnxModel(model)
        with quiet():
            wrapped.convert_float_to_float16(
                keep_io_types=keep_float32, use_symbolic_shape_infer=True, node_block_list=kept
            )
    else:
        converted = convert_float_to_float16(
            model, keep_io_types=keep_float32, node_block_list=kept
        )
        wrapped = OnnxModel(converted)
    # (OnnxModel's conversion above joins cascaded casts itself, integer ones too, one link
    # at a time in node order: longer chains at a kept input are left for this)
    _join_float_casts(wrapped.model)
    # the first casts of joined pairs where nothing else reads them (inputs all kept: a
    # streamed graph takes its weights as inputs, and an input a graph ignores is declared)
    wrapped.prune_graph(allow_remove_graph_inputs=False)
    wrapped.topological_sort()  # the IO casts are appended at the end of the node list
    return wrapped.model


_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def _join_float_casts(model: onnx.ModelProto) -> int:
    """Casts the converter leaves back to back (fp16 -> fp32 -> fp16; at a kept input,
    fp32 -> fp16 -> fp32) joined: the second casts what the first was given, so no
    rounding to fp16 in between. Only where the first casts to a float type: a cast to an
    integer truncates, which the pair means (ORT's remove_cascaded_cast_nodes joins those
    too). Returns the number joined."""
    made_by = {o: n for n in model.graph.node for o in n.output}

    def float_cast(name: str) -> onnx.NodeProto | None:
        node = made_by.get(name)
        if node is None or node.op_type != "Cast":
            return None
        return node if next(a.i for a in node.attribute if a.name == "to") in _FLOATS else None

    joined = 0
    for node in model.graph.node:
        if node.op_type != "Cast":
            continue
        source = node.input[0]
        while (first := float_cast(source)) is not None:  # up a chain of any length
            source = first.input[0]
        if source != node.input[0]:
            node.input[0] = source
            joined += 1
    return joined
