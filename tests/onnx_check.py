"""Independent checks of exported graphs: onnxruntime on the file against the torch module,
on inputs of the test's own (not the exporter's parity check, which an export that passed
has already run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from slimdiff.models.inputs import Sizes, denoiser_inputs, denoiser_kwargs

# Neither the exporter's trace (18 x 18) nor its check (10 x 24) sizes.
FRESH = Sizes(batch=2, height=6, width=10, text_len=9, seed=11)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float32) - want).max() / np.abs(want).max())


def denoiser_rel_err(model, path: Path, sizes: Sizes = FRESH) -> float:
    """max |ORT - torch| / max |torch| of the denoiser graph at `path`."""
    feeds = denoiser_inputs(model.arch, model.denoiser, sizes)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    (got,) = session.run(["out_sample"], {k: feeds[k].numpy() for k in names})
    specs = model.arch.present_inputs(model.denoiser.config)
    with torch.inference_mode():
        want = model.denoiser(**denoiser_kwargs(specs, feeds), return_dict=False)[0].numpy()
    assert got.shape == want.shape
    return rel_err(got, want)


def package_vs_eager(component, session, sizes: Sizes) -> tuple[np.ndarray, np.ndarray]:
    """(package output, eager output) of an AOTInductor `session` and its `component`'s
    module on the component's inputs at `sizes` (export/aoti.py packages)."""
    feeds = component.make_inputs(sizes)
    with torch.inference_mode():
        want = component.module(*(feeds[n] for n in component.input_names)).numpy()
    got = session.run({k: v.numpy() for k, v in feeds.items()})[component.output_names[0]]
    return got, want
