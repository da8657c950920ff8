"""The ORT backend's per-component settings and the process's thread pools: a VAE gets every
CPU whatever its parameter count, graphs run once per image give their arena memory back
after each run, and `--threads` reaches the tokenizers' and OpenBLAS's pools.

The graphs are built in code: a VAE-like stack of convolutions at full resolution, saved in a
folder named like a bundle's component (the backend reads the role from it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper, save_model
from slimdiff.runtime.backends.ort import OrtBackend

from slimdiff import threads
from slimdiff.threads import ENV, IMAGE, CpuState, choose_threads

SHRINK = "memory.enable_memory_arena_shrinkage"
POOL_VARS = ("RAYON_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TOKENIZERS_PARALLELISM")
WIDTH = 32  # channels at full resolution: a 512x512 activation is 32 MiB in fp32


def _conv_graph(path: Path) -> Path:
    """latent (1, 4, h, w) -> 8x nearest upsampling -> three 3x3 convolutions -> (1, 3, 8h,
    8w): a VAE decoder's shape of work (few weights, full-resolution activations)."""
    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.standard_normal((WIDTH, 4, 3, 3)),
        "w2": rng.standard_normal((WIDTH, WIDTH, 3, 3)),
        "w3": rng.standard_normal((3, WIDTH, 3, 3)),
        "scales": np.array([1, 1, 8, 8]),
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    pad = {"pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Resize", ["latent_sample", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Conv", ["up", "w1"], ["c1"], **pad),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], **pad),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3"], ["sample"], **pad),
    ]
    x = helper.make_tensor_value_info("latent_sample", TensorProto.FLOAT, [1, 4, "h", "w"])
    y = helper.make_tensor_value_info("sample", TensorProto.FLOAT, [1, 3, "8h", "8w"])
    graph = helper.make_graph(nodes, "vae_like", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path))
    return path


@pytest.fixture
def graphs(tmp_path) -> dict[str, Path]:
    """The same small graph as a bundle's vae_decoder, vae_encoder, text_encoder_2 and unet."""
    names = ("vae_decoder", "vae_encoder", "text_encoder_2", "unet")
    return {name: _conv_graph(tmp_path / name / "model.onnx") for name in names}


def _intra_op_threads(session) -> int:
    return session._session.get_session_options().intra_op_num_threads


# ----------------------------------------------------------------------------- threads


def test_a_vae_gets_every_cpu_where_a_tiny_model_is_capped(graphs, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(threads, "read_cpu_state", lambda root="/": CpuState(affinity=6))
    # the SD/SDXL/SD3/FLUX VAE decoder: 49.5M parameters, under SMALL_MODEL_PARAMS
    assert choose_threads(49.5e6) == threads.TINY_MAX_THREADS == 2
    assert choose_threads(IMAGE) == 6
    backend = OrtBackend("ort-cpu")
    assert _intra_op_threads(backend.load(graphs["vae_decoder"])) == 6
    assert _intra_op_threads(backend.load(graphs["vae_encoder"])) == 6
    # the same few weights as a denoiser or text encoder: per-op work too small to split
    assert _intra_op_threads(backend.load(graphs["unet"])) == 2
    assert _intra_op_threads(backend.load(graphs["text_encoder_2"])) == 2


def test_an_explicit_thread_count_still_wins_for_a_vae(graphs, monkeypatch):
    monkeypatch.setattr(threads, "read_cpu_state", lambda root="/": CpuState(affinity=6))
    monkeypatch.setenv(ENV, "3")
    assert _intra_op_threads(OrtBackend("ort-cpu").load(graphs["vae_decoder"])) == 3
    assert _intra_op_threads(OrtBackend("ort-cpu", threads=1).load(graphs["vae_decoder"])) == 1


# ----------------------------------------------------------------------------- arena


@pytest.mark.parametrize("bind", [False, True], ids=["run", "io-binding"])
def test_graphs_run_once_per_image_shrink_the_arena_and_the_denoiser_does_not(graphs, bind):
    backend = OrtBackend("ort-cpu", threads=1, bind=bind)
    sessions = {name: backend.load(path) for name, path in graphs.items()}
    for name, session in sessions.items():
        options = session._bound._options if bind else session._run_options
        if name == "unet":
            assert options is None
        else:
            assert options.get_run_config_entry(SHRINK) == "cpu:0"
    z = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    got = sessions["vae_decoder"].run({"latent_sample": z})["sample"]
    want = sessions["unet"].run({"latent_sample": z})["sample"]  # same graph, no option
    assert got.shape == (1, 3, 64, 64)
    np.testing.assert_array_equal(got, want)


def test_on_cuda_the_gpu_arena_is_shrunk_too_but_never_under_cuda_graphs():
    # The config string only: no CUDA onnxruntime here (unverified on a GPU).
    backend = object.__new__(OrtBackend)
    backend.device, backend.device_id, backend.cuda_graph = "cuda", 1, False
    assert backend._arena_shrinkage() == {SHRINK: "cpu:0;gpu:1"}
    backend.cuda_graph = True  # a replay writes to captured addresses a shrink may free
    assert backend._arena_shrinkage() == {}


_GROWTH = """
import gc, sys
import numpy as np
from slimdiff.memory import release_memory
from slimdiff.runtime.backends import ort

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

def growth(path):
    session = ort.OrtBackend("ort-cpu", threads=1).load(path)
    z = np.zeros((1, 4, 64, 64), np.float32)  # a 512x512 decode
    gc.collect(); release_memory(); before = rss_mib()
    del session.run({"latent_sample": z})["sample"]
    gc.collect(); release_memory()
    return rss_mib() - before

shrunk = growth(sys.argv[1])
ort._once_per_image = lambda path: False  # the arena as onnxruntime keeps it by default
print(shrunk, growth(sys.argv[1]))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_a_resident_vae_does_not_keep_its_decode_activations(graphs):
    # Measured 2026-12-07 (2-CPU KVM Xeon): about 6 MiB kept with the shrinkage, 140 MiB
    # without; an SD VAE decoder at 512x512: 278 MB resident after decodes, against 2253 MB.
    child = subprocess.run(
        [sys.executable, "-c", _GROWTH, str(graphs["vae_decoder"])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr
    shrunk, kept = (float(v) for v in child.stdout.split())
    full_activation = WIDTH * 512 * 512 * 4 / 2**20  # MiB
    assert kept > 2 * full_activation  # the measurement sees what the arena keeps
    assert shrunk < full_activation


# ----------------------------------------------------------------------------- other pools


@pytest.fixture
def no_pool_vars(monkeypatch):
    for var in (*POOL_VARS, ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(threads, "_set_here", {})
    monkeypatch.setattr(threads, "read_cpu_state", lambda root="/": CpuState(affinity=6))


def test_prepare_process_sizes_the_tokenizer_and_openblas_pools(no_pool_vars, monkeypatch):
    threads.prepare_process()  # no --threads: the CPU budget
    assert [os.environ.get(v) for v in POOL_VARS] == ["6", "6", None]
    monkeypatch.setenv(ENV, "1")  # the CLI run again in-process with --threads 1
    threads.prepare_process()
    assert [os.environ.get(v) for v in POOL_VARS] == ["1", "1", "false"]
    monkeypatch.setenv(ENV, "3")
    threads.prepare_process()
    assert [os.environ.get(v) for v in POOL_VARS] == ["3", "3", None]


def test_prepare_process_leaves_the_users_pool_settings(no_pool_vars, monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "5")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    monkeypatch.setenv(ENV, "1")
    threads.prepare_process()
    assert [os.environ.get(v) for v in POOL_VARS] == ["1", "5", "true"]


_OPENBLAS = """
import ctypes, glob, os, sys
POOL_VARS = ("RAYON_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TOKENIZERS_PARALLELISM")
from slimdiff.cli import main
early = [m for m in ("numpy", "tokenizers", "onnxruntime", "torch") if m in sys.modules]
main(["--threads", "1", "recipes"], standalone_mode=False)
import numpy
libs = glob.glob(os.path.join(os.path.dirname(numpy.__file__), os.pardir, "numpy.libs",
                              "libscipy_openblas*.so"))
count = None
if libs:
    lib = ctypes.CDLL(libs[0])
    get = getattr(lib, "scipy_openblas_get_num_threads64_", None)
    count = get() if get is not None else None
print(early, *(os.environ[v] for v in POOL_VARS), count)
"""


def test_cli_threads_reach_openblas_because_numpy_loads_after(tmp_path):
    # One thread: OpenBLAS takes no more threads than CPUs, so on this 2-CPU machine only a
    # count under its default shows that the setting arrived.
    env = {k: v for k, v in os.environ.items() if k not in (*POOL_VARS, ENV)}
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_OPENBLAS)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert child.returncode == 0, child.stderr
    early, *pools, count = child.stdout.strip().splitlines()[-1].rsplit(" ", 4)
    assert early == "[]"  # nothing that reads a pool size is loaded before the CLI sets it
    assert pools == ["1", "1", "false"]
    if count == "None":
        pytest.skip("this numpy's OpenBLAS does not export its thread count")
    assert count == "1"
