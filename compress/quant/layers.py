"""Quantized Linear/Conv2d layers: fake quantization in torch, Q/DQ when exported to ONNX.

Written here rather than taken from nvidia-modelopt, which installs and runs on this CPU
(0.47: `mtq.quantize` with INT8_DEFAULT_CFG on a conv stack, 1.3% output error) but lacks
what QuEST is made of: its TensorQuantizer has one static amax per tensor (no per-timestep
step sizes), the amax is not learnable (`learn_amax` is deprecated and refused), and its
activations are symmetric (no zero point), which wastes half of an 8-bit range on
SiLU/GELU outputs. ModelOpt's symmetric INT8/FP8 Q/DQ form for TensorRT is the part that
would fit; it is not wired in yet.

A QuantLayer holds, per layer:
- weights: symmetric, per output channel (int8: -127..127, int4: -7..7), the step size
  fixed after an MSE search; while a pass trains, a float `weight` with straight-through
  rounding; once finalised, integer `weight_q` (int4 packed two to a byte) and the scales;
- an input activation quantizer (`act`): asymmetric (scale, zero point), one learnable step
  size per timestep group (LSQ: straight-through rounding, gradient scaled by
  1/sqrt(numel * qmax)); QuEST's TimewiseUniformQuantizer keeps one per timestep;
- convolutions: an 8-bit output quantizer (`out_act`), because onnxruntime runs a Conv in
  integers (QLinearConv) only between a DequantizeLinear and a QuantizeLinear;
- with `rank` > 0 (SVDQuant, linear only): x is divided by per-channel smoothing factors,
  the weight multiplied by them, and a float rank-r branch L(Rx) carries the top singular
  directions while only the residual weight is quantized.

Under torch.onnx export the quantized core is one autograd Function whose `symbolic`
writes QuantizeLinear/DequantizeLinear around a MatMul or Conv with constant scales.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from slimdiff.compress.quant.edits import LayerQuant, Quantized
from torch import nn

from slimdiff.lowbit import INT4_DIGEST_ATTR, current_qdq_form, int4_digest, scales_merged

__all__ = [
    "ActQuantizer",
    "QuantLayer",
    "act_quantizers",
    "install_group_hook",
    "quant_layers",
    "restore_quantized",
    "weight_qmax",
]


def weight_qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1  # symmetric, narrow range: 127, 7


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (x.round() - x).detach()


def _grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    # LSQ: the value of x, the gradient of x * factor.
    return (x - x * factor).detach() + x * factor


def fake_quant_weight(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel fake quantization, straight-through in w."""
    qmax = weight_qmax(bits)
    s = scale.reshape(-1, *([1] * (w.dim() - 1)))
    return torch.clamp(_round_ste(w / s), -qmax, qmax) * s


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = weight_qmax(bits)
    s = scale.reshape(-1, *([1] * (w.dim() - 1)))
    return torch.clamp((w / s).round(), -qmax, qmax).to(torch.int8)


class ActQuantizer(nn.Module):
    """Asymmetric per-tensor fake quantizer with one learnable step size per group."""

    counts_as_parameters = False  # step sizes are not model weights (slimdiff.lowbit)

    def __init__(self, bits: int, groups: int) -> None:
        super().__init__()
        self.bits, self.qmax = bits, 2**bits - 1
        self.scale = nn.Parameter(torch.ones(groups))
        self.register_buffer("zero", torch.zeros(groups))  # integers in [0, qmax], as floats
        self.group = 0  # set per call by the denoiser's group hook
        self.observer: Any = None  # while set (calibration), inputs are recorded, not quantized

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Scales and zero points covering [lo, hi] per group (0 is always inside)."""
        lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
        scale = torch.clamp((hi - lo) / self.qmax, min=1e-8)
        with torch.no_grad():
            self.scale.copy_(scale)
            self.zero.copy_(torch.clamp((-lo / scale).round(), 0, self.qmax))

    def merged(self) -> tuple[float, int]:
        """One (scale, zero point) covering every group's range: the exported form."""
        s, z = self.scale.detach().abs(), self.zero
        lo, hi = float(((0 - z) * s).min()), float(((self.qmax - z) * s).max())
        scale = max((hi - lo) / self.qmax, 1e-8)
        return scale, int(min(max(round(-lo / scale), 0), self.qmax))

    def symmetric(self) -> float:
        """TensorRT's int8 step size: amax / 127 of the merged range. With the zero point
        at 128, [0, 255] here is int8's [-128, 127] there: the same arithmetic."""
        s, z = self.merged()
        return max(s * max(z, self.qmax - z), 1e-8) / 127

    def current(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.qmax == 255 and current_qdq_form() == "tensorrt":
            return torch.tensor(self.symmetric()), torch.tensor(128.0)
        if scales_merged():
            s, z = self.merged()
            return torch.tensor(s), torch.tensor(float(z))
        return self.scale[self.group].abs(), self.zero[self.group]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fake(x)

    def fake(self, x: torch.Tensor) -> torch.Tensor:
        """The quantized-dequantized x (a plain method: the ONNX tracer must not see a
        module call inside the quantized layer's Function)."""
        if self.observer is not None:
            self.observer(self, x)
            return x
        s, z = self.current()
        if self.training or s.requires_grad:
            s = _grad_scale(s, 1.0 / math.sqrt(x.numel() * self.qmax))
        # x times the reciprocal, not x / s: onnxruntime rewrites a division by a constant
        # into that product, and at a rounding tie the two differ by one level (measured:
        # a 4-bit linear layer matched its ONNX graph exactly only this way).
        q = torch.clamp(_round_ste(x * (1.0 / s)) + z, 0, self.qmax)
        return (q - z) * s

    def onnx_params(self) -> tuple[float, int, int]:
        if self.qmax == 255 and current_qdq_form() == "tensorrt":
            return self.symmetric(), 128, self.qmax
        s, z = self.merged()  # one group: its own scale and zero point
        return s, z, self.qmax


class QuantLayer(nn.Module):
    """A Linear or Conv2d with quantized weights and (optionally) input and output."""

    def __init__(self, spec: LayerQuant, source: nn.Module, groups: int) -> None:
        super().__init__()
        self.spec = spec
        self.kind = spec.kind
        w = source.weight
        self.weight_shape = tuple(w.shape)
        if spec.kind == "linear":
            self.in_features, self.out_features = source.in_features, source.out_features
        else:
            self.in_channels, self.out_channels = source.in_channels, source.out_channels
            self.conv_args = {
                "stride": source.stride,
                "padding": source.padding,
                "dilation": source.dilation,
                "groups": source.groups,
            }
            if source.padding_mode != "zeros":
                raise ValueError(f"padding_mode {source.padding_mode!r} is not quantizable")
        self.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
        self.bias = nn.Parameter(source.bias.detach().clone()) if source.bias is not None else None
        self.register_buffer("weight_scale", torch.ones(w.shape[0], device=w.device))
        self.act = ActQuantizer(spec.act_bits, groups) if spec.act_bits else None
        self.out_act = ActQuantizer(spec.out_bits, groups) if spec.out_bits else None
        if spec.smooth:
            self.register_buffer("smooth", torch.ones(w.shape[1], device=w.device))
        if spec.rank:
            self.lr_down = nn.Parameter(torch.zeros(spec.rank, w.shape[1], device=w.device))
            self.lr_up = nn.Parameter(torch.zeros(w.shape[0], spec.rank, device=w.device))
        self._cache: torch.Tensor | None = None
        self.enabled = True  # False: the float layer (sensitivity ranking)
        if w.device.type != "meta":
            self.to(w.device)

    # ------------------------------------------------------------------ weights

    @property
    def finalised(self) -> bool:
        return "weight_q" in self._buffers

    def init_weight_scale(self, search: bool) -> None:
        """Per-channel step sizes: amax / qmax, or (search) the clip ratio in 0.5..1 with
        the least squared error per channel (Q-Diffusion's / QuEST's MSE weight search)."""
        w = self.weight.detach()
        flat = w.reshape(w.shape[0], -1)
        amax = flat.abs().amax(1).clamp(min=1e-8)
        qmax = weight_qmax(self.spec.weight_bits)
        best = amax / qmax
        if search:
            best_err = torch.full_like(amax, float("inf"))
            for ratio in torch.linspace(0.5, 1.0, 26).tolist():
                s = amax * ratio / qmax
                q = torch.clamp((flat / s[:, None]).round(), -qmax, qmax) * s[:, None]
                err = (q - flat).pow(2).sum(1)
                better = err < best_err
                best = torch.where(better, s, best)
                best_err = torch.where(better, err, best_err)
        self.weight_scale.copy_(best)

    def finalise(self) -> None:
        """Replace the float weight by its integers (int4 packed); the scales stay."""
        if self.finalised:
            return
        q = quantize_weight(self.weight.detach(), self.weight_scale, self.spec.weight_bits)
        del self.weight
        self.register_buffer("weight_q", _pack(q) if self.spec.weight_bits == 4 else q)
        self._cache = None

    def dequantized_weight(self) -> torch.Tensor:
        if not self.finalised:
            return fake_quant_weight(self.weight, self.weight_scale, self.spec.weight_bits)
        cache = self._cache
        if cache is None or cache.device != self.weight_q.device:
            q = self.integer_weight()
            s = self.weight_scale.reshape(-1, *([1] * (q.dim() - 1)))
            cache = self._cache = q.to(s.dtype) * s
        return cache

    def integer_weight(self) -> torch.Tensor:
        """The int8 weight values (-127..127 or -7..7) in the layer's weight shape."""
        if not self.finalised:
            return quantize_weight(self.weight.detach(), self.weight_scale, self.spec.weight_bits)
        if self.spec.weight_bits == 4:
            return _unpack(self.weight_q, self.weight_shape)
        return self.weight_q

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.smooth:
            x = x / self.smooth.to(x.dtype)
        branch = None
        if self.spec.rank:
            branch = F.linear(F.linear(x, self.lr_down), self.lr_up)
        if torch.onnx.is_in_onnx_export():
            y = _QuantCore.apply(x, _register_consts(self))
        else:
            y = self._core(x)
        return y if branch is None else y + branch

    def _core(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled and not self.finalised:
            return self._float(x)
        if self.act is not None:
            x = self.act.fake(x)
        w = self.dequantized_weight().to(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if self.kind == "linear":
            y = F.linear(x, w, bias)
        else:
            y = F.conv2d(x, w, bias, **self.conv_args)
        if self.out_act is None or current_qdq_form() == "tensorrt":
            return y  # TensorRT places Q/DQ on inputs only and picks outputs' precision
        return self.out_act.fake(y)

    def _float(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if self.kind == "linear":
            return F.linear(x, self.weight, bias)
        return F.conv2d(x, self.weight, bias, **self.conv_args)

    def extra_repr(self) -> str:
        s = self.spec
        return f"{s.kind}, w{s.weight_bits}a{s.act_bits or 'fp'}, rank={s.rank}"

    # ------------------------------------------------------------------ export

    @property
    def onnx_int4_digest(self) -> str | None:  # read by the exporter (slimdiff.lowbit)
        if self.spec.weight_bits != 4:
            return None
        return int4_digest(_onnx_weight(self))


assert hasattr(QuantLayer, INT4_DIGEST_ATTR)  # the name the exporter reads


def _onnx_weight(layer: QuantLayer) -> np.ndarray:
    """The int8 weight as the graph holds it: (in, out) for MatMul, OIHW for Conv."""
    q = layer.integer_weight().cpu().numpy()
    return np.ascontiguousarray(q.T) if layer.kind == "linear" else q


class _OnnxConsts:
    """Everything the symbolic needs, as constants (not traced tensors)."""

    def __init__(self, layer: QuantLayer) -> None:
        self.layer = layer
        self.kind = layer.kind
        self.act = layer.act.onnx_params() if layer.act is not None else None
        self.form = current_qdq_form()
        out = layer.out_act is not None and self.form == "ort"
        self.out = layer.out_act.onnx_params() if out else None
        self.weight = torch.from_numpy(_onnx_weight(layer))
        self.scale = layer.weight_scale.detach().float().cpu()
        self.bias = layer.bias.detach().float().cpu() if layer.bias is not None else None
        self.conv_args = getattr(layer, "conv_args", None)


# The tracer takes tensors and Python scalars as a Function's arguments, not objects: the
# layer's constants are looked up by an integer key, kept only while an export runs.
_CONSTS: dict[int, _OnnxConsts] = {}


def _register_consts(layer: QuantLayer) -> int:
    key = id(layer)
    _CONSTS[key] = _OnnxConsts(layer)
    return key


class _QuantCore(torch.autograd.Function):
    """The quantized product; traced by torch.onnx as Q/DQ + MatMul/Conv."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, key: int) -> torch.Tensor:
        # The value only: the graph comes from `symbolic`. The TorchScript tracer, left
        # on, would look the layer's parameters up among the trace's values and fail.
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            with torch.no_grad():
                return _CONSTS[key].layer._core(x)
        finally:
            torch._C._set_tracing_state(state)

    @staticmethod
    def symbolic(g, x, key: int):
        consts = _CONSTS.pop(key)

        def const(t: torch.Tensor):
            return g.op("Constant", value_t=t)

        def qdq(v, params):
            scale, zero, qmax = params
            s = const(torch.tensor(scale, dtype=torch.float32))
            if qmax < 255:
                inv = const(1.0 / torch.tensor(scale, dtype=torch.float32))
                # 4-bit activations: no ONNX Runtime kernel takes them, so the graph computes
                # the fake quantization in float, as torch does (Round is half to even in
                # both); what follows runs in float: a simulated precision.
                z = const(torch.tensor(float(zero), dtype=torch.float32))
                q = g.op("Add", g.op("Round", g.op("Mul", v, inv)), z)
                q = g.op(
                    "Clip",
                    q,
                    const(torch.tensor(0.0, dtype=torch.float32)),
                    const(torch.tensor(float(qmax), dtype=torch.float32)),
                )
                return g.op("Mul", g.op("Sub", q, z), s)
            if consts.form == "tensorrt":  # symmetric: uint8 zero point 128 is int8's 0
                z = const(torch.tensor(zero - 128, dtype=torch.int8))
            else:
                z = const(torch.tensor(zero, dtype=torch.uint8))
            return g.op("DequantizeLinear", g.op("QuantizeLinear", v, s, z), s, z)

        if consts.act is not None:
            x = qdq(x, consts.act)
        axis = 1 if consts.kind == "linear" else 0
        # Symmetric weights: no zero point (ONNX's default is 0 of the input's type), which
        # saves a constant a layer; ORT's QLinearConv/MatMulIntegerToFloat fusions take it.
        w = g.op("DequantizeLinear", const(consts.weight), const(consts.scale), axis_i=axis)
        if consts.kind == "linear":
            if consts.act is None or consts.act[2] < 255:
                # Float input (4-bit emulation, weight-only): onnxruntime would turn
                # DequantizeLinear -> MatMul into MatMulNBits, which quantizes the input
                # itself (accuracy level 4: int8, block-wise) and so no longer computes
                # what torch does; a Reshape between them keeps the plain float MatMul.
                shape = const(torch.tensor(list(consts.weight.shape), dtype=torch.int64))
                w = g.op("Reshape", w, shape)
            y = g.op("MatMul", x, w)
            if consts.bias is not None:
                y = g.op("Add", y, const(consts.bias))
        else:
            a = consts.conv_args
            k = list(consts.weight.shape[2:])
            pads = [int(p) for p in a["padding"]] * 2
            inputs = [x, w] + ([const(consts.bias)] if consts.bias is not None else [])
            y = g.op(
                "Conv",
                *inputs,
                kernel_shape_i=k,
                strides_i=[int(s) for s in a["stride"]],
                pads_i=pads,
                dilations_i=[int(d) for d in a["dilation"]],
                group_i=int(a["groups"]),
            )
        if consts.out is not None:
            y = qdq(y, consts.out)
        return y


def _pack(q: torch.Tensor) -> torch.Tensor:
    flat = q.reshape(-1).to(torch.int16)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    u = (flat + 8).to(torch.uint8)
    return u[0::2] | (u[1::2] << 4)


def _unpack(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    both = torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1)
    return (both[: math.prod(shape)].to(torch.int16) - 8).to(torch.int8).reshape(shape)


# ---------------------------------------------------------------------- model level


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}


def act_quantizers(model: nn.Module) -> list[ActQuantizer]:
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]


def group_of(t: float, edges: list[float]) -> int:
    return sum(t < e for e in edges)


def install_group_hook(model: nn.Module, edit: Quantized) -> None:
    """Before each call, point every activation quantizer at the group of the timestep."""
    old = getattr(model, "_quest_group_hook", None)
    if old is not None:
        old.remove()
    if edit.groups == 1:
        return
    quantizers = act_quantizers(model)
    edges = list(edit.group_edges)

    def hook(_module, args, kwargs):
        t = kwargs.get(edit.timestep_arg)
        if t is None and len(args) > edit.timestep_position:
            t = args[edit.timestep_position]
        if t is None:
            return
        value = float(t.reshape(-1)[0]) if torch.is_tensor(t) else float(t)
        group = group_of(value, edges)
        for q in quantizers:
            q.group = group

    model._quest_group_hook = model.register_forward_pre_hook(hook, with_kwargs=True)


def replace_layers(model: nn.Module, edit: Quantized) -> dict[str, QuantLayer]:
    """Swap every layer the edit names for a QuantLayer (weights as they are)."""
    made = {}
    for name, spec in edit.layers.items():
        source = model.get_submodule(name)
        layer = QuantLayer(spec, source, edit.groups)
        model.set_submodule(name, layer)
        made[name] = layer
    install_group_hook(model, edit)
    return made


def restore_quantized(model: nn.Module, edit: Quantized) -> Any:
    """Replay the edit on a component built on meta: finalised QuantLayers, whose integer
    weights and scales the artifact loader then assigns."""
    for layer in replace_layers(model, edit).values():
        q = torch.empty(layer.weight_shape, dtype=torch.int8, device="meta")
        del layer.weight
        layer.register_buffer("weight_q", _pack_meta(q) if layer.spec.weight_bits == 4 else q)
    return model


def _pack_meta(q: torch.Tensor) -> torch.Tensor:
    return torch.empty((q.numel() + 1) // 2, dtype=torch.uint8, device="meta")
