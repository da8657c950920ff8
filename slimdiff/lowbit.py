"""What quantized modules and the exporter agree on, without importing each other.

compress/quant builds the quantized layers; export/ lowers them to ONNX. The layer's
forward emits ONNX QuantizeLinear/DequantizeLinear itself while torch.onnx exports, and two
things cross the layer boundary through this module:

- `merged_scales()`: while it is entered (the exporter's trace and its torch parity run),
  timestep-aware activation quantizers use one scale covering every group's range instead
  of the group of the current timestep: the exported graph has constant scales, which is
  what onnxruntime's integer kernels need (see compress/quant/layers.py);
- int4 weights: the graph carries them as int8 constants, and the layer names their
  SHA-256 in `INT4_DIGEST_ATTR`; the exporter packs those constants two to a byte with a
  small unpacking subgraph in front, which onnxruntime folds back to int8 when the session
  loads, so the file holds 4 bits a weight and the kernels stay the int8 ones.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import numpy as np

__all__ = [
    "INT4_DIGEST_ATTR",
    "QDQ_FORMS",
    "current_qdq_form",
    "has_quantized_layers",
    "int4_digest",
    "merged_scales",
    "pack_int4",
    "parameter_count",
    "qdq_form",
    "scales_merged",
    "unpack_int4",
]

INT4_DIGEST_ATTR = "onnx_int4_digest"
# The Q/DQ dialects the layers can emit: "ort", asymmetric uint8 activations (onnxruntime's
# integer kernels, QLinearConv and MatMulIntegerToFloat, take zero points) with an 8-bit
# output quantizer on convolutions; "tensorrt", ModelOpt's form, which TensorRT requires:
# symmetric int8 activations (zero point 0, scale = amax / 127 of the calibrated range),
# Q/DQ on layer inputs only (TensorRT picks its outputs' precision itself), int8 weights
# per output channel, no int4 packing (TensorRT's parser does not fold the unpacking ops).
QDQ_FORMS = ("ort", "tensorrt")
_merged = 0
_form = ["ort"]


def has_quantized_layers(model) -> bool:
    """Whether `model` (a torch module) holds quantized layers: every one carries
    INT4_DIGEST_ATTR (None when its weights are 8-bit)."""
    return any(hasattr(m, INT4_DIGEST_ATTR) for m in model.modules())


def parameter_count(model) -> int:
    """Parameters of `model` (a torch module or None), counting each quantized layer's
    integer weight (a buffer once finalised, int4 packed two to a byte) as the weights it
    stands for: `weight_shape` is what the layer declares. Activation quantizers' step
    sizes (modules with `counts_as_parameters = False`) are metadata, not weights. A
    parameter two modules share (T5's `shared` and `encoder.embed_tokens`) counts once, as
    torch's `parameters()` counts it."""
    if model is None:
        return 0
    total = 0
    seen: set[int] = set()  # ids of the parameters counted so far
    for m in model.modules():
        if getattr(m, "counts_as_parameters", True):
            for p in m.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
        if hasattr(m, INT4_DIGEST_ATTR) and "weight_q" in getattr(m, "_buffers", {}):
            total += int(np.prod(m.weight_shape))
    return total


@contextlib.contextmanager
def merged_scales() -> Iterator[None]:
    """Timestep-aware quantizers use their merged (all-groups) scale while entered."""
    global _merged
    _merged += 1
    try:
        yield
    finally:
        _merged -= 1


def scales_merged() -> bool:
    return _merged > 0


@contextlib.contextmanager
def qdq_form(form: str) -> Iterator[None]:
    """Quantized layers compute (in torch) and emit (in ONNX) the `form` dialect while
    entered; "tensorrt" implies merged scales (the graph's scales are constants)."""
    if form not in QDQ_FORMS:
        raise ValueError(f"unknown Q/DQ form {form!r}; use one of: {', '.join(QDQ_FORMS)}")
    _form.append(form)
    try:
        if form == "tensorrt":
            with merged_scales():
                yield
        else:
            yield
    finally:
        _form.pop()


def current_qdq_form() -> str:
    return _form[-1]


def int4_digest(values: np.ndarray) -> str:
    """The digest the exporter matches an int8 constant holding 4-bit values by."""
    values = np.ascontiguousarray(values, dtype=np.int8)
    return hashlib.sha256(values.tobytes() + repr(values.shape).encode()).hexdigest()


def pack_int4(values: np.ndarray) -> np.ndarray:
    """Signed 4-bit values (-8..7, any shape) two to a byte, flattened: low nibble first,
    each stored as value + 8. An odd count is padded with one zero."""
    flat = np.asarray(values, dtype=np.int16).reshape(-1)
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError("pack_int4: values outside -8..7")
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int16)])
    u = (flat + 8).astype(np.uint8)
    return (u[0::2] | (u[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """pack_int4's inverse: int8 values of `shape`."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    both = np.stack([packed & 15, packed >> 4], axis=1).reshape(-1).astype(np.int16) - 8
    count = int(np.prod(shape)) if shape else 1
    return both[:count].astype(np.int8).reshape(shape)
