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
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from slimdiff.runtime.backends import Backend, Session, shape_bound
from slimdiff.runtime.bundle_files import Bundle
from slimdiff.runtime.manifest import FIX, BundleError, ComponentEntry, PipelineSpec

from slimdiff.errors import UserError
from slimdiff.memory import release_memory

__all__ = [
    "OnDemandSession",
    "check_backend_fits",
    "denoiser_max_batch",
    "denoiser_shape_check",
    "ensure_loaded",
    "load_component",
    "release",
]


class OnDemandSession:
    """A Session that loads at first use and frees its graph on `release()`."""

    def __init__(self, load: Callable[[], Session]) -> None:
        self._load = load
        self._session: Session | None = None
        self.loads = 0  # how many times the graph was loaded (tests, logs)

    @property
    def session(self) -> Session:
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
        self._session = None


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
    the manifest declares (a graph swapped for another one fails here, not mid-run)."""
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
    return session
