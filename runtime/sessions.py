"""A bundle component's session, loaded and checked against the manifest
(load_component), and sessions loaded only while their component runs: the runtime's
low-memory mode.

A pipeline holds every component's session from the start by default, so its resident
memory is their sum: SD3 Medium's fp16 bundle (T5-XXL included) is killed by the OOM
killer on a 24 GiB host before its first step (docs/BENCHMARKS.md). With `low_memory` the
text encoders are loaded, run and released, then the denoiser, then the VAE decoder: the
peak is the largest component's, and every call pays the loads again (the trade diffusers'
`enable_model_cpu_offload` makes on a GPU). Files are hashed once, when the bundle is
opened; each load checks that the component's files are still those (Bundle.check_unchanged:
a folder exported again meanwhile is refused, not run unverified) and the graph's inputs
and outputs against the manifest, as the resident mode does at open.

What a graph declares is checked at load: input and output names, input dtypes, output
dtypes (floats, the manifest's), and every fixed size the manifest states against the
graph's where the backend reports one (a text encoder of another width, a VAE of one
channel). Sizes the graph leaves dynamic are checked at each run (CheckedSession): an
output's axis named like an input's axis must have that input's size (a UNet whose
prediction is smaller than its sample, a text encoder whose states are shorter than its
ids), and a VAE's image axes ("8h") the latent's times the VAE scale factor, so a wrong
graph fails in one line instead of a numpy traceback or a wrong image.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
from slimdiff.runtime.backends import Backend, Session, shape_bound
from slimdiff.runtime.bundle_files import Bundle
from slimdiff.runtime.manifest import FIX, BundleError, ComponentEntry, IOSpec, PipelineSpec

from slimdiff.errors import UserError
from slimdiff.memory import release_memory

__all__ = [
    "CheckedSession",
    "OnDemandSession",
    "check_backend_fits",
    "denoiser_max_batch",
    "denoiser_shape_check",
    "ensure_loaded",
    "load_component",
    "release",
]


class OnDemandSession:
    """A Session that loads at first use and frees its graph on `release()`.

    Threads that reach it unloaded load it once: the first loads, the others wait for that
    session (a resident pipeline's VAE encoder, loaded by the first image-to-image call).
    It does not count users: a `release()` by one thread makes another's next run load the
    graph again, a second copy while a run still holds the first; the pipeline's low-memory
    mode runs one call at a time for that reason (runtime/pipeline.py)."""

    def __init__(self, load: Callable[[], Session]) -> None:
        self._load = load
        self._session: Session | None = None
        self._lock = threading.Lock()
        self.loads = 0  # how many times the graph was loaded (tests, logs)

    @property
    def session(self) -> Session:
        session = self._session
        if session is not None:
            return session
        with self._lock:
            if self._session is None:
                self._session = self._load()
                self.loads += 1
            return self._session

    @property
    def loaded(self) -> bool:
        return self._session is not None

    @property
    def input_names(self) -> list[str]:
        return self.session.input_names

    @property
    def output_names(self) -> list[str]:
        return self.session.output_names

    @property
    def input_dtypes(self) -> dict[str, np.dtype]:
        return self.session.input_dtypes

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.session.run(feeds)

    def release(self) -> None:
        with self._lock:
            self._session = None


class CheckedSession:
    """A loaded component whose outputs are checked against the manifest at each run.

    The sizes a graph leaves dynamic cannot be checked at load; here each output must be a
    float array of the manifest's rank, with its fixed sizes, and with the size of the
    input axis of the same name (B, H, W, S, ...), an image axis ("8h") `vae_scale` times
    its latent axis ("h"). Anything else the backend's session has (`providers`,
    `_bound`, ...) is reached through this wrapper unchanged.
    """

    def __init__(
        self, session: Session, root: object, name: str, entry: ComponentEntry, vae_scale: int
    ) -> None:
        self.session = session
        self._where = f"{root}: {entry.path}"
        self._name = name
        self._inputs = list(entry.inputs)
        self._outputs = list(entry.outputs)
        self._vae_scale = vae_scale

    def __getattr__(self, attr: str) -> object:
        if attr == "session":  # not set yet (a copy being built): no endless recursion
            raise AttributeError(attr)
        return getattr(self.session, attr)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(feeds)
        sizes = _axis_sizes(self._inputs, feeds, self._vae_scale)
        for spec in self._outputs:
            value = outputs.get(spec["name"])
            if value is None:
                continue  # named at load; a session may return only what was asked
            expected = [sizes.get(d) if isinstance(d, str) else d for d in spec["shape"]]
            if not _run_output_fits(value, expected):
                raise BundleError(
                    f"{self._where} returned {spec['name']} of shape {list(value.shape)} "
                    f"({value.dtype}) for inputs of shapes {_shapes_text(feeds)}, but the "
                    f"manifest says {self._name} returns {_dims_text(expected)} "
                    f"({spec['dtype']}); {FIX}"
                )
        return outputs


# An image's axes, named by the exporter for SD's 8 pixels per latent pixel whatever the
# model's factor (export/components.py, export/dummy_inputs.py): the latent axis times the
# manifest's vae_scale_factor.
_IMAGE_AXES = {"8h": "h", "8w": "w", "8H": "H", "8W": "W"}


def _axis_sizes(
    specs: list[IOSpec], feeds: dict[str, np.ndarray], vae_scale: int
) -> dict[str, int]:
    """Each named axis's size in this run's feeds, and the image axes' from the latent's
    (or the other way); an axis two inputs disagree on (which the graph itself refuses)
    is left out."""
    sizes: dict[str, int] = {}
    clashes: set[str] = set()
    for spec in specs:
        value = feeds.get(spec["name"])
        if value is None or np.ndim(value) != len(spec["shape"]):
            continue
        for dim, size in zip(spec["shape"], np.shape(value), strict=True):
            if isinstance(dim, str) and sizes.setdefault(dim, size) != size:
                clashes.add(dim)
    sizes = {axis: size for axis, size in sizes.items() if axis not in clashes}
    for image, latent in _IMAGE_AXES.items():
        if latent in sizes and image not in sizes:
            sizes[image] = sizes[latent] * vae_scale
        elif image in sizes and latent not in sizes and sizes[image] % vae_scale == 0:
            sizes[latent] = sizes[image] // vae_scale
    return sizes


def _run_output_fits(value: object, expected: list[int | str | None]) -> bool:
    """`value` is a float array of len(expected) dims, each the expected size where known
    (an int; None or an axis name no input carries: any size)."""
    if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.floating):
        return False
    if value.ndim != len(expected):
        return False
    return all(not isinstance(e, int) or e == s for e, s in zip(expected, value.shape, strict=True))


def _shapes_text(feeds: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{name} {list(np.shape(value))}" for name, value in sorted(feeds.items()))


def _dims_text(dims: list) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def ensure_loaded(*sessions: object) -> float:
    """Load the on-demand sessions among `sessions` now; the milliseconds it took (kept
    apart from the compute timings, so a first step's time is a step's)."""
    start = time.perf_counter()
    for session in sessions:
        if isinstance(session, OnDemandSession):
            _ = session.session
    return (time.perf_counter() - start) * 1e3


def release(*sessions: object) -> None:
    """Release the on-demand sessions among `sessions` (resident ones stay) and give the
    freed memory back to the OS."""
    on_demand = [s for s in sessions if isinstance(s, OnDemandSession) and s.loaded]
    for session in on_demand:
        session.release()
    if on_demand:
        release_memory()


def denoiser_max_batch(bundle: Bundle, runner: Backend, config: PipelineSpec) -> int | None:
    """The largest batch the denoiser's profile allows where `runner` runs only the
    profile's shapes; None where it runs any (or the bundle predates profiles)."""
    entry: ComponentEntry = bundle.manifest.components[config.denoiser]
    if entry.profile is None or not shape_bound(runner, bundle.path(entry.path)):
        return None
    return int(entry.profile["max"][config.kind.sample_input][0])


def denoiser_shape_check(
    bundle: Bundle, runner: Backend, config: PipelineSpec
) -> Callable[[dict[str, tuple[int, ...]]], None] | None:
    """`check({input: shape})` raising UserError where `runner` can tell, before anything
    runs, that the denoiser does not take those shapes (an AOTInductor package's axis
    ranges, read from its io.json); None where it cannot (ORT takes any shape)."""
    method = getattr(runner, "check_shapes", None)
    if method is None:
        return None
    path = bundle.path(bundle.manifest.components[config.denoiser].path)
    return lambda shapes: method(path, shapes)


def check_backend_fits(runner: Backend, bundle: Bundle) -> None:
    """UserError for the aoti backend on a bundle without an AOTInductor package: it would
    run every ONNX graph through onnxruntime, not what was asked for."""
    formats = {entry.format for entry in bundle.manifest.components.values()}
    if runner.name == "aoti" and "aoti" not in formats:
        raise UserError(
            f"{bundle.root} has no AOTInductor package (its components are ONNX graphs); "
            "export it with --target aoti, or run it with --backend ort-cpu"
        )


def load_component(runner: Backend, bundle: Bundle, name: str) -> Session:
    """Load component `name` from its verified graph; the graph must take and return what
    the manifest declares (a graph swapped for another one, or edited to return other
    shapes or dtypes, fails here, not mid-run); sizes it leaves dynamic are checked at
    each run (CheckedSession)."""
    entry: ComponentEntry = bundle.manifest.components[name]
    if entry.format == "aoti" and runner.name != "aoti":
        raise UserError(
            f"{bundle.root}: its {name} is an AOTInductor package (export --target aoti), "
            f"which the {runner.name} backend cannot run; run it with --backend aoti"
        )
    folder = entry.path.rsplit("/", 1)[0]
    bundle.check_unchanged(folder)  # the graph and its external data, as they were hashed
    session = runner.load(bundle.path(entry.path))
    declared = sorted(i["name"] for i in entry.inputs)
    outputs = [o["name"] for o in entry.outputs]
    wrong_dtype = [
        i["name"]
        for i in entry.inputs
        if i["dtype"] != "bfloat16" and str(session.input_dtypes.get(i["name"])) != i["dtype"]
    ]
    if sorted(session.input_names) != declared or not set(outputs) <= set(session.output_names):
        raise BundleError(
            f"{bundle.root}: {entry.path} takes {sorted(session.input_names)} and returns "
            f"{session.output_names}, but the manifest says {name} takes {declared} and "
            f"returns {outputs}; {FIX}"
        )
    if wrong_dtype:
        raise BundleError(
            f"{bundle.root}: {entry.path}'s inputs {', '.join(wrong_dtype)} have other dtypes "
            f"than the manifest declares for {name}; {FIX}"
        )
    _check_declared(bundle, name, entry, session)
    scale = bundle.manifest.pipeline.vae_scale_factor
    return CheckedSession(session, bundle.root, name, entry, scale)


def _check_declared(bundle: Bundle, name: str, entry: ComponentEntry, session: Session) -> None:
    """BundleError where what the graph declares (as far as the backend reports it: ORT
    does, see OrtSession) contradicts the manifest: an output dtype that is not a float or
    not the manifest's, a rank or a fixed size that differs from the manifest's."""
    out_dtypes = getattr(session, "output_dtypes", None) or {}
    for spec in entry.outputs:
        got = out_dtypes.get(spec["name"])
        if got is not None and (got not in _FLOAT_NAMES or _dtype_differs(spec["dtype"], got)):
            raise BundleError(
                f"{bundle.root}: {entry.path} returns {spec['name']} as {got}, but the manifest "
                f"says {name} returns it as {spec['dtype']}; {FIX}"
            )
    sides = (("takes", entry.inputs, "input_shapes"), ("returns", entry.outputs, "output_shapes"))
    for direction, specs, reported in sides:
        shapes = getattr(session, reported, None) or {}
        for spec in specs:
            got = shapes.get(spec["name"])
            if got is not None and _shape_contradicts(spec["shape"], got):
                raise BundleError(
                    f"{bundle.root}: {entry.path} {direction} {spec['name']} of shape "
                    f"{_dims_text(got)}, but the manifest says {name} {direction} "
                    f"{_dims_text(spec['shape'])}; {FIX}"
                )


# The manifest's names of the float dtypes a pipeline reads from a graph's outputs.
_FLOAT_NAMES = frozenset({"float32", "float16", "bfloat16", "float64"})


def _dtype_differs(declared: str, got: str) -> bool:
    # bfloat16: as for inputs, the manifest may record the model's dtype where the graph's
    # tensors are another float (numpy has no bfloat16).
    return declared != "bfloat16" and got != declared


def _shape_contradicts(declared: list, got: list) -> bool:
    """A rank that differs, or a size the manifest fixes that the graph fixes otherwise;
    a size the graph leaves unknown (None) or names is left to the run's check."""
    if not got and declared:  # onnxruntime knows no shape: nothing to compare
        return False
    if len(got) != len(declared):
        return True
    return any(
        isinstance(d, int) and isinstance(g, int) and d != g
        for d, g in zip(declared, got, strict=True)
    )
