"""torch -> ONNX for one component, and saving graphs with or without external data.

The TorchScript exporter (`dynamo=False`) is used, as TensorRT demoDiffusion and ORT's
stable-diffusion tooling do: with `dynamic_axes` it gives graphs whose batch, latent and
token axes are symbolic, and its attention patterns are the ones ORT's fusions match.

Protobuf cannot serialise a ModelProto over 2 GiB, so big graphs keep their weights in one
`model.onnx.data` file beside `model.onnx`, and checks on them go through the path (the
in-memory checker and shape inference fail past 2 GiB).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch
from slimdiff.export.components import Component, model_device
from slimdiff.export.dummy_inputs import TRACE

__all__ = [
    "OPSET",
    "PROTOBUF_LIMIT",
    "export_component",
    "graph_io",
    "load_graph",
    "proto_bytes",
    "save_model",
    "tensor_bytes",
]

log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2 * 1024**3  # bytes a ModelProto may hold
OPSET = 17  # LayerNormalization is native from 17; every ORT >= 1.14 and TensorRT >= 8.6 run it
_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
}


def export_component(component: Component, path: Path, *, params: bool = True) -> None:
    """Trace `component` on its TRACE inputs into `path` (a work file, not the bundle's).

    `path` should sit in a folder of its own: past 2 GiB torch writes one external file per
    weight next to it. The caller loads it, transforms it and saves it in the bundle layout.

    `params=False`: the graph without weights, each parameter and buffer a graph input
    named by its state-dict key and nothing folded into it (export/streamed.py fills them).

    Example:
        >>> export_component(plan, Path("work/unet/raw.onnx"))  # doctest: +SKIP
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    feeds = component.make_inputs(TRACE)
    device = model_device(component.model)  # a model compressed on a GPU traces there
    args = tuple(feeds[name].to(device) for name in component.input_names)
    log.info("exporting %s to ONNX (opset %d)", component.name, OPSET)
    weights = (
        frozenset() if params else frozenset(n for n, _ in component.module.named_parameters())
    )
    with (
        torch.inference_mode(),
        _traceable_unflatten(),
        _shapes_without_weight_values(weights),
        warnings.catch_warnings(),
    ):
        # Tracer warnings (Python bools/ints taken from tensors in diffusers' code) and the
        # exporter's "negative indices in aten::index" note (CLIP's EOS gather, argmax-based,
        # never negative) are expected; what catches a trace gone wrong is the parity run on
        # other shapes, which follows every export.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        outputs = component.module(*args)
        torch.onnx.export(
            component.module,
            args,
            str(path),
            input_names=list(component.input_names),
            output_names=list(component.output_names),
            dynamic_axes=component.dynamic_axes,
            opset_version=OPSET,
            # Folding would compute transposed weights under generated names: with the
            # weights left out, every parameter must stay an input under its own name.
            do_constant_folding=params,
            export_params=params,
            # No merging of equal initializers: it would drop weight inputs' names.
            keep_initializers_as_inputs=not params,
            dynamo=False,
        )
    # The graph alone: past 2 GiB the weights stay in the files torch wrote beside it, so
    # naming the output dims does not hold a second copy of them next to the torch model.
    model = onnx.load(str(path), load_external_data=False)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    _name_output_dims(model, [o.shape for o in outputs], component.dynamic_axes)
    save_model(model, path, PROTOBUF_LIMIT)


@contextlib.contextmanager
def _traceable_unflatten() -> Iterator[None]:
    """Trace Tensor.unflatten as a reshape over the input's own (traced) sizes.

    The TorchScript exporter's shape inference marks the output of its `unflatten` symbolic
    as fully static, so any later `x.shape` is folded into a constant: FLUX's attention
    (`to_q(x).unflatten(-1, (heads, -1))` then a rotary `reshape(*x.shape[:-1], -1, 2)`)
    came out with batch and token count baked in. A reshape built from traced sizes keeps
    them symbolic. Patched only for the duration of one export.
    """
    original = torch.Tensor.unflatten

    def unflatten(self: torch.Tensor, dim, sizes):
        if not isinstance(dim, int):  # named dims: leave to torch
            return original(self, dim, sizes)
        dim %= self.dim()
        return self.reshape(*self.shape[:dim], *sizes, *self.shape[dim + 1 :])

    torch.Tensor.unflatten = unflatten
    try:
        yield
    finally:
        torch.Tensor.unflatten = original


@contextlib.contextmanager
def _shapes_without_weight_values(weights: frozenset[str]) -> Iterator[None]:
    """Keep the weights' values out of the exporter's ONNX shape inference.

    The TorchScript exporter hands every parameter's value to its shape inference, which
    serialises it into a protobuf for each node that reads it: with the weights left out
    of the graph (export/streamed.py), tracing T5-XXL took 3.5 minutes of copying values
    no shape depends on. Shapes and types of the weight inputs come from the trace; only
    the other constants (buffers) are passed on. A private torch function, patched for
    one export; where a torch release lacks it, the export is only slower.
    """
    original = getattr(torch._C, "_jit_pass_onnx_graph_shape_type_inference", None)
    if not weights or original is None:
        yield
        return

    def infer(graph, params_dict, opset):
        kept = {k: v for k, v in params_dict.items() if k not in weights}
        return original(graph, kept, opset)

    torch._C._jit_pass_onnx_graph_shape_type_inference = infer
    try:
        yield
    finally:
        torch._C._jit_pass_onnx_graph_shape_type_inference = original


def _name_output_dims(model: onnx.ModelProto, shapes: list, dynamic_axes: dict) -> None:
    # The exporter leaves some output dims as generated names ("Reshapeout_sample_dim_1")
    # where a reshape hides a fixed width; write the traced size there so the manifest
    # says 16, and the axis name wherever the dim is dynamic.
    for vi, shape in zip(model.graph.output, shapes, strict=True):
        axes = dynamic_axes.get(vi.name, {})
        dims = vi.type.tensor_type.shape.dim
        for i, size in enumerate(shape):
            if i < len(dims):
                if i in axes:
                    dims[i].dim_param = axes[i]
                else:
                    dims[i].dim_value = int(size)


def proto_bytes(model: onnx.ModelProto) -> int:
    """Serialised size of `model`: its weight bytes, exact when they fit in protobuf."""
    weights = tensor_bytes(model)
    return weights if weights >= PROTOBUF_LIMIT else model.ByteSize()


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of weight data in `model` (initializers and Constant nodes), held in memory.

    This is what decides the 2 GiB protobuf limit; ModelProto.ByteSize() itself is not
    reliable past it (it wraps on some platforms, demoDiffusion notes).
    """
    graphs = [model.graph]
    total = 0
    while graphs:
        graph = graphs.pop()
        total += sum(_tensor_nbytes(t) for t in graph.initializer)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    total += _tensor_nbytes(attr.t)
                elif attr.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    return total


def _tensor_nbytes(t: onnx.TensorProto) -> int:
    if t.raw_data:
        return len(t.raw_data)
    n = 1
    for d in t.dims:
        n *= d
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return n * itemsize


def save_model(model: onnx.ModelProto, path: Path, threshold: int) -> bool:
    """Save `model` to `path`; weights go to `<path>.data` when they exceed `threshold` bytes.

    Returns whether external data was written. The data file is named after the graph so
    the pair is self-describing, and is relative, so the bundle can move.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    external = proto_bytes(model) > threshold
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
        )
    else:
        onnx.save_model(model, str(path))
    check_saved(path)
    return external


# Contrib ops that ORT's fusions put in the default ONNX domain, where ORT registers them
# but onnx's checker knows no such op (SD3.5's q/k RMSNorm fuses to the first).
_ORT_DEFAULT_DOMAIN_OPS = frozenset({"SimplifiedLayerNormalization"})


def check_saved(path: Path) -> None:
    """onnx's checker on the saved graph at `path`: path-based, so it works past 2 GiB and
    checks that the external data resolves on disk. ORT's default-domain contrib ops are
    checked as the contrib ops they are (a copy of the graph, without its weights, with
    them in ORT's own domain, beside the original so the data still resolves)."""
    try:
        onnx.checker.check_model(str(path))
        return
    except onnx.checker.ValidationError:
        model = onnx.load(str(path), load_external_data=False)
        nodes = [n for n in model.graph.node if n.op_type in _ORT_DEFAULT_DOMAIN_OPS]
        if not nodes or any(n.domain not in ("", "ai.onnx") for n in nodes):
            raise
    for node in nodes:
        node.domain = "com.microsoft"
    if all(o.domain != "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    copy = path.with_name(f".{path.name}.check")
    try:
        onnx.save_model(model, str(copy))
        onnx.checker.check_model(str(copy))
    finally:
        copy.unlink(missing_ok=True)


def load_graph(path: Path) -> onnx.ModelProto:
    """The graph at `path` with its external data, if any, loaded."""
    return onnx.load(str(path))


def graph_io(path: Path) -> tuple[list[dict], list[dict]]:
    """The graph's inputs and outputs as manifest entries: {"name", "dtype", "shape"}.

    Dynamic dims are written as their axis names (from `dynamic_axes`), fixed ones as ints.
    """
    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}

    def entry(vi: onnx.ValueInfoProto) -> dict:
        tt = vi.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in tt.shape.dim]
        return {
            "name": vi.name,
            "dtype": _DTYPES.get(tt.elem_type, str(tt.elem_type)),
            "shape": shape,
        }

    inputs = [entry(vi) for vi in graph.input if vi.name not in inits]
    return inputs, [entry(vi) for vi in graph.output]
