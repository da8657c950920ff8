"""Numerical check of an exported graph against the torch module it came from.

The graph runs on onnxruntime's CPU EP with the CHECK inputs (other batch, latent size and
text length than the trace), so a wrong dynamic axis fails here, at export time, rather
than in the runtime. Error measure, per output, then the worst over outputs:

    rel_err = max|onnx - torch| / max|torch|

which is scale-free (a VAE's pixels and a UNet's noise prediction compare alike) and does
not blow up on elements near zero the way an element-wise relative error does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from slimdiff.export.components import Component, eval_mode
from slimdiff.export.dummy_inputs import CHECK

from slimdiff.threads import choose_threads, ort_session_options

__all__ = ["TOLERANCES", "ExportError", "check_parity", "raise_if_failed"]

log = logging.getLogger(__name__)

# fp32: the issue asks the denoiser to match to 1e-4; every tiny component lands near 1e-6.
# fp16: a 10-bit mantissa gives ~1e-3 per op; 2e-2 leaves room for depth (tiny SDXL UNet
# converted: 1.8e-3) and still catches overflow and wrong casts.
# int8: graphs with Q/DQ against torch's fake quantization. ORT's integer kernels
# requantize from an int32 accumulator, torch from a float one, so values at a rounding
# boundary land one step apart, and each step moves the next layers' inputs (toy:shapes,
# worst element on the CHECK inputs: QuEST W8A8 3.9e-2, W4A8 4.8e-2, minmax W8A8 9.8e-2).
# A wrong axis or scale gives errors of order 1.
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2, "int8": 2e-1}


class ExportError(Exception):
    """The exported graph does not reproduce the torch model (a toolkit or model problem,
    not bad user input)."""


def raise_if_failed(parity: dict[str, Any], what: str, fix: str) -> None:
    """ExportError naming `what` ("unet: ONNX (fp32)") when `parity` (a check's result;
    {} when no check ran) failed; `fix` says what to try."""
    if parity and not parity["passed"]:
        raise ExportError(
            f"{what} differs from torch: rel err {parity['rel_err']:.3g} > tolerance "
            f"{parity['tolerance']:g} on inputs {parity['inputs']}; {fix}"
        )


def check_parity(component: Component, path: Path, precision: str) -> dict[str, Any]:
    """Run `path` with ORT and `component` with torch on CHECK inputs; compare.

    Returns the manifest's parity record {"rel_err", "max_abs_err", "tolerance", "passed",
    "inputs"}; raises ExportError when the graph cannot run or its outputs have the wrong
    shape (there is no error to report then).

    Example:
        >>> check_parity(unet_component, Path("bundle/unet/model.onnx"), "fp32")  # doctest: +SKIP
        {'rel_err': 1.2e-06, 'max_abs_err': 4.1e-06, 'tolerance': 0.0001, 'passed': True, ...}
    """
    import onnxruntime as ort

    feeds = component.make_inputs(CHECK)
    with eval_mode(component), torch.inference_mode():
        expected = component.module(*(feeds[n] for n in component.input_names))
    expected = expected if isinstance(expected, tuple) else (expected,)
    # Threads by slimdiff's policy (SLIMDIFF_THREADS, else the component's size and the
    # CPUs this process may use) and no spinning, which made a toy:shapes step 1.7x
    # slower on a shared 2-CPU machine (slimdiff/threads.py).
    params = sum(p.numel() for p in component.module.parameters())
    options = ort_session_options(ort.SessionOptions(), choose_threads(params))
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        got = session.run(list(component.output_names), {k: v.numpy() for k, v in feeds.items()})
    except Exception as err:  # ORT raises its own Fail/InvalidArgument/... classes
        raise ExportError(
            f"{component.name}: onnxruntime cannot run the exported graph: {err}"
        ) from err

    rel_err, max_abs = 0.0, 0.0
    for name, ref, out in zip(component.output_names, expected, got, strict=True):
        ref = ref.float().numpy()
        if out.shape != ref.shape:
            raise ExportError(
                f"{component.name}: output {name} has shape {list(out.shape)} in ONNX but "
                f"{list(ref.shape)} in torch; a dynamic axis was traced as fixed"
            )
        diff = float(np.max(np.abs(out.astype(np.float32) - ref)))
        scale = float(np.max(np.abs(ref)))
        rel = diff / scale if scale > 0 else diff
        if not np.isfinite(out).all():
            rel = diff = float("inf")
        rel_err, max_abs = max(rel_err, rel), max(max_abs, diff)
    tolerance = TOLERANCES[precision]
    record = {
        "rel_err": rel_err,
        "max_abs_err": max_abs,
        "tolerance": tolerance,
        "passed": rel_err <= tolerance,
        "inputs": {k: list(v.shape) for k, v in feeds.items()},
    }
    log.info("%s parity: rel err %.2e (tolerance %.0e)", component.name, rel_err, tolerance)
    return record
