"""TensorRT-RTX backend ("trt-rtx"): onnxruntime with NVIDIA's TensorRT-RTX plugin EP.

TensorRT for RTX builds engines just in time on the user's GPU; NVIDIA ships it for
onnxruntime as a plugin execution provider, the PyPI package
`onnxruntime-ep-nv-tensorrt-rtx-cu13` (module `onnxruntime_ep_nv_tensorrt_rtx`, 0.5.0
bundles libtensorrt_rtx 1.7.1, its ONNX parser and cudart 13). Plain onnxruntime >= 1.24
loads it: `register_execution_provider_library(get_ep_name(), get_library_path())`, then
the session options take the EP for one of its devices (`ort.get_ep_devices()`) with
`add_provider_for_devices`. Sessions are the ORT backend's `OrtSession`.

Provider options (names from the package's tensorrt_rtx_provider_options.h):
`nv_profile_{min,opt,max}_shapes` from the manifest's profile, in trtexec's
"name:1x4x8x8,name2:..." form, and `nv_runtime_cache_path`, the folder TensorRT-RTX keeps
its compiled kernels in between sessions: <cache>/trt-rtx/<component digest>, in the user's
cache, never inside the bundle. `rtx_provider_options` computes them without the package.

Devices: the EP lists only GPUs TensorRT-RTX supports, which its header gives as compute
capability 8.6 (Ampere RTX), 8.9 (Ada) and 12.0 and newer (Blackwell): not data-centre
Hopper (sm_90, H100/H200) or Jetson Orin (sm_87). Elsewhere `load` says so in one line.

UNVERIFIED: no GPU and no EP package on the development machine; tests/gpu/test_trt_parity.py
compares it with ort-cpu where it runs.

Example:
    >>> session = TrtRtxBackend().load("bundle/unet/model.onnx")       # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from slimdiff.runtime.backends.ort import OrtSession
from slimdiff.runtime.manifest import ComponentEntry
from slimdiff.runtime.trt_build import (
    cache_root,
    onnx_component,
    profile_shapes,
    qdq_form,
    shapes_arg,
)

from slimdiff.errors import UserError

__all__ = ["EP_MODULE", "EP_NAME", "EP_PACKAGE", "TrtRtxBackend", "rtx_provider_options"]

log = logging.getLogger(__name__)

EP_PACKAGE = "onnxruntime-ep-nv-tensorrt-rtx-cu13"
EP_MODULE = "onnxruntime_ep_nv_tensorrt_rtx"
EP_NAME = "NvTensorRTRTXExecutionProvider"  # the package's get_ep_name()
INSTALL = f"pip install 'onnxruntime>=1.24' {EP_PACKAGE}"
_registered: set[str] = set()  # EP libraries registered in this process


def rtx_cache_dir(cache_dir: Path, digest: str) -> Path:
    """TensorRT-RTX's runtime cache folder for one component (by its graph digest)."""
    return cache_dir / "trt-rtx" / digest


def rtx_provider_options(
    entry: ComponentEntry, digest: str, cache_dir: Path, cuda_graph: bool = False
) -> dict[str, str]:
    """The EP's provider options for one component: its shape profile and cache folder.

    CUDA graphs stay off by default: the EP needs fixed input shapes across runs, and a
    session serves every size in the profile.

    Example:
        >>> rtx_provider_options(entry, "ab12...", Path("~/.cache/slimdiff"))  # doctest: +SKIP
        {'nv_profile_min_shapes': 'latent_sample:1x4x8x8', ...}
    """
    if entry.precision in ("int8", "int4") and qdq_form(entry) != "tensorrt":
        raise UserError(
            f"{entry.path}: this {entry.precision} graph uses onnxruntime's asymmetric Q/DQ "
            "form, which TensorRT-RTX cannot build: export with `--target tensorrt` "
            "(or `--qdq tensorrt`)"
        )
    shapes = profile_shapes(entry)
    options = {
        f"nv_profile_{point}_shapes": shapes_arg({name: s[i] for name, *s in shapes})
        for i, point in enumerate(("min", "opt", "max"))
    }
    options["nv_runtime_cache_path"] = str(rtx_cache_dir(cache_dir, digest))
    options["enable_cuda_graph"] = "1" if cuda_graph else "0"
    return options


def _import_ep() -> tuple[Any, Any]:
    """(onnxruntime, the EP package); one UserError line naming what to install."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError(f"backend trt-rtx needs onnxruntime: {INSTALL}") from None
    if not hasattr(ort, "register_execution_provider_library"):
        raise UserError(
            f"backend trt-rtx needs onnxruntime >= 1.24 for plugin execution providers "
            f"(this is {ort.__version__}): {INSTALL}"
        )
    try:
        import onnxruntime_ep_nv_tensorrt_rtx as ep
    except ImportError:
        raise UserError(
            f"backend trt-rtx needs the TensorRT-RTX execution provider for onnxruntime, "
            f"which is not installed: {INSTALL}"
        ) from None
    return ort, ep


class TrtRtxBackend:
    """Loads bundle graphs into onnxruntime sessions on the TensorRT-RTX EP.

    `device_id` picks among the GPUs the EP lists (in its order); `cache_dir` is the
    slimdiff cache root (default: trt_build.cache_root()).
    """

    def __init__(
        self,
        name: str = "trt-rtx",
        device_id: int = 0,
        cache_dir: str | Path | None = None,
        cuda_graph: bool = False,
    ) -> None:
        self.name = name
        self.device_id = device_id
        self.cache_dir = Path(cache_dir) if cache_dir is not None else cache_root()
        self.cuda_graph = cuda_graph
        self._ort, self._ep = _import_ep()
        self.ep_name = self._ep.get_ep_name()
        if self.ep_name not in _registered:
            try:
                self._ort.register_execution_provider_library(
                    self.ep_name, self._ep.get_library_path()
                )
            except Exception as err:  # onnxruntime raises its own, unexported classes
                raise UserError(
                    f"backend trt-rtx: onnxruntime could not load the TensorRT-RTX EP "
                    f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                    f"reinstall it: {INSTALL}"
                ) from None
            _registered.add(self.ep_name)

    def _device(self) -> Any:
        devices = [d for d in self._ort.get_ep_devices() if d.ep_name == self.ep_name]
        if not devices:
            raise UserError(
                "backend trt-rtx: TensorRT-RTX sees no GPU it supports (it runs on RTX GPUs "
                "of compute capability 8.6, 8.9 or 12.0+, with a CUDA 13 driver); use "
                "--backend trt or ort-cuda on this machine"
            )
        if self.device_id >= len(devices):
            raise UserError(
                f"backend trt-rtx: device {self.device_id} asked for, TensorRT-RTX lists "
                f"{len(devices)} GPU(s)"
            )
        return devices[self.device_id]

    def shape_bound(self, path: str | Path) -> bool:
        """True: the EP's engine runs only the shapes of the manifest's profile."""
        return True

    def load(self, path: str | Path) -> OrtSession:
        """Load bundle graph `path` (the first load builds its engine: minutes for a UNet)."""
        path = Path(path)
        _, entry, digest = onnx_component(path)
        options = rtx_provider_options(entry, digest, self.cache_dir, self.cuda_graph)
        Path(options["nv_runtime_cache_path"]).mkdir(parents=True, exist_ok=True)
        session_options = self._ort.SessionOptions()
        session_options.log_severity_level = 3
        session_options.add_provider_for_devices([self._device()], options)
        try:
            session = self._ort.InferenceSession(str(path), sess_options=session_options)
        except Exception as err:  # onnxruntime raises its own exception classes, unexported
            raise UserError(
                f"{path}: onnxruntime with TensorRT-RTX could not load it ({type(err).__name__}"
                f": {str(err).splitlines()[0] if str(err) else ''}); export the bundle again "
                "with `--target tensorrt`, or use --backend ort-cuda"
            ) from None
        if self.ep_name not in session.get_providers():
            raise UserError(
                f"backend trt-rtx: the TensorRT-RTX EP did not take {path} (onnxruntime fell "
                f"back to {', '.join(session.get_providers())})"
            )
        log.debug("loaded %s on %s, cache %s", path, self.ep_name, options["nv_runtime_cache_path"])
        return OrtSession(session, path)
