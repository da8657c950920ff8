"""One pipeline shared between threads (a service): CUDA-graph mode serialises each session's
replays, so concurrent calls give the images sequential calls give; low-memory mode runs one
call at a time, so no component is ever loaded twice at once.

CUDA graphs are simulated on the CPU as tests/unit/test_ort_binding.py does: IO binding with
`cuda_graph` on and device "cpu" runs every bookkeeping path of BoundRunner._run_graph (one
set of persistent buffers per input shape, written in place at each call)."""

from __future__ import annotations

import sys
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from slimdiff.runtime.backends.ort import OrtBackend
from slimdiff.runtime.pipeline import Text2ImagePipeline

THREADS = 4
CALL = {"size": (64, 64), "steps": 3, "guidance": 6.0}


@pytest.fixture(scope="module")
def bundle(shared_bundle) -> Path:
    return shared_bundle("sd15", optimize=False).out  # read only


@pytest.fixture
def switch_often():
    """Threads switch every microsecond, so calls interleave inside a step: without the
    graph lock the threaded calls' latents differed from the sequential ones."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def _graph_backend() -> OrtBackend:
    backend = OrtBackend("ort-cpu", threads=1, bind=True)
    backend.cuda_graph = True  # the constructor keeps it for CUDA; the CPU simulation forces it
    return backend


def _jobs(n: int) -> list[dict]:
    return [{"prompt": f"job {i}: a red circle", "seed": i} for i in range(n)]


@pytest.mark.usefixtures("switch_often")
def test_cuda_graph_mode_shared_by_threads_gives_the_sequential_images(bundle):
    pipe = Text2ImagePipeline.from_bundle(bundle, backend=_graph_backend())
    jobs = _jobs(8)
    sequential = [pipe(**job, **CALL) for job in jobs]
    with ThreadPoolExecutor(THREADS) as pool:
        threaded = list(pool.map(lambda job: pipe(**job, **CALL), jobs))
    for alone, together in zip(sequential, threaded, strict=True):
        np.testing.assert_array_equal(together.latents, alone.latents)
        np.testing.assert_array_equal(together.image, alone.image)
    # the calls ran through the graph path: one entry per input shape, not per thread
    assert len(pipe.denoiser._bound._graphs) == 1
    assert len(pipe.vae_decoder._bound._graphs) == 1


class _CountingBackend(OrtBackend):
    """ort-cpu that records, at each load, how many sessions of that graph are alive."""

    def __init__(self) -> None:
        super().__init__("ort-cpu", threads=1)
        self._live: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()
        self.most_alive: dict[str, int] = {}

    def load(self, path):
        session = super().load(path)
        with self._lock:
            self._live.add(session)
            name = Path(path).parent.name
            alive = sum(1 for s in list(self._live) if s.path.parent.name == name)
            self.most_alive[name] = max(self.most_alive.get(name, 0), alive)
        return session


def test_low_memory_calls_from_threads_never_load_a_component_twice(bundle):
    backend = _CountingBackend()
    pipe = Text2ImagePipeline.from_bundle(bundle, backend=backend, low_memory=True)
    jobs = _jobs(THREADS)
    with ThreadPoolExecutor(THREADS) as pool:
        threaded = list(pool.map(lambda job: pipe(**job, **CALL), jobs))
    assert backend.most_alive == {"text_encoder": 1, "unet": 1, "vae_decoder": 1}
    # one load of each per call: no call released what another was running
    assert pipe.denoiser.loads == len(jobs)
    assert pipe.vae_decoder.loads == len(jobs)
    assert not pipe.denoiser.loaded and not pipe.vae_decoder.loaded
    resident = Text2ImagePipeline.from_bundle(bundle)
    for job, got in zip(jobs, threaded, strict=True):
        np.testing.assert_array_equal(got.latents, resident(**job, **CALL).latents)
