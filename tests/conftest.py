"""Shared test setup: no network, GPU tests skipped without CUDA, no files left behind."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from slimdiff.threads import prepare_process

# OpenMP threads sleep, not spin, while they wait (slimdiff/threads.py): set before any test
# module imports torch, so tests on a shared 2-core CI machine do not stall each other.
prepare_process()

# Tests never touch the network: the hub client fails fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# The user's slimdiff cache (hashes of bundle files, engines) is one of this test process's
# own, removed at exit: tests neither read what runs on this machine recorded nor leave
# records behind. Subprocesses the tests start inherit it.
os.environ["SLIMDIFF_CACHE"] = tempfile.mkdtemp(prefix="slimdiff-test-cache-")
atexit.register(shutil.rmtree, os.environ["SLIMDIFF_CACHE"], ignore_errors=True)

ROOT = Path(__file__).resolve().parents[1]


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none visible to torch)")
    cuda = None
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace(os.sep, "/") or item.get_closest_marker("gpu"):
            cuda = _cuda_available() if cuda is None else cuda
            if not cuda:
                item.add_marker(skip_gpu)


@pytest.fixture
def onnxruntime_not_installed(monkeypatch):
    """`import onnxruntime` fails and onnxruntime is off the path, as where it was never
    installed (the backend tells that from an install that fails to import)."""
    import importlib.machinery

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    find = importlib.machinery.PathFinder.find_spec

    def hidden(name, path=None, target=None):
        return None if name.split(".")[0] == "onnxruntime" else find(name, path, target)

    monkeypatch.setattr(importlib.machinery.PathFinder, "find_spec", hidden)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch threads for a module by slimdiff's policy for tiny models: SLIMDIFF_THREADS,
    else up to 2 where OpenMP sleeps while waiting (OMP_WAIT_POLICY=PASSIVE before torch
    was imported), else one, as the name says: spinning OpenMP threads on a shared CPU
    slow tiny models 10-100x (slimdiff/threads.py). Use:
    pytestmark = pytest.mark.usefixtures("one_torch_thread")."""
    import torch

    from slimdiff.threads import (
        TINY,
        choose_threads,
        configure_torch,
        openmp_passive,
        threads_from_env,
    )

    before = torch.get_num_threads()
    # A second thread only where it sleeps while waiting (or SLIMDIFF_THREADS asks).
    configure_torch(choose_threads(TINY) if openmp_passive() or threads_from_env() else 1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def quick_inductor():
    """AOTInductor compiles with scalar C++ kernels, its wrapper at -O0 and no pattern
    rewrites: tiny:sdxl's UNet package compiled in 86 s instead of 220 s on 2 cores (most
    of the time went to choosing vector tilings for symbolic shapes). The tests check what
    slimdiff does (programs, axis ranges, IO, parity against eager), not inductor's
    vectorizer; `slimdiff export --target aoti` compiles with inductor's defaults. Request
    it from the fixture that compiles."""
    import torch._inductor.config as inductor

    quick = {
        "cpp.simdlen": 1,
        "aot_inductor.compile_wrapper_opt_level": "O0",
        "pattern_matcher": False,
    }
    with inductor.patch(quick):
        yield


@pytest.fixture(scope="session", autouse=True)
def _no_files_left_behind():
    """Tests write under tmp_path only; fail if one leaves files in the repository root."""
    before = {p.name for p in ROOT.iterdir()}
    yield
    after = {p.name for p in ROOT.iterdir()}
    leaked = sorted(after - before - {".pytest_cache", ".ruff_cache"})
    assert not leaked, f"tests left files in the repository root: {leaked}"


class SharedBundle(NamedTuple):
    model: Any  # the LoadedModel it was exported from
    out: Path
    manifest: Any
    processors_before: dict[str, str]  # attention processor classes before the export


def _processors(model) -> dict[str, str]:
    modules = {"denoiser": model.denoiser, "vae": model.pipe.vae}
    return {
        f"{m}.{k}": type(v).__name__
        for m, module in modules.items()
        for k, v in module.attn_processors.items()
    }


@pytest.fixture(scope="session")
def shared_bundle(tmp_path_factory):
    """`shared_bundle(family, optimize)`: tiny:<family> exported once per test session.

    Several modules read the same bundles (exports take 5-40 s each on 2 cores). Tests must
    not change the bundle or the model: copy the folder first (shutil.copytree).
    """
    cache: dict[tuple[str, bool], SharedBundle] = {}

    def get(family: str, optimize: bool = True) -> SharedBundle:
        key = (family, optimize)
        if key not in cache:
            from slimdiff.export import export_bundle

            from slimdiff.models import load_model

            model = load_model(f"tiny:{family}")
            before = _processors(model)
            out = tmp_path_factory.mktemp(f"{family}-{'fused' if optimize else 'plain'}")
            # with the VAE encoder, so image-to-image tests share these bundles
            manifest = export_bundle(model, out / "bundle", optimize=optimize, vae_encoder=True)
            cache[key] = SharedBundle(model, out / "bundle", manifest, before)
        return cache[key]

    return get


# ORT's UNet fusion takes over a minute on the tiny SDXL UNet (2 CPU cores); its fused
# graph is checked against torch by the exporter's own parity check, so the runtime tests'
# SDXL is exported unfused. The other families run the default (fused) bundles.
_UNFUSED = frozenset({"sdxl"})


@pytest.fixture(scope="session")
def tiny_bundle(shared_bundle):
    """`tiny_bundle(family)`: (LoadedModel, bundle path) of the runtime tests' tiny:<family>
    export (shared_bundle's, fused but for SDXL)."""

    def get(family: str):
        shared = shared_bundle(family, family not in _UNFUSED)
        return shared.model, shared.out

    return get
