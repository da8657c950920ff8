"""Backends: what runs one exported component (an ONNX graph, later a TensorRT engine).

A backend is chosen by name and loads a component file into a `Session`, whose `run`
takes and returns numpy arrays keyed by tensor name. The pipeline only sees this
interface, so adding a backend is one module plus one line in `_BACKENDS`.

Known names:
    ort-cpu    onnxruntime, CPUExecutionProvider
    ort-cuda   onnxruntime-gpu, CUDAExecutionProvider (CPU fallback for unsupported ops)
    trt        TensorRT 10/11 engines built from the bundle's ONNX into the user cache
               (execute_async_v3, one stream, CUDA graphs); unverified: no TensorRT here
    trt-rtx    TensorRT-RTX through onnxruntime's plugin EP; unverified: no RTX GPU here
    aoti       AOTInductor .pt2 packages (torch); ONNX components through onnxruntime

Each imports its heavy library lazily inside `load`, so `import slimdiff.runtime` stays
light (and torch-free: only the aoti backend imports torch, when it loads a package).

Example:
    >>> backend = get_backend("ort-cpu")
    >>> session = backend.load("bundle/unet/model.onnx")       # doctest: +SKIP
    >>> out = session.run({"sample": x, "timestep": t, ...})    # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import reprlib
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from slimdiff.errors import UserError

__all__ = [
    "Backend",
    "Session",
    "backend_names",
    "check_feeds",
    "get_backend",
    "shape_bound",
]


@runtime_checkable
class Session(Protocol):
    """One loaded component: numpy in, numpy out.

    A session may also report what its graph declares, which the runtime then checks
    against the manifest at load (runtime/sessions.py; the ORT backend's OrtSession does):
    `input_shapes` and `output_shapes` ({name: [int | axis name | None, ...]}) and
    `output_dtypes` ({name: manifest dtype name, e.g. "float32"}).
    """

    input_names: list[str]
    output_names: list[str]
    input_dtypes: dict[str, np.dtype]  # what `run` expects per input name

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def check_feeds(path: Path, feeds: dict[str, np.ndarray], input_names: list[str]) -> None:
    """Feeds naming exactly the graph's inputs. A mismatch is a bug in the pipeline or a
    bundle from another exporter, not user input: ValueError."""
    unknown = set(feeds) - set(input_names)
    missing = set(input_names) - set(feeds)
    if unknown or missing:
        raise ValueError(
            f"{path}: feeds do not match the graph inputs "
            f"(missing {sorted(missing)}, unexpected {sorted(unknown)})"
        )


@runtime_checkable
class Backend(Protocol):
    """Loads component files into sessions; `name` is what `get_backend` was given."""

    name: str

    def load(self, path: str | Path) -> Session: ...


def shape_bound(backend: Backend, path: str | Path) -> bool:
    """Whether `backend` runs the component at `path` only at the shapes of the manifest's
    profile (TensorRT engines; a backend says so with a `shape_bound(path)` method). ORT
    runs any shape; an AOTInductor package runs the wider ranges it was exported with
    (export/aoti.py AXIS_RANGES), which its session checks itself."""
    method = getattr(backend, "shape_bound", None)
    return bool(method(path)) if method is not None else False


# name -> (module, factory, keyword arguments). Modules are imported only when asked for,
# so a backend whose library is missing costs nothing until someone selects it.
_BACKENDS: dict[str, tuple[str, str, dict[str, object]]] = {
    "ort-cpu": ("slimdiff.runtime.backends.ort", "OrtBackend", {"device": "cpu"}),
    "ort-cuda": ("slimdiff.runtime.backends.ort", "OrtBackend", {"device": "cuda"}),
    # TensorRT 10/11 engines from the bundle's ONNX (execute_async_v3, CUDA graphs)
    "trt": ("slimdiff.runtime.backends.trt", "TensorRTBackend", {}),
    # TensorRT-RTX through onnxruntime's plugin execution provider
    "trt-rtx": ("slimdiff.runtime.backends.trt_rtx", "TrtRtxBackend", {}),
    # AOTInductor .pt2 packages (torch, imported lazily); ONNX components through ORT
    "aoti": ("slimdiff.runtime.backends.aoti", "AotiBackend", {}),
}

# Names users may expect from the design, with why they are not selectable yet.
_PLANNED: dict[str, str] = {}


def backend_names() -> tuple[str, ...]:
    """The backend names `get_backend` accepts, e.g. ("ort-cpu", "ort-cuda")."""
    return tuple(_BACKENDS)


def get_backend(name: str | Backend) -> Backend:
    """The backend called `name`; raises UserError naming the known ones otherwise. A
    backend object (a string `name` and a `load` method: what this returns, or one built
    with settings a name cannot carry, e.g. OrtBackend(threads=4)) is returned as it is.

    Example:
        >>> get_backend("ort-cpu").name
        'ort-cpu'
    """
    if not isinstance(name, str):
        if isinstance(getattr(name, "name", None), str) and callable(getattr(name, "load", None)):
            return name
        raise UserError(
            f"backend {reprlib.repr(name)}: pass a backend name such as 'ort-cpu' or a backend "
            "object (slimdiff.runtime.get_backend(name), or e.g. "
            "slimdiff.runtime.backends.ort.OrtBackend(threads=4))"
        )
    if name in _PLANNED:
        raise UserError(f"backend {name!r}: {_PLANNED[name]}")
    if name not in _BACKENDS:
        raise UserError(f"unknown backend {name!r}; known backends: {', '.join(_BACKENDS)}")
    module_name, factory, kwargs = _BACKENDS[name]
    module = importlib.import_module(module_name)
    return getattr(module, factory)(name=name, **kwargs)
