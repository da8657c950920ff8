"""TensorRT backend ("trt"): engines built from a bundle's ONNX on the GPU that runs them.

`load(path)` takes a component's ONNX path inside a bundle (as the pipeline passes it),
finds its manifest entry, and looks for a cached engine at
<cache>/engines/<key>.plan, the key hashing the graph, TensorRT's version, the GPU's
compute capability, the build flags and the shape profile (runtime/trt_build.py). A plan
whose record says it was built elsewhere is refused with one line; a missing one is built
(minutes for a UNet) and cached. Nothing is written inside the bundle.

A `TensorRTSession` holds one CUDA stream and one device buffer per IO tensor, sized for
the profile's max shapes, so tensor addresses never change. `run` copies numpy inputs to
the GPU, sets the input shapes, runs `execute_async_v3` and copies the outputs back. The
first call at a set of shapes runs plainly (warm-up: TensorRT finishes its shape-dependent
setup); the second captures the execution into a CUDA graph, which later calls with the
same shapes replay (the denoising loop calls the UNet at one shape every step), as
demoDiffusion does. New shapes drop the graph and start over. Threads sharing a session
take turns: `run` holds the session's lock from the input copies to the output copies.

UNVERIFIED: written against TensorRT 10.x (Jetson JetPack 6 has 10.3) and 11.x's Python API
and cuda-python's runtime bindings, and never run here: the development machine has no GPU
and cannot install TensorRT. tests/gpu/test_trt_parity.py checks it against ort-cpu where
both exist. What runs without them (the cache lookup, record checks, profile range checks)
is unit-tested in tests/unit/test_tensorrt.py.

Example:
    >>> session = TensorRTBackend().load("bundle/unet/model.onnx")     # doctest: +SKIP
    >>> session.run(feeds)["out_sample"].shape                          # doctest: +SKIP
    (2, 4, 64, 64)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from slimdiff.runtime.backends import check_feeds
from slimdiff.runtime.manifest import BundleError, ComponentEntry
from slimdiff.runtime.trt_build import (
    BuilderPlan,
    ProfileShapes,
    builder_flags,
    cache_key,
    cache_root,
    check_record,
    onnx_component,
    profile_shapes,
    qdq_form,
    read_record,
    record_path,
)
from slimdiff.runtime.trt_engine import (
    build_engine,
    cuda_call,
    gpu_compute_capability,
    import_cudart,
    import_tensorrt,
    trt_major,
)

from slimdiff.errors import UserError

__all__ = ["DeviceInfo", "EngineLocation", "TensorRTBackend", "TensorRTSession"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceInfo:
    """What an engine is tied to: the TensorRT version and the GPU's compute capability."""

    tensorrt_version: str  # trt.__version__
    compute_capability: str  # "sm_90"

    @classmethod
    def probe(cls, device_id: int = 0) -> DeviceInfo:
        """This machine's, from tensorrt and cuda-python (UserError if either is missing)."""
        trt = import_tensorrt()
        return cls(trt.__version__, gpu_compute_capability(device_id))


@dataclass(frozen=True)
class EngineLocation:
    """Where one component's engine is cached, and what it is built from."""

    onnx_path: Path
    name: str  # the component
    entry: ComponentEntry
    onnx_sha256: str  # trt_build.component_digest
    plan: BuilderPlan
    profile: ProfileShapes
    key: str
    plan_path: Path
    record_path: Path


class TensorRTBackend:
    """Runs bundle components as TensorRT engines, built on first use and cached.

    `cache_dir` is the slimdiff cache root (default: trt_build.cache_root()); engines go to
    <cache_dir>/engines. `device` is the TensorRT version and compute capability engines
    are looked up for; None probes this machine (importing tensorrt and cuda-python now, so
    a missing library fails before any bundle is hashed).
    """

    def __init__(
        self,
        name: str = "trt",
        device_id: int = 0,
        cache_dir: str | Path | None = None,
        device: DeviceInfo | None = None,
        workspace_bytes: int | None = None,
    ) -> None:
        self.name = name
        self.device_id = device_id
        self.cache_dir = Path(cache_dir) if cache_dir is not None else cache_root()
        self.workspace_bytes = workspace_bytes
        self.device = device or DeviceInfo.probe(device_id)

    @property
    def engine_dir(self) -> Path:
        return self.cache_dir / "engines"

    def locate(self, path: str | Path) -> EngineLocation:
        """Where the engine for graph `path` (inside a bundle) is cached; needs no TensorRT."""
        path = Path(path)
        name, entry, digest = onnx_component(path)
        version = self.device.tensorrt_version
        plan = builder_flags(entry.precision, trt_major(version), qdq_form(entry))
        profile = profile_shapes(entry)
        key = cache_key(digest, version, self.device.compute_capability, plan, profile)
        plan_path = self.engine_dir / f"{key}.plan"
        return EngineLocation(
            path, name, entry, digest, plan, profile, key, plan_path, record_path(plan_path)
        )

    def cached_engine(self, where: EngineLocation) -> Path | None:
        """The cached plan for `where` if there is one built for this device (else a
        one-line UserError saying what it was built for); None if there is none yet."""
        if not (where.plan_path.is_file() and where.record_path.is_file()):
            return None
        record = read_record(where.record_path)
        check_record(
            record,
            self.device.tensorrt_version,
            self.device.compute_capability,
            where.onnx_sha256,
            where.plan_path,
        )
        return where.plan_path

    def shape_bound(self, path: str | Path) -> bool:
        """True: an engine runs only the shapes of the manifest's profile."""
        return True

    def load(self, path: str | Path) -> TensorRTSession:
        """The engine for bundle graph `path`: cached, or built now and cached."""
        where = self.locate(path)
        plan_path = self.cached_engine(where)
        if plan_path is None:
            trt = import_tensorrt()
            cudart = import_cudart()
            cuda_call(cudart, cudart.cudaSetDevice(self.device_id), "cudaSetDevice")
            self.engine_dir.mkdir(parents=True, exist_ok=True)
            sm = self.device.compute_capability
            build_engine(
                where.onnx_path,
                where.entry,
                where.plan_path,
                self.engine_dir / f"timing-{trt.__version__}-{sm}.cache",
                self.workspace_bytes,
                onnx_sha256=where.onnx_sha256,
                compute_capability=sm,
            )
            plan_path = where.plan_path
        data = plan_path.read_bytes()
        record = read_record(where.record_path)
        if hashlib.sha256(data).hexdigest() != record.plan_sha256:
            raise UserError(
                f"engine {plan_path} does not match its record (changed or truncated since "
                "it was built): delete it to rebuild"
            )
        return TensorRTSession(data, where, self.device_id)


class TensorRTSession:
    """One deserialized engine behind the runtime's numpy `Session` interface. UNVERIFIED."""

    def __init__(self, plan: bytes, where: EngineLocation, device_id: int = 0) -> None:
        trt = import_tensorrt()
        self._cudart = cudart = import_cudart()
        self.path = where.onnx_path
        self._where = where
        cuda_call(cudart, cudart.cudaSetDevice(device_id), "cudaSetDevice")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise UserError(
                f"engine {where.plan_path} could not be deserialized by TensorRT "
                f"{trt.__version__} (its log above says why): delete it to rebuild"
            )
        self._context = self._engine.create_execution_context()
        engine = self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self._dtypes = {n: _numpy_dtype(trt, engine.get_tensor_dtype(n), n, where) for n in names}
        self.input_dtypes = {n: self._dtypes[n] for n in self.input_names}
        self._range = {name: (lo, hi) for name, lo, _, hi in where.profile}

        self._stream = cuda_call(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._handle = int(self._stream)  # TensorRT takes the cudaStream_t as an integer
        self._buffers: dict[str, int] = {}
        self._graph = self._graph_exec = None
        self._graph_shapes: tuple | None = None  # the shapes the graph was captured at
        self._last_shapes: tuple | None = None
        self._graphs_ok = True
        # One run at a time: the execution context, the stream, the device buffers and the
        # graph are this session's only ones, so two threads would overwrite each other's
        # inputs and launch one graph twice at once (CUDA forbids it). UNVERIFIED like the
        # rest of this class; the minimal change is a lock around `run`'s device work.
        self._lock = threading.Lock()
        # Buffers for the largest run: every input at its max shape, outputs as the engine
        # infers them from those (output sizes grow with input sizes in these graphs).
        for name, _, _, hi in where.profile:
            self._context.set_input_shape(name, hi)
        for name in names:
            shape = tuple(self._context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BundleError(
                    f"{self.path}: tensor {name!r} has a data-dependent shape {shape}, which "
                    "this backend cannot size buffers for; export the bundle again"
                )
            nbytes = max(1, int(np.prod(shape)) * self._dtypes[name].itemsize)
            ptr = cuda_call(cudart, cudart.cudaMalloc(nbytes), "cudaMalloc")
            self._buffers[name] = int(ptr)
            self._context.set_tensor_address(name, int(ptr))

    @property
    def graph_captured(self) -> bool:
        """Whether a CUDA graph is held for the last shapes run (replayed at the same ones)."""
        return self._graph_exec is not None and self._graph_shapes == self._last_shapes

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the engine on numpy `feeds`; inputs are cast to the engine's dtypes."""
        check_feeds(self.path, feeds, self.input_names)
        cudart, stream = self._cudart, self._stream
        arrays = {
            n: np.ascontiguousarray(feeds[n], dtype=self.input_dtypes[n]) for n in self.input_names
        }
        for name, array in arrays.items():
            check_in_profile(name, array.shape, *self._range[name], self.path)
        with self._lock:
            shapes = tuple(arrays[n].shape for n in self.input_names)
            if shapes != self._last_shapes:
                for name, array in arrays.items():
                    if not self._context.set_input_shape(name, array.shape):
                        raise RuntimeError(f"{self.path}: TensorRT refused shape {array.shape}")
            h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            for name, array in arrays.items():
                if array.nbytes:
                    cuda_call(
                        cudart,
                        cudart.cudaMemcpyAsync(
                            self._buffers[name], array.ctypes.data, array.nbytes, h2d, stream
                        ),
                        "cudaMemcpyAsync (host to device)",
                    )
            self._execute(shapes)
            outputs = {
                n: np.empty(tuple(self._context.get_tensor_shape(n)), self._dtypes[n])
                for n in self.output_names
            }
            d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            for name, out in outputs.items():
                if out.nbytes:
                    cuda_call(
                        cudart,
                        cudart.cudaMemcpyAsync(
                            out.ctypes.data, self._buffers[name], out.nbytes, d2h, stream
                        ),
                        "cudaMemcpyAsync (device to host)",
                    )
            cuda_call(cudart, cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
            return outputs

    def _execute(self, shapes: tuple) -> None:
        """Plain execution at new shapes; at repeated ones, capture a CUDA graph, then replay."""
        cudart, stream = self._cudart, self._stream
        if self._graph_exec is not None and shapes == self._graph_shapes:
            cuda_call(cudart, cudart.cudaGraphLaunch(self._graph_exec, stream), "cudaGraphLaunch")
            return
        if self._graphs_ok and shapes == self._last_shapes:
            self._drop_graph()
            if self._capture():
                self._graph_shapes = shapes
                cuda_call(
                    cudart, cudart.cudaGraphLaunch(self._graph_exec, stream), "cudaGraphLaunch"
                )
                return
        self._last_shapes = shapes
        if not self._context.execute_async_v3(self._handle):
            raise RuntimeError(f"{self.path}: TensorRT execute_async_v3 failed (see its log)")

    def _capture(self) -> bool:
        """Capture one execute_async_v3 into a CUDA graph; False (graphs off for this
        session) where the engine cannot be captured."""
        cudart, stream = self._cudart, self._stream
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
        try:
            cuda_call(cudart, cudart.cudaStreamBeginCapture(stream, mode), "BeginCapture")
            ok = self._context.execute_async_v3(self._handle)
            graph = cuda_call(cudart, cudart.cudaStreamEndCapture(stream), "EndCapture")
            if not ok or graph is None:
                raise RuntimeError("execute_async_v3 failed during capture")
            self._graph = graph
            self._graph_exec = cuda_call(
                cudart, cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate"
            )
            return True
        except RuntimeError as err:
            log.warning("%s: CUDA graph capture failed (%s); running without", self.path, err)
            self._graphs_ok = False
            self._drop_graph()
            return False

    def _drop_graph(self) -> None:
        cudart = self._cudart
        if self._graph_exec is not None:
            cudart.cudaGraphExecDestroy(self._graph_exec)
        if self._graph is not None:
            cudart.cudaGraphDestroy(self._graph)
        self._graph = self._graph_exec = None
        self._graph_shapes = None

    def close(self) -> None:
        """Free the CUDA graph, the buffers and the stream (also done on garbage collection)."""
        if getattr(self, "_cudart", None) is None:
            return
        self._drop_graph()
        for ptr in getattr(self, "_buffers", {}).values():
            self._cudart.cudaFree(ptr)
        self._buffers = {}
        if getattr(self, "_stream", None) is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        self._cudart = None

    def __del__(self) -> None:
        # At interpreter shutdown the bindings may be gone already.
        with contextlib.suppress(Exception):
            self.close()


def check_in_profile(
    name: str, shape: tuple[int, ...], lo: tuple[int, ...], hi: tuple[int, ...], path: Path
) -> None:
    """One UserError line when a feed's shape is outside the engine's min..max profile."""
    inside = len(shape) == len(lo) and all(
        a <= d <= b for d, a, b in zip(shape, lo, hi, strict=True)
    )
    if not inside:
        fmt = "x".join
        raise UserError(
            f"{path}: input {name!r} has shape {fmt(map(str, shape)) or 'scalar'}, outside "
            f"the range this bundle was built for ({fmt(map(str, lo))} .. {fmt(map(str, hi))}); "
            "export the bundle with --min-size/--max-size covering the sizes you run"
        )


def _numpy_dtype(trt: Any, dtype: Any, name: str, where: EngineLocation) -> np.dtype:
    try:
        return np.dtype(trt.nptype(dtype))
    except TypeError:
        # bfloat16 (and fp8) tensors have no numpy dtype; the exporter keeps IO float32.
        raise BundleError(
            f"{where.onnx_path}: tensor {name!r} is {dtype}, which numpy cannot carry; "
            "export the bundle again with this slimdiff"
        ) from None
