"""The TensorRT engine build and the CUDA calls around it (TensorRT and cuda-python, both
imported lazily, on first use).

What a build is made of (profiles, flags, cache key, the EngineRecord) is computed without
TensorRT in runtime/trt_build.py; this module runs it: `build_engine` parses the bundle's
ONNX, applies `builder_flags` and the profile, and writes the plan and its record.

UNVERIFIED: written against TensorRT 10.x/11.x's Python API; TensorRT cannot be installed on
the development machines (tests/gpu/test_trt_parity.py runs it where it can).
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from slimdiff.runtime.manifest import ComponentEntry, sha256_file
from slimdiff.runtime.trt_build import (
    TRT_INSTALL,
    EngineRecord,
    builder_flags,
    normalize_sm,
    profile_json,
    profile_shapes,
    qdq_form,
    record_path,
    write_record,
)

from slimdiff.errors import UserError
from slimdiff.fsutil import atomic_write_bytes

__all__ = [
    "build_engine",
    "cuda_call",
    "gpu_compute_capability",
    "import_cudart",
    "import_tensorrt",
    "trt_major",
]

log = logging.getLogger(__name__)


def import_tensorrt() -> Any:
    """The tensorrt module; a UserError naming what to install if it is missing."""
    try:
        import tensorrt
    except ImportError:
        raise UserError(f"backend trt needs TensorRT's Python package: {TRT_INSTALL}") from None
    return tensorrt


def trt_major(version: str) -> int:
    return int(version.split(".")[0])


def import_cudart() -> Any:
    """cuda-python's CUDA runtime bindings (cuda.bindings.runtime; `cuda.cudart` before
    cuda-python 12.6); a UserError naming what to install if missing."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise UserError(
                f"backend trt needs cuda-python for GPU memory and streams: {TRT_INSTALL}"
            ) from None
    return cudart


def cuda_call(cudart: Any, result: Any, what: str) -> Any:
    """Unpack a cuda-python call's (error, *values); RuntimeError naming `what` on error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        name = getattr(err, "name", str(err))
        if name in ("cudaErrorNoDevice", "cudaErrorInsufficientDriver"):
            raise UserError(f"backend trt: no usable CUDA GPU ({what}: {name})")
        raise RuntimeError(f"CUDA {what} failed: {name}")
    return values[0] if len(values) == 1 else tuple(values) or None


def gpu_compute_capability(device_id: int = 0) -> str:
    """The compute capability of CUDA device `device_id`, as "sm_90". UNVERIFIED here."""
    cudart = import_cudart()
    attrs = cudart.cudaDeviceAttr
    major = cuda_call(
        cudart,
        cudart.cudaDeviceGetAttribute(attrs.cudaDevAttrComputeCapabilityMajor, device_id),
        "cudaDeviceGetAttribute",
    )
    minor = cuda_call(
        cudart,
        cudart.cudaDeviceGetAttribute(attrs.cudaDevAttrComputeCapabilityMinor, device_id),
        "cudaDeviceGetAttribute",
    )
    return normalize_sm((int(major), int(minor)))


def build_engine(
    onnx_path: str | Path,
    entry: ComponentEntry,
    out_plan: str | Path,
    timing_cache_path: str | Path | None,
    workspace_bytes: int | None = None,
    *,
    onnx_sha256: str | None = None,
    compute_capability: str | None = None,
    device_id: int = 0,
) -> EngineRecord:
    """Build `onnx_path` (external data beside it) into a TensorRT plan at `out_plan`.

    Applies `builder_flags` and the manifest's optimization profile, reads and updates the
    timing cache file (per TensorRT version and GPU: NVIDIA warns that caches from other
    GPUs degrade engines), writes the plan atomically, then its EngineRecord beside it (a
    plan without a record counts as missing). `onnx_sha256` defaults to the file's SHA-256
    (the trt backend passes `component_digest`), `compute_capability` to device
    `device_id`'s. Returns the record.

    UNVERIFIED: written against TensorRT 10.x/11.x's Python API and never run here (no
    GPU, no TensorRT on the development machine); tests/gpu/test_trt_parity.py runs it.
    """
    trt = import_tensorrt()
    onnx_path, out_plan = Path(onnx_path), Path(out_plan)
    version = trt.__version__
    plan = builder_flags(entry.precision, trt_major(version), qdq_form(entry))
    shapes = profile_shapes(entry)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 11 types every network strongly and ignores the flag; tolerate its removal.
    strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    flags = 1 << int(strong) if plan.strongly_typed and strong is not None else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data beside the file
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        first = errors[0].splitlines()[0] if errors else "no error reported"
        raise UserError(
            f"{onnx_path}: TensorRT {version} could not parse it ({first}); export the bundle "
            "again with `--target tensorrt`"
        )
    config = builder.create_builder_config()
    for flag in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    profile = builder.create_optimization_profile()
    for name, lo, opt, hi in shapes:
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    timing = _load_timing_cache(config, Path(timing_cache_path) if timing_cache_path else None)

    log.info("building a TensorRT %s engine for %s (minutes for a UNet)", version, onnx_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(
            f"{onnx_path}: TensorRT {version} failed to build an engine (its log above says "
            "why); try a smaller --max-size, or another precision"
        )
    data = bytes(memoryview(serialized))
    atomic_write_bytes(out_plan, data)
    if timing_cache_path and timing is not None:
        atomic_write_bytes(Path(timing_cache_path), bytes(memoryview(timing.serialize())))
    digest = onnx_sha256 or sha256_file(onnx_path)
    sm = normalize_sm(compute_capability or gpu_compute_capability(device_id))
    record = EngineRecord(
        key=out_plan.stem,
        onnx_sha256=digest,
        tensorrt_version=version,
        compute_capability=sm,
        precision=entry.precision,
        strongly_typed=plan.strongly_typed,
        flags=plan.flags,
        profile=profile_json(shapes),
        plan_sha256=hashlib.sha256(data).hexdigest(),
        plan_bytes=len(data),
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    write_record(record_path(out_plan), record)
    return record


def _parser_error(error: Any) -> str:
    return str(error.desc()) if hasattr(error, "desc") else str(error)


def _load_timing_cache(config: Any, path: Path | None) -> Any:
    """Give the builder the timing cache at `path` (an empty one if absent or unusable)."""
    if path is None:
        return None
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s does not fit this TensorRT/GPU; starting a new one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return config.get_timing_cache()
