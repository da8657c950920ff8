"""ONNX Runtime graph fusions and fp16 conversion, by each component's OnnxPlan.

Fusions come from onnxruntime.transformers (`optimize_model`, the tool behind ORT's own
stable-diffusion `optimize_pipeline.py`). Which ones are worth running depends on the
execution provider:

- GPU (`for_gpu=True`): ORT's stable-diffusion set, as optimize_pipeline.py uses it:
  GroupNorm, SkipGroupNorm, NhwcConv, BiasSplitGelu, BiasAdd and packed QKV/KV attention
  (packed only for fp16, as there). Those are CUDA-only contrib ops.
- CPU (the default): only where it turns diffusers' attention into ORT's
  MultiHeadAttention/Attention (both have CPU kernels), which the CPU session cannot do by
  itself. That does not make GEMMs faster, but the fused kernel peaks far lower in memory
  than the exported MatMul/Softmax chain, whose intermediates each hold a full
  (tokens x tokens) score matrix: that is what runs a CPU out of memory at high
  resolution. Elsewhere the offline fusions (LayerNorm, SkipLayerNorm, Gelu variants)
  measured no faster than what the CPU session does at load, so they are skipped. Each
  component's plan, with the numbers behind it, is declared with its family's ArchSpec
  (slimdiff/models/families.py; text encoder and VAE plans in slimdiff/models/arch.py).

`shape_inference` (OnnxPlan): ORT's symbolic shape inference is most of the optimizer's time
on big graphs, and the fusions needing it (SkipLayerNorm, bias folding) are ones the CPU
session applies at load anyway, so it is off for CPU fusions unless the attention fusion
needs it. GPU fusions always use it, as ORT's tooling does.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path

import onnx

from slimdiff.models.arch import OnnxPlan

__all__ = ["fuse", "fusion_memory", "fusion_options"]

log = logging.getLogger(__name__)

_MS_DOMAIN = "com.microsoft"  # ORT's contrib ops

# FusionOptions flags whose fused ops only have CUDA (or ROCm) kernels in ORT: GroupNorm,
# SkipGroupNorm, NhwcConv, BiasSplitGelu, BiasAdd, and MultiHeadAttention with packed
# QKV / packed KV inputs (the CPU MHA kernel takes separate Q, K, V).
_GPU_ONLY_FLAGS = (
    "enable_group_norm",
    "enable_skip_group_norm",
    "enable_nhwc_conv",
    "enable_bias_splitgelu",
    "enable_bias_add",
    "enable_packed_qkv",
    "enable_packed_kv",
)


def fusion_options(plan: OnnxPlan, *, for_gpu: bool, fp16: bool):
    """ORT FusionOptions for `plan` on the CPU or GPU execution provider."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(plan.model_type)
    if for_gpu:
        # optimize_pipeline.py keeps packed QKV/KV only for fp16 graphs.
        options.enable_packed_qkv = options.enable_packed_qkv and fp16
        options.enable_packed_kv = options.enable_packed_kv and fp16
    else:
        for flag in _GPU_ONLY_FLAGS:
            if hasattr(options, flag):
                setattr(options, flag, False)
        options.enable_shape_inference = plan.shape_inference
    return options


# The optimizer's peak over the graph it loads (weights included): it holds the graph, and
# with symbolic shape inference an inferred copy and the fused one besides. Measured on
# CPU, ORT 1.32, this 24 GiB host: SDXL's fp32 UNet (10.3 GB, opt_level 1, no shape
# inference) fused within 15.5 GiB peak RSS, the torch weights' phase included; SD3
# Medium's fp32 transformer (8.1 GB, with shape inference) went past 23.2 GiB and was
# killed. Estimates from those two graphs, not an accounting of the optimizer.
FUSE_MEMORY = {False: 2.0, True: 3.5}  # shape_inference -> x graph bytes


def fusion_memory(path: Path, plan: OnnxPlan) -> int:
    """Bytes `fuse` is estimated to need for the graph at `path` (and its external data)."""
    graph = sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file())
    return int(graph * FUSE_MEMORY[plan.shape_inference])


def fuse(path: str, plan: OnnxPlan, *, for_gpu: bool = False, fp16: bool = False):
    """Run ORT's fusions of `plan` on the graph at `path`, or None if they do not apply.

    Returns (OnnxModel, {fused op: count}). `path` (not a ModelProto) so graphs past 2 GiB
    with external data load.

    Example:
        >>> fused = fuse("work/unet/raw.onnx", arch.denoiser_onnx)  # doctest: +SKIP
        >>> fused[1]  # doctest: +SKIP
        {'Attention': 16, 'MultiHeadAttention': 16, 'LayerNormalization': 48}
    """
    if not (for_gpu or plan.on_cpu):
        return None
    from onnxruntime.transformers.optimizer import optimize_model

    options = fusion_options(plan, for_gpu=for_gpu, fp16=fp16)
    log.info("ORT %s fusions (%s) on %s", plan.model_type, "gpu" if for_gpu else "cpu", path)
    with quiet():
        model = optimize_model(
            path,
            model_type=plan.model_type,
            opt_level=plan.opt_level,
            optimization_options=options,
            use_gpu=for_gpu,
        )
    counts = {op: n for op, n in model.get_fused_operator_statistics().items() if n}
    if has_contrib_ops(model.model) and not any(
        o.domain == _MS_DOMAIN for o in model.model.opset_import
    ):
        # The MMDiT optimizer emits com.microsoft ops without importing the domain, which the
        # ONNX checker rejects.
        model.model.opset_import.append(onnx.helper.make_opsetid(_MS_DOMAIN, 1))
    return model, counts


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    # ORT's optimizer draws a tqdm bar on stderr and its symbolic shape inference prints
    # sympy notes ("Cannot determine if ... < 0") on stdout; library code does not print.
    # Their log records go through logging and are unaffected.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def has_contrib_ops(model: onnx.ModelProto) -> bool:
    """Whether `model` uses ORT's com.microsoft ops (as fused graphs do)."""
    return any(node.domain == _MS_DOMAIN for node in model.graph.node)
