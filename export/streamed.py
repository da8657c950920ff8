"""Export a component larger than memory: trace it without weights, then write them into
the graph's external data one tensor at a time.

The usual route (export/__init__.py) holds the torch weights, then the traced graph, then an
onnxruntime session, each about the component's size: an fp32 FLUX transformer is 48 GB.
Here no more than one tensor is in memory:

1. Every parameter is swapped for a stand-in that costs no memory (a zero broadcast to the
   parameter's shape) and the component is traced with its weights left out
   (`export_params=False`, no constant folding, no merging of equal initializers): each
   parameter becomes a graph input named by its state-dict key.
2. For fp16, onnxruntime's converter (the usual route's) runs on that weightless graph,
   keeping the real inputs and outputs float32; the weight inputs become float16.
3. Each weight input becomes an initializer whose bytes are fetched from the component's
   weight source (slimdiff/models/weights.py), converted as the converter converts
   initializers (fp16 clamped to its range), and appended to `model.onnx.data` at an
   aligned offset. A weight read only through a Transpose (linear layers: MatMul(x, W^T))
   is stored transposed and the Transpose dropped: what constant folding does in the
   usual route.

No ORT fusions (they rewrite weights: the UNet attention fusion packs Q, K and V into one
tensor): the streamed route is for GPU targets, where TensorRT and ORT's CUDA fusions
work from the plain graph. The parity check runs where the torch module and an
onnxruntime session of the graph fit in memory together, and is recorded as skipped, with
the reason, where they do not.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import torch
from slimdiff.export.components import Component, export_mode
from slimdiff.export.fp16 import convert_fp16
from slimdiff.export.onnx import OPSET, PROTOBUF_LIMIT, export_component, graph_io, save_model
from slimdiff.export.parity import ExportError, check_parity, raise_if_failed, torch_reference
from slimdiff.runtime.manifest import ComponentEntry
from torch import nn

from slimdiff.memory import available_bytes, release_memory
from slimdiff.models.lazy import (
    aliases,
    fetch_tensor,
    is_lazy,
    make_lazy,
    materialize,
    param_bytes,
    replace_parameters,
    weight_source,
)
from slimdiff.models.weights import ModuleWeights
from slimdiff.progress import Progress

__all__ = ["TRANSPOSED", "export_streamed", "fits_in_memory", "fp16_as_ort"]

log = logging.getLogger(__name__)

TRANSPOSED = ".T"  # suffix of a weight stored transposed (read through a folded Transpose)
_INLINE = 1024  # bytes: smaller tensors stay in the graph (onnx's own external-data cut)
_ALIGN = 64  # every external tensor starts on a cache line ...
_PAGE_ALIGN = 65536  # ... and large ones on an allocation granule, so ORT can map them
_PAGE_ALIGN_FROM = 1 << 20  # bytes


def fits_in_memory(model: nn.Module, factor: float) -> bool:
    """Whether `factor` x `model`'s fp32 weight bytes fit in the memory available now."""
    available = available_bytes()
    need = param_bytes(model) * factor
    return available is None or need <= available


def _check_fits(model: nn.Module) -> bool:
    """Whether a parity check fits: the torch weights (fp32) and an onnxruntime session
    holding the graph (at most as large; fp16 graphs cast to fp32 where the CPU EP lacks
    fp16 kernels) with room for activations."""
    return fits_in_memory(model, 2.5)


def export_streamed(
    component: Component,
    root: Path,
    work: Path,
    *,
    precision: str,
    check: bool,
    threshold: int = PROTOBUF_LIMIT,
) -> ComponentEntry:
    """Export `component` to root/<name>/model.onnx with its weights streamed; its entry.

    The component's model may be lazy (parameters on the meta device, a weight source
    registered: slimdiff/models/lazy.py) or in memory; it is left as it was found.
    """
    model = component.model
    source = weight_source(model) if is_lazy(model) else None
    if source is None:
        source = ModuleWeights.of(model)
    raw = work / component.name / "raw.onnx"
    with _stand_ins(component) as keys:
        buffers = dict(component.module.named_buffers(remove_duplicate=False))
        with export_mode(component, None):
            export_component(component, raw, params=False)
    graph = onnx.load(str(raw))
    _check_names(graph, keys, component.name)
    io = [*component.input_names, *component.output_names]
    if precision == "fp16":
        graph = convert_fp16(graph, keep_float32=io, t5=component.plan.model_type == "t5")
    values: dict[str, Callable[[], torch.Tensor]] = {
        name: (lambda k=k: fetch_tensor(source, k)) for name, k in keys.items()
    }
    values.update({name: (lambda b=b: b) for name, b in buffers.items()})
    path = root / component.name / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    written = _write_weights(graph, path, values, component.name)
    external = written > threshold
    if external:
        onnx.save_model(graph, str(path))  # the structure; weights already in model.onnx.data
        onnx.checker.check_model(str(path))
    else:  # small enough for one file, as the usual route saves it
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(graph, str(path.parent))
        save_model(graph, path, threshold)
    del graph
    release_memory()
    shutil.rmtree(raw.parent, ignore_errors=True)
    inputs, outputs = graph_io(path)
    extra = {
        "opset": OPSET,
        "ort_fusions": {},
        "attention": "native",
        "external_data": external,
        "weights": "streamed",
    }
    parity: dict = {}
    if check and _check_fits(model):
        parity = _check(component, path, precision, source)
        raise_if_failed(
            parity, f"{component.name}: ONNX ({precision}, streamed weights)", "report the model"
        )
    elif check:
        gb = param_bytes(model) / 1e9
        extra["parity_skipped"] = (
            f"{gb:.1f} GB of fp32 weights and an onnxruntime session of the graph do not "
            "fit in this machine's memory together"
        )
        log.warning("%s: parity not checked: %s", component.name, extra["parity_skipped"])
    return ComponentEntry(
        path=path.relative_to(root).as_posix(),
        format="onnx",
        precision=precision,
        inputs=inputs,
        outputs=outputs,
        parity=parity,
        extra=extra,
    )


def _check(component: Component, path: Path, precision: str, source) -> dict:
    """Parity against torch with the weights materialized for the reference only."""
    model = component.model
    lazy = is_lazy(model)
    if lazy:
        materialize(model)
    try:
        with export_mode(component, None):
            reference = torch_reference(component)
    finally:
        if lazy:
            make_lazy(model, source)
            release_memory()
    return check_parity(component, path, precision, reference)


@contextlib.contextmanager
def _stand_ins(component: Component) -> Iterator[dict[str, list[str]]]:
    """Swap the model's parameters for memory-free stand-ins; yield, for each parameter of
    the traced module (the wrapper's names), the model's keys for it (aliases included).
    The original parameters (meta or real) are put back on exit."""
    model = component.model
    names = aliases(model)
    zero = {}  # one scalar per dtype: values feed a shape trace only

    def stand_in(owner: nn.Module, attr: str, param: nn.Parameter) -> torch.Tensor:
        scalar = zero.setdefault(param.dtype, torch.zeros((), dtype=param.dtype))
        return scalar.expand(param.shape)

    slots = replace_parameters(model, stand_in)
    by_new = {id(new): names[id(old)] for _, _, old, new in slots}
    try:
        yield {n: by_new[id(p)] for n, p in component.module.named_parameters()}
    finally:
        for owner, attr, old, _ in slots:
            owner._parameters[attr] = old


def _check_names(graph: onnx.ModelProto, keys: dict[str, list[str]], what: str) -> None:
    # A parameter the exporter merged into another (equal stand-ins, were its merging pass
    # on) is read through an Identity of the other's input: its weights would silently be
    # the other's.
    produced = {out for node in graph.graph.node for out in node.output}
    merged = sorted(set(keys) & produced)
    if merged:
        raise ExportError(
            f"{what}: the exporter merged weight inputs ({', '.join(merged[:3])}); "
            "report the model, and export it with the weights in memory meanwhile"
        )


def _write_weights(
    graph: onnx.ModelProto, path: Path, values: dict[str, Callable[[], torch.Tensor]], what: str
) -> int:
    """Turn the weight inputs of `graph` into initializers, their bytes appended to
    `path`.data one at a time; the total bytes written."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    inputs = {vi.name: vi for vi in graph.graph.input if vi.name in values}
    data = path.with_name(path.name + ".data")
    total = 0
    with open(data, "wb") as f, Progress(f"{what}: weights", len(inputs), unit="tensors") as bar:
        for name, vi in inputs.items():
            graph.graph.input.remove(vi)
            users = consumers.get(name, [])
            if not users:
                bar.advance()
                continue  # traced away (an unused parameter): nothing reads it
            tensor = values[name]()
            if len(users) == 1 and users[0].op_type == "Transpose":
                tensor, name = _fold_transpose(graph, users[0], tensor, name)
            array = _to_numpy(tensor, vi.type.tensor_type.elem_type)
            del tensor
            init = onnx.TensorProto(name=name, data_type=vi.type.tensor_type.elem_type)
            init.dims.extend(array.shape)
            if array.nbytes < _INLINE:
                init.raw_data = array.tobytes()
            else:
                align = _PAGE_ALIGN if array.nbytes >= _PAGE_ALIGN_FROM else _ALIGN
                offset = -(-f.tell() // align) * align
                f.write(b"\0" * (offset - f.tell()))
                f.write(memoryview(array).cast("B"))
                init.data_location = onnx.TensorProto.EXTERNAL
                for k, v in (("location", data.name), ("offset", offset), ("length", array.nbytes)):
                    init.external_data.add(key=k, value=str(v))
            total += array.nbytes
            graph.graph.initializer.append(init)
            bar.advance()
        f.flush()
    left = [vi.name for vi in graph.graph.input if vi.name in values]
    if left:
        raise ExportError(f"{what}: weight inputs left in the graph: {left[:3]}")
    return total


def _fold_transpose(
    graph: onnx.ModelProto, node: onnx.NodeProto, tensor: torch.Tensor, name: str
) -> tuple[torch.Tensor, str]:
    """Store `tensor` transposed as `node` would make it, read by the node's consumers
    under `<name>.T`; the node goes."""
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    perm = perm or list(reversed(range(tensor.dim())))
    folded = name + TRANSPOSED
    for other in graph.graph.node:
        for i, inp in enumerate(other.input):
            if inp == node.output[0]:
                other.input[i] = folded
    for out in graph.graph.output:
        if out.name == node.output[0]:
            return tensor, name  # a graph output: keep the node (never seen in practice)
    graph.graph.node.remove(node)
    return tensor.permute(perm).contiguous(), folded


_FP16_TINY = 5.96e-08  # onnxruntime's convert_float_to_float16 defaults
_FP16_MAX = 65504.0


def fp16_as_ort(tensor: torch.Tensor) -> torch.Tensor:
    """float16 as onnxruntime's converter makes initializers (convert_np_to_float16):
    nonzero values keep their sign and finiteness, clamped to [5.96e-08, 65504] in size.

    The same function in torch: the numpy original took 3.2 s for one 4096x10240 tensor
    (T5-XXL has 72 of them), this about 0.3 s; tests check they agree bit for bit.
    """
    x = tensor.float()
    tiny = torch.tensor(_FP16_TINY, dtype=torch.float32)  # compared in fp32, as numpy does
    big = torch.tensor(_FP16_MAX, dtype=torch.float32)
    x = torch.where((x > 0) & (x < tiny), tiny, x)
    x = torch.where((x < 0) & (x > -tiny), -tiny, x)
    x = torch.where((x > big) & (x < torch.inf), big, x)
    x = torch.where((x < -big) & (x > -torch.inf), -big, x)
    return x.half()


def _to_numpy(tensor: torch.Tensor, elem_type: int):
    import numpy as np

    tensor = tensor.detach().cpu()  # an in-memory model may sit on a GPU
    if elem_type == onnx.TensorProto.FLOAT16:
        # As the converter treats initializers in the usual route: clamped to fp16's range.
        return np.ascontiguousarray(fp16_as_ort(tensor).numpy())
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return np.ascontiguousarray(tensor.numpy().astype(dtype, copy=False))
