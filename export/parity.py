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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from slimdiff.export.components import Component, eval_mode, model_device, reference_precision
from slimdiff.export.dummy_inputs import CHECK
from slimdiff.runtime.manifest import VAE_DECODER, VAE_ENCODER

from slimdiff.errors import UserError
from slimdiff.threads import IMAGE, choose_threads, ort_session_options

__all__ = [
    "TOLERANCES",
    "ExportError",
    "Reference",
    "check_parity",
    "raise_if_failed",
    "torch_reference",
]

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


class ExportError(UserError):
    """The exported graph does not reproduce the torch model (a toolkit or model problem,
    not bad user input): one line from the CLI, as a UserError, but exit code 1."""

    exit_code = 1


def raise_if_failed(parity: dict[str, Any], what: str, fix: str) -> None:
    """ExportError naming `what` ("unet: ONNX (fp32)") when `parity` (a check's result;
    {} when no check ran) failed; `fix` says what to try."""
    if parity and not parity["passed"]:
        raise ExportError(
            f"{what} differs from torch: rel err {parity['rel_err']:.3g} > tolerance "
            f"{parity['tolerance']:g} on inputs {parity['inputs']}; {fix}"
        )


@dataclass
class Reference:
    """What torch computed on a component's CHECK inputs: all a parity check needs once
    the torch weights are gone (export_bundle(release_weights=True) frees them before the
    graph is loaded)."""

    feeds: dict[str, torch.Tensor]
    outputs: tuple[torch.Tensor, ...]
    params: int  # the component's parameter count, for the session's thread choice


def torch_reference(component: Component) -> Reference:
    """Run `component` with torch on its CHECK inputs."""
    feeds = component.make_inputs(CHECK)  # on the CPU, where onnxruntime reads them
    device = model_device(component.model)
    with eval_mode(component), torch.inference_mode(), reference_precision():
        expected = component.module(*(feeds[n].to(device) for n in component.input_names))
    expected = expected if isinstance(expected, tuple) else (expected,)
    params = sum(p.numel() for p in component.module.parameters())
    return Reference(feeds, tuple(t.float().cpu() for t in expected), params)


def check_parity(
    component: Component, path: Path, precision: str, reference: Reference | None = None
) -> dict[str, Any]:
    """Run `path` with ORT and `component` with torch on CHECK inputs; compare.

    `reference`: torch's outputs from torch_reference(component), computed earlier (the
    component's weights may be freed since); default: computed now.

    Returns the manifest's parity record {"rel_err", "max_abs_err", "tolerance", "passed",
    "inputs"}; raises ExportError when the graph cannot run or its outputs have the wrong
    shape (there is no error to report then).

    Example:
        >>> check_parity(unet_component, Path("bundle/unet/model.onnx"), "fp32")  # doctest: +SKIP
        {'rel_err': 1.2e-06, 'max_abs_err': 4.1e-06, 'tolerance': 0.0001, 'passed': True, ...}
    """
    import onnxruntime as ort

    reference = reference or torch_reference(component)
    feeds = reference.feeds
    # Threads by slimdiff's policy (SLIMDIFF_THREADS, else the component's size and the
    # CPUs this process may use) and no spinning, which made a toy:shapes step 1.7x
    # slower on a shared 2-CPU machine (slimdiff/threads.py).
    # A VAE is IMAGE work (full-resolution convolutions), never capped as a small model.
    vae = component.name in (VAE_DECODER, VAE_ENCODER)
    work = IMAGE if vae else reference.params
    options = ort_session_options(ort.SessionOptions(), choose_threads(work))
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        got = session.run(list(component.output_names), {k: v.numpy() for k, v in feeds.items()})
    except Exception as err:  # ORT raises its own Fail/InvalidArgument/... classes
        raise ExportError(
            f"{component.name}: onnxruntime cannot run the exported graph: {err}"
        ) from err
    del session  # a full-size graph: free it before the next component loads

    rel_err, max_abs = 0.0, 0.0
    for name, ref, out in zip(component.output_names, reference.outputs, got, strict=True):
        ref = ref.numpy()
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
