"""onnxruntime backend: "ort-cpu" (CPUExecutionProvider) and "ort-cuda" (CUDAExecutionProvider).

onnxruntime is imported here, when a backend is built, never at `import slimdiff.runtime`:
a machine that only inspects bundles needs no onnxruntime, and the CPU and GPU wheels
(`onnxruntime`, `onnxruntime-gpu`) are different distributions that users pick.

Every session gets its threads from `slimdiff.threads`: `choose_threads` on the graph's
parameter count (its weight bytes, counted as fp32), or IMAGE work for a VAE (convolutions
on full-resolution activations: never capped as a tiny model), unless the backend was given
`threads=` or SLIMDIFF_THREADS is set, and no spinning between operators (on a shared
2-CPU machine spinning made a toy:shapes step 1.7x slower; see slimdiff/threads.py).

The graphs a pipeline runs once per image (text encoders, VAE) shrink onnxruntime's memory
arenas after each run (the run option `memory.enable_memory_arena_shrinkage`): otherwise a
resident pipeline keeps a VAE decode's activations for its whole life. Measured 2026-12-07
on the 2-CPU KVM Xeon of slimdiff/threads.py: an SD VAE decoder (diffusers AutoencoderKL,
49.5M parameters, fp32 ONNX) in a `vae_decoder/` folder, `OrtBackend("ort-cpu",
threads=1).load(...)`, three 512x512 decodes, VmRSS after each (gc and
slimdiff.memory.release_memory between), two processes per setting: without shrinkage
1325, 2253, 2253 MB; with it 278 MB after each; decode times alike (30-39 s both, on a
machine others shared). The denoiser keeps its arena: it runs the same shapes at every
step, and would pay the allocations again at each.

Example:
    >>> session = OrtBackend("ort-cpu").load("bundle/vae_decoder/model.onnx")  # doctest: +SKIP
    >>> session.run({"latent_sample": z})["sample"].shape                       # doctest: +SKIP
    (1, 3, 512, 512)
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from slimdiff.runtime.backends import check_feeds
from slimdiff.runtime.backends.ort_binding import BoundRunner
from slimdiff.runtime.manifest import FIX, VAE_DECODER, VAE_ENCODER, BundleError

from slimdiff.errors import UserError, out_of_memory
from slimdiff.threads import IMAGE, choose_threads, ort_session_options

__all__ = ["OrtBackend", "OrtSession"]

log = logging.getLogger(__name__)

# ONNX tensor type strings as onnxruntime reports them -> numpy dtypes.
_ORT_DTYPES = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
}
# Legitimate ONNX input types that numpy feeds cannot carry, with the reason.
_UNFEEDABLE = {
    "tensor(bfloat16)": "numpy has no bfloat16 dtype",
    "tensor(string)": "the runtime tokenizes text itself and feeds token ids",
}

# The manifest's dtype names of the ONNX types onnxruntime reports (output_dtypes).
_DTYPE_NAMES = {t: str(d) for t, d in _ORT_DTYPES.items()} | {"tensor(bfloat16)": "bfloat16"}

# Bundle folders are named after their manifest keys (export/components.py), so a graph's
# folder says what the pipeline runs it for. The VAE's convolutions run on full-resolution
# activations: IMAGE work for the thread policy, whatever its parameter count.
_IMAGE_COMPONENTS = frozenset({VAE_DECODER, VAE_ENCODER})
_TEXT_COMPONENT = "text_encoder"  # text_encoder, text_encoder_2, text_encoder_3
_SHRINK_ARENAS = "memory.enable_memory_arena_shrinkage"
# Where onnxruntime's own exception classes (Fail, InvalidArgument, ...) live: unexported,
# so a run's failure is told from a bug in the runtime by this module name.
_ORT_ERRORS = "onnxruntime.capi.onnxruntime_pybind11_state"

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_INSTALL = {
    "cpu": "pip install 'slimdiff[cpu]' (onnxruntime)",
    "cuda": "pip install 'slimdiff[gpu]' (onnxruntime-gpu; pip uninstall onnxruntime first: "
    "both write the one onnxruntime module)",
}


def _both_installed() -> str:
    """The fix when both onnxruntime and onnxruntime-gpu are installed: they write the same
    `onnxruntime` module, and whichever was installed last decides whether the CUDA EP is
    there (ORT's install guide: never both). Empty when they are not."""
    try:
        importlib.metadata.version("onnxruntime")
        importlib.metadata.version("onnxruntime-gpu")
    except importlib.metadata.PackageNotFoundError:
        return ""
    return (
        "; onnxruntime and onnxruntime-gpu are both installed and overwrite each other's "
        "module: pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
    )


def _import_ort(device: str) -> Any:
    try:
        import onnxruntime
    except ImportError as err:
        # on the path (not sys.modules, where a failed import may have left it)?
        if importlib.machinery.PathFinder.find_spec("onnxruntime") is None:
            raise UserError(
                f"backend ort-{device} needs onnxruntime, which is not installed: "
                f"{_INSTALL[device]}"
            ) from None
        # installed but broken (a missing system library, a half-removed install)
        raise UserError(
            f"backend ort-{device}: onnxruntime is installed but does not import "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); fix "
            f"what that names, or reinstall it: {_INSTALL[device]}"
        ) from None
    return onnxruntime


def _preload_cuda_libraries(ort: Any) -> None:
    """Load CUDA and cuDNN for onnxruntime-gpu from the pip `nvidia-*` packages (or torch's)
    when no system CUDA is on the loader path: `onnxruntime.preload_dlls` (ORT >= 1.21),
    as ORT's CUDA EP documentation advises. Without it the CUDA EP fails to load and ORT
    falls back to the CPU (which `load` refuses). Unverified on a GPU here."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as err:  # best effort: a system CUDA may still serve the session
        log.debug("onnxruntime.preload_dlls failed (%s); relying on the loader path", err)


class OrtSession:
    """An `onnxruntime.InferenceSession` behind the runtime's numpy `Session` interface.

    Besides the Session protocol it reports what the graph declares, for the load check
    against the manifest (runtime/sessions.py): `input_shapes` and `output_shapes` (a dim
    is an int, an axis name, or None where onnxruntime cannot tell) and `output_dtypes`
    (manifest dtype names, or onnxruntime's type string for a type the manifest has no
    name for, e.g. "tensor(string)"). `run_options` are onnxruntime run config entries
    given to every run.
    """

    def __init__(self, session: Any, path: Path, run_options: Any = None) -> None:
        self._session = session
        self._bound: BoundRunner | None = None  # IO binding (ort-cuda); None: numpy runs
        self._run_options = run_options
        self.path = path
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self.input_dtypes = {
            i.name: _input_dtype(i.name, i.type, path) for i in session.get_inputs()
        }
        self.input_shapes = {i.name: _shape(i.shape) for i in session.get_inputs()}
        self.output_shapes = {o.name: _shape(o.shape) for o in session.get_outputs()}
        self.output_dtypes = {
            o.name: _DTYPE_NAMES.get(o.type, o.type) for o in session.get_outputs()
        }

    def bind(self, runner: BoundRunner) -> None:
        """Run through `runner` (IO binding) from now on."""
        self._bound = runner

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers())

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph; inputs are cast to the graph's dtypes, extra feeds are an error."""
        check_feeds(self.path, feeds, self.input_names)
        cast = {
            name: np.ascontiguousarray(value, dtype=self.input_dtypes[name])
            for name, value in feeds.items()
        }
        try:
            if self._bound is not None:
                outputs = self._bound.run(cast)
            else:
                outputs = self._session.run(None, cast, self._run_options)
        except Exception as err:
            if type(err).__module__ != _ORT_ERRORS or out_of_memory(err, None) is not None:
                raise  # a bug keeps its traceback; the CLI names the memory fix
            log.debug("%s failed to run", self.path, exc_info=True)
            raise _run_failure(self.path, err) from None
        return dict(zip(self.output_names, outputs, strict=True))


def _run_failure(path: Path, err: Exception) -> BundleError:
    """One line for onnxruntime failing inside a run of the graph at `path` (a Gather index
    out of range, a shape the next node does not take): feeds the runtime built from the
    manifest and tokenizer that the graph does not take. Exit code 1: found while running,
    not by a check of the bundle (the load checks what it can, runtime/sessions.py)."""
    component = path.parent.name
    first = str(err).splitlines()[0] if str(err) else ""
    # a text encoder's ids come from the bundle's tokenizer: ids beyond the graph's
    # vocabulary fail in its first Gather
    others = "tokenizer or manifest" if component.startswith(_TEXT_COMPONENT) else "manifest"
    error = BundleError(
        f"{path}: onnxruntime failed running the {component} graph ({type(err).__name__}: "
        f"{first}); the bundle's {component} graph and its {others} disagree; {FIX}"
    )
    error.exit_code = 1
    return error


def _shape(shape: Any) -> list[int | str | None] | None:
    """onnxruntime's NodeArg.shape as a list (None: it knows not even the rank)."""
    return list(shape) if shape is not None else None


def _input_dtype(name: str, ort_type: str, path: Path) -> np.dtype:
    """The numpy dtype to feed input `name`; a type the runtime cannot feed is an error."""
    if ort_type in _ORT_DTYPES:
        return _ORT_DTYPES[ort_type]
    why = _UNFEEDABLE.get(ort_type, "the runtime does not know this type")
    raise BundleError(
        f"{path}: input {name!r} has type {ort_type}, which numpy feeds cannot carry ({why}); "
        "export the bundle again with this slimdiff"
    )


def _thread_work(path: Path) -> float | str:
    """What `choose_threads` decides from for the graph at `path`: IMAGE for a VAE (its
    bundle folder's name), else its parameter count."""
    return IMAGE if path.parent.name in _IMAGE_COMPONENTS else _weight_params(path)


def _once_per_image(path: Path) -> bool:
    """Whether the pipeline runs the graph at `path` once per image (text encoders, VAE),
    not at every step."""
    component = path.parent.name
    return component in _IMAGE_COMPONENTS or component.startswith(_TEXT_COMPONENT)


def _weight_params(path: Path) -> float:
    """A graph's parameter count, estimated from its bytes (the .onnx file and the
    `<name>.data` file the exporter writes beside it) as fp32: enough to tell a toy from a
    real model."""
    files = (path, path.with_name(path.name + ".data"))
    return sum(f.stat().st_size for f in files if f.is_file()) / 4


class OrtBackend:
    """Loads ONNX files with onnxruntime on the CPU or a CUDA GPU.

    `threads` fixes every session's intra-op threads; None leaves the choice to
    `slimdiff.threads.choose_threads` (SLIMDIFF_THREADS, else the graph's size and the
    CPUs free).

    On CUDA every session runs through IO binding (runtime/backends/ort_binding.py):
    read-only feeds, the pipeline's text conditioning, are copied to the GPU once per
    image, and outputs are copied back once. `cuda_graph` (default: SLIMDIFF_CUDA_GRAPH=1
    in the environment) also captures each graph once per input shape and replays it;
    every node must then run on the CUDA EP. Both are unverified on a GPU here.

    Example:
        >>> OrtBackend("ort-cpu").providers
        ['CPUExecutionProvider']
    """

    def __init__(
        self,
        name: str = "ort-cpu",
        device: str = "cpu",
        device_id: int = 0,
        threads: int | None = None,
        cuda_graph: bool | None = None,
        bind: bool | None = None,
    ) -> None:
        if device not in _PROVIDERS:
            raise ValueError(f"device must be one of {sorted(_PROVIDERS)}, not {device!r}")
        self.name = name
        self.device = device
        self.threads = threads
        self.device_id = device_id
        if cuda_graph is None:
            cuda_graph = os.environ.get("SLIMDIFF_CUDA_GRAPH", "0") == "1"
        self.cuda_graph = cuda_graph and device == "cuda"
        # IO binding: on CUDA by default; `bind=True` on the CPU runs the same code (tests).
        self.bind = device == "cuda" if bind is None else bind
        self._ort = _import_ort(device)
        available = self._ort.get_available_providers()
        if _PROVIDERS[device] not in available:
            raise UserError(
                f"backend {name}: this onnxruntime ({self._ort.__version__}) has no "
                f"{_PROVIDERS[device]} (it has {', '.join(available)}); {_INSTALL[device]}"
                f"{_both_installed()}"
            )
        if device == "cuda":
            _preload_cuda_libraries(self._ort)
            # CPU stays as the fallback for the few ops the CUDA EP does not implement.
            cuda_options = {"device_id": device_id}
            if self.cuda_graph:
                cuda_options["enable_cuda_graph"] = "1"
            self.providers = [(_PROVIDERS["cuda"], cuda_options), _PROVIDERS["cpu"]]
        else:
            self.providers = [_PROVIDERS["cpu"]]

    def load(self, path: str | Path) -> OrtSession:
        """Load one ONNX file (its external-data file must sit beside it)."""
        path = Path(path)
        options = self._ort.SessionOptions()
        # ORT's warnings are not the user's concern, and its errors come back as exceptions,
        # which slimdiff turns into one line: its own log shows them only with -vv
        options.log_severity_level = 3 if log.isEnabledFor(logging.DEBUG) else 4
        n = choose_threads(_thread_work(path), self.threads)
        ort_session_options(options, n)
        try:
            session = self._ort.InferenceSession(
                str(path), sess_options=options, providers=self.providers
            )
        except Exception as err:  # onnxruntime raises its own exception classes, unexported
            if out_of_memory(err, None) is not None:
                raise  # the bundle is fine: the CLI names the memory fix (slimdiff/errors.py)
            raise UserError(
                f"{path}: onnxruntime could not load it ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); export the bundle again"
            ) from None
        if self.device == "cuda" and _PROVIDERS["cuda"] not in session.get_providers():
            # onnxruntime-gpu silently falls back to the CPU when CUDA or cuDNN libraries
            # are missing; a user who asked for the GPU should hear about it.
            raise UserError(
                f"backend {self.name}: CUDAExecutionProvider failed to initialise for {path} "
                "(CUDA 12 / cuDNN 9 libraries not found?); install the CUDA runtime that "
                "matches onnxruntime-gpu, or use --backend ort-cpu"
            )
        log.debug("loaded %s with %s, %d threads", path, session.get_providers(), n)
        run_config = self._arena_shrinkage() if _once_per_image(path) else {}
        loaded = OrtSession(session, path, self._run_options(run_config))
        if self.bind:
            loaded.bind(
                BoundRunner(
                    self._ort,
                    session,
                    loaded.output_names,
                    self.device,
                    self.device_id,
                    self.cuda_graph,
                    run_config,
                )
            )
        return loaded

    def _arena_shrinkage(self) -> dict[str, str]:
        """The run config that gives a run's arena memory back when it ends: the CPU arena,
        and the GPU's on CUDA (where the CPU arena still holds what falls back to the CPU).
        Nothing with CUDA graphs: a replay writes to the addresses it captured, which a
        shrunk arena may have freed."""
        if self.cuda_graph:
            return {}
        devices = "cpu:0" if self.device == "cpu" else f"cpu:0;gpu:{self.device_id}"
        return {_SHRINK_ARENAS: devices}

    def _run_options(self, config: dict[str, str]) -> Any:
        if not config:
            return None
        options = self._ort.RunOptions()
        for key, value in config.items():
            options.add_run_config_entry(key, value)
        return options
