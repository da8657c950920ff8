"""AOTInductor backend ("aoti"): a bundle's `.pt2` packages through torch, its ONNX graphs
through onnxruntime.

A package (export/aoti.py) is compiled C++ (CPU) or CUDA kernels plus weights; torch's
`aoti_load_package` runs it without the model's Python code. The package itself does not
name its inputs, so `io.json` beside it (hashed with every bundle file before any load,
runtime/bundle_files.py) gives the input and output names in call order, their dtypes,
the device it was compiled for and the range each axis accepts.

This is the one runtime module that may import torch, and only inside `load` and the
session: `import slimdiff.runtime` stays torch-free (a test blocks torch while importing
it). Components a bundle keeps as ONNX (the text encoders, the VAE) go to `OrtBackend`, on
the CUDA EP when this backend's device is CUDA.

Device: `device=None` runs each package on the device it was compiled for, and ONNX on
CUDA when torch sees a GPU and onnxruntime has the CUDA EP (else, with a warning, on the
CPU). An explicit "cpu" or "cuda[:N]" must match the packages' device.

Example:
    >>> session = AotiBackend().load("bundle/unet/model.pt2")           # doctest: +SKIP
    >>> session.run({"sample": x, "timestep": t, ...})["out_sample"]   # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from slimdiff.runtime.manifest import FIX, BundleError, load_json_bytes

from slimdiff.errors import UserError
from slimdiff.threads import choose_threads

__all__ = ["AotiBackend", "AotiSession", "axis_accepts", "axis_range_text"]

log = logging.getLogger(__name__)

IO_NAME = "io.json"  # export/aoti.py IO_NAME
_INSTALL = "pip install torch (a build matching the device the bundle was exported on)"
_NUMPY = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


def _import_torch() -> Any:
    try:
        import torch
        import torch._inductor
    except ImportError:
        raise UserError(f"backend aoti needs torch, which is not installed: {_INSTALL}") from None
    return torch


class AotiSession:
    """One loaded package behind the runtime's numpy `Session` interface."""

    def __init__(self, model: Any, io: dict, device: Any, path: Path) -> None:
        self._model = model
        self._device = device
        self.path = path
        self.input_names = [i["name"] for i in io["inputs"]]
        self.output_names = [o["name"] for o in io["outputs"]]
        self.input_dtypes = {i["name"]: np.dtype(_NUMPY[i["dtype"]]) for i in io["inputs"]}
        self._shapes = {i["name"]: i["shape"] for i in io["inputs"]}
        self._axes = io["axes"]
        self._constants: dict[str, tuple[np.ndarray, Any]] = {}  # see _tensor
        self.copies = 0  # host-to-device input copies made (what tests and benches read)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the package on `feeds` (cast to the package's dtypes); numpy outputs."""
        import torch

        unknown = set(feeds) - set(self.input_names)
        missing = set(self.input_names) - set(feeds)
        if unknown or missing:
            raise ValueError(
                f"{self.path}: feeds do not match the package inputs "
                f"(missing {sorted(missing)}, unexpected {sorted(unknown)})"
            )
        args = [self._tensor(torch, name, feeds[name]) for name in self.input_names]
        with torch.inference_mode():
            out = self._model(*args)
        out = out if isinstance(out, (tuple, list)) else (out,)
        return {n: t.cpu().numpy() for n, t in zip(self.output_names, out, strict=True)}

    def _tensor(self, torch: Any, name: str, feed: np.ndarray) -> Any:
        """`feed` as a tensor on the package's device. A read-only feed is a constant (the
        contract of runtime/backends/ort_binding.py; the pipeline marks its conditioning
        read-only): copied once and reused while the same array object is fed, so the text
        states are not copied to the GPU again at every step."""
        cached = self._constants.get(name)
        if cached is not None and cached[0] is feed:
            return cached[1]
        value = np.ascontiguousarray(feed, dtype=self.input_dtypes[name])
        self._check_shape(name, value.shape)
        if not value.flags.writeable:  # torch.from_numpy warns on read-only memory
            value = value.copy()
        tensor = torch.from_numpy(value).to(self._device)
        self.copies += 1
        if not feed.flags.writeable:
            # The array is held so its id cannot be reused by another object meanwhile.
            self._constants[name] = (feed, tensor)
        return tensor

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        # The compiled wrapper checks sizes too, but from C++ (a RuntimeError naming a
        # symbol): the runtime says which axis of which input is out of range, and why.
        check_shape(self.path, self._shapes[name], self._axes, name, shape)


def check_shape(
    path: Path, declared: list, axes: dict, name: str, shape: tuple[int, ...], fixed: bool = True
) -> None:
    """UserError when input `name` of shape `shape` has an axis outside the range the
    package at `path` was compiled for (`declared`: its io.json shape, `axes` its ranges);
    ValueError for another rank or, with `fixed`, another fixed dimension."""
    if len(shape) != len(declared):
        raise ValueError(f"{path}: {name} has {len(shape)} dims, the package takes "
                         f"{len(declared)}")  # fmt: skip
    for size, dim in zip(shape, declared, strict=True):
        if isinstance(dim, int):
            if fixed and size != dim:
                raise ValueError(f"{path}: {name} has shape {list(shape)}, the package "
                                 f"takes {declared}")  # fmt: skip
            continue
        axis = axes[dim]
        if not axis_accepts(axis, size):
            raise UserError(
                f"{path}: axis {dim} of {name} is {size}, outside the "
                f"{axis_range_text(axis)} this AOTInductor package was compiled for "
                "(export --target aoti's ranges); pick a size or image count within them, "
                "or run the bundle with --backend ort-cpu"
            )


class AotiBackend:
    """Loads `.pt2` packages with torch and `.onnx` graphs with onnxruntime.

    `threads` fixes torch's CPU threads (and the ONNX sessions'); None leaves the choice to
    `slimdiff.threads.choose_threads`.

    Example:
        >>> AotiBackend(device="cpu").name
        'aoti'
    """

    def __init__(
        self, name: str = "aoti", device: str | None = None, threads: int | None = None
    ) -> None:
        if device is not None and device != "cpu" and not device.startswith("cuda"):
            raise UserError(f"backend {name}: device {device!r} is not cpu, cuda or cuda:N")
        self.name = name
        self.device = device
        self.threads = threads
        self._ort: dict[str, Any] = {}

    def load(self, path: str | Path) -> Any:
        """A session for one component file: `.pt2` through torch, `.onnx` through ORT."""
        path = Path(path)
        if path.suffix == ".onnx":
            return self._onnx_backend().load(path)
        if path.suffix != ".pt2":
            raise BundleError(f"{path}: backend {self.name} runs .pt2 and .onnx files; {FIX}")
        return self._load_package(path)

    def check_shapes(self, path: str | Path, shapes: dict[str, tuple[int, ...]]) -> None:
        """UserError, before anything loads, when an input's shape has an axis outside the
        package's ranges (its io.json; no torch): a run refused before its text encoders
        run, not at its first denoiser step. Fixed dimensions are the session's to check."""
        path = Path(path)
        if path.suffix != ".pt2":
            return
        io = _read_io(path)
        declared = {i["name"]: i["shape"] for i in io["inputs"]}
        for name, shape in shapes.items():
            if name in declared:
                check_shape(path, declared[name], io["axes"], name, shape, fixed=False)

    def _load_package(self, path: Path) -> AotiSession:
        torch = _import_torch()
        io = _read_io(path)
        compiled_for = io["device"]
        device = torch.device(self.device or compiled_for)
        if device.type != compiled_for:
            raise UserError(
                f"{path} was compiled for {compiled_for}, not {device.type}; run it with "
                f"--device {compiled_for} or export the bundle again on a {device.type} machine"
            )
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(
                f"{path} was compiled for CUDA, and torch {torch.__version__} sees no GPU here; "
                "run it on a GPU machine, or export again for the CPU"
            )
        if device.type == "cpu":
            from slimdiff.threads import configure_torch

            configure_torch(choose_threads(path.stat().st_size / 4, self.threads))
        # -1: the CPU, or the current CUDA device when none is named.
        index = device.index if device.index is not None else -1
        try:
            model = torch._inductor.aoti_load_package(str(path), device_index=index)
        except Exception as err:  # C++ loader errors surface as RuntimeError and others
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise UserError(
                f"{path}: torch {torch.__version__} could not load the AOTInductor package "
                f"({type(err).__name__}: {first}); packages load on the torch version and "
                f"device they were compiled with ({io.get('torch')}, {compiled_for}): {FIX}"
            ) from None
        log.debug("loaded %s on %s", path, device)
        return AotiSession(model, io, device, path)

    def _onnx_backend(self) -> Any:
        from slimdiff.runtime.backends.ort import OrtBackend

        device = self._onnx_device()
        if device not in self._ort:
            self._ort[device] = OrtBackend(name=f"{self.name}/ort-{device}", device=device,
                                           threads=self.threads)  # fmt: skip
        return self._ort[device]

    def _onnx_device(self) -> str:
        if self.device is not None:
            return "cpu" if self.device == "cpu" else "cuda"
        torch = _import_torch()
        if not torch.cuda.is_available():
            return "cpu"
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            return "cuda"
        log.warning(
            "backend %s: torch sees a GPU but onnxruntime has no CUDA EP; the bundle's ONNX "
            "components run on the CPU (pip install onnxruntime-gpu to run them on the GPU)",
            self.name,
        )
        return "cpu"


def axis_accepts(axis: dict, size: int) -> bool:
    """Whether an io.json axis range ({"min", "max"[, "multiple"]}) takes `size`."""
    return axis["min"] <= size <= axis["max"] and size % axis.get("multiple", 1) == 0


def axis_range_text(axis: dict, scale: int = 1) -> str:
    """ "4..62 in steps of 2" for an io.json axis range, sizes times `scale`."""
    step = axis.get("multiple", 1)
    text = f"{axis['min'] * scale}..{axis['max'] * scale}"
    return text + (f" in steps of {step * scale}" if step > 1 else "")


def _valid_axis(axis: dict) -> bool:
    bounds = (axis["min"], axis["max"], axis.get("multiple", 1))
    return all(isinstance(v, int) for v in bounds) and bounds[2] >= 1


def _read_io(path: Path) -> dict:
    """The package's io.json (hashed with the bundle's files), checked for what the session
    reads; BundleError, one line, if it is missing or malformed."""
    io_path = path.with_name(IO_NAME)
    if not io_path.is_file():
        raise BundleError(f"{io_path} is missing (the package's IO record); {FIX}")
    io = load_json_bytes(io_path.read_bytes(), str(io_path))
    try:
        axes = io["axes"]
        for spec in (*io["inputs"], *io["outputs"]):
            if not isinstance(spec["name"], str) or not isinstance(spec["shape"], list):
                raise ValueError(f"entry {spec!r}")
        for spec in io["inputs"]:
            if spec["dtype"] not in _NUMPY:
                raise ValueError(f"input dtype {spec['dtype']!r}")
            named = [d for d in spec["shape"] if not isinstance(d, int)]
            if not all(_valid_axis(axes[d]) for d in named):
                raise ValueError(f"axes of {spec['name']}")
        if io["device"] not in ("cpu", "cuda"):
            raise ValueError(f"device {io['device']!r}")
    except (ValueError, TypeError, KeyError) as err:
        raise BundleError(f"{io_path} is not a valid IO record ({err}); {FIX}") from None
    return io
