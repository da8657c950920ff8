"""An allocation that fails (onnxruntime's arena, torch's allocators, numpy) ends a
command in one line that names the fix, exit code 1; other errors keep their traceback."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from slimdiff.runtime.pipeline import Text2ImagePipeline

from slimdiff.cli import main
from slimdiff.errors import out_of_memory

ORT = (
    "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Attention "
    "node. Name:'Attention_0' Status Message: bfc_arena.cc:360 void* onnxruntime::BFCArena::"
    "AllocateRawInternal(size_t, bool, onnxruntime::Stream*) Failed to allocate memory for "
    "requested buffer of size 2199023255552"
)
TORCH_CPU = (
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
    "you tried to allocate 21474836480 bytes. Error code 12 (Cannot allocate memory)"
)
TORCH_CUDA = "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.11 GiB total capacity)"


@pytest.mark.parametrize(
    "err, size",
    [
        (RuntimeError(ORT), "2048.0 GiB in one block"),
        (RuntimeError(TORCH_CPU), "20.0 GiB in one block"),
        (RuntimeError(TORCH_CUDA), "RuntimeError"),
        (MemoryError(), "MemoryError"),
        (RuntimeError("std::bad_alloc"), "RuntimeError"),
        (
            RuntimeError("Failed to allocate memory for requested buffer of size 1048576"),
            "1 MiB in one block",
        ),
    ],
)
def test_allocation_failures_become_one_line(err, size):
    error = out_of_memory(err, "run")
    assert error is not None and error.exit_code == 1
    assert str(error) == (
        f"out of memory ({size}); run a smaller --size or fewer --images, or add --low-memory"
    )
    assert "--weights stream" in str(out_of_memory(err, "export"))


@pytest.mark.parametrize("err", [ValueError("bad shape"), RuntimeError("CUDA error: misaligned")])
def test_other_errors_are_not_taken_for_it(err):
    assert out_of_memory(err, "run") is None


def test_the_cli_prints_it_in_one_line(tiny_bundle, tmp_path, monkeypatch):
    _, bundle = tiny_bundle("sd15")

    def fails(*args, **kwargs):
        raise RuntimeError(ORT)

    monkeypatch.setattr(Text2ImagePipeline, "__call__", fails)
    out = tmp_path / "a.png"
    args = ["run", str(bundle), "--prompt", "a", "--steps", "1", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "error: out of memory (2048.0 GiB in one block); run a smaller --size or fewer "
        "--images, or add --low-memory"
    )
    assert "Traceback" not in result.output and not out.exists()


def test_a_bug_keeps_its_traceback(tiny_bundle, tmp_path, monkeypatch):
    _, bundle = tiny_bundle("sd15")

    def fails(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(Text2ImagePipeline, "__call__", fails)
    args = ["run", str(bundle), "--prompt", "a", "--out", str(tmp_path / "a.png")]
    result = CliRunner().invoke(main, args)
    assert isinstance(result.exception, KeyError)


def test_a_graph_that_cannot_load_for_memory_is_not_called_a_broken_bundle(
    tiny_bundle, tmp_path, monkeypatch
):
    """onnxruntime's bad_alloc while it builds a session: the memory fix, exit 1, not
    "export the bundle again" (exit 2)."""
    import onnxruntime

    _, bundle = tiny_bundle("sd15")

    def fails(*args, **kwargs):
        raise RuntimeError("Exception during initialization: std::bad_alloc")

    monkeypatch.setattr(onnxruntime, "InferenceSession", fails)
    args = ["run", str(bundle), "--prompt", "a", "--out", str(tmp_path / "a.png")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1] == (
        "error: out of memory (RuntimeError); run a smaller --size or fewer --images, or add "
        "--low-memory"
    )


def test_an_onnxruntime_that_fails_to_import_is_not_called_missing(monkeypatch):
    import sys

    from slimdiff.runtime.backends import ort

    from slimdiff.errors import UserError

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` fails
    with pytest.raises(
        UserError, match=r"installed but does not import \(ModuleNotFoundError: .*\); fix"
    ):
        ort._import_ort("cpu")


@pytest.mark.parametrize(
    ("err", "line", "code"),
    [
        (
            OSError(28, "No space left on device", "/out/unet/model.onnx"),
            "no space left on the disk (/out/unet/model.onnx); free some, or write elsewhere",
            1,
        ),
        (
            RuntimeError("SafetensorError: I/O error: No space left on device (os error 28)"),
            "no space left on the disk; free some",
            1,
        ),
        (
            PermissionError(13, "Permission denied", "/data/prompts.txt"),
            "permission denied (/data/prompts.txt): Permission denied; give this user access",
            2,
        ),
        (
            OSError(30, "Read-only file system", "/mnt/x"),
            "cannot write there (/mnt/x): Read-only file system; choose a folder on a writable",
            2,
        ),
    ],
)
def test_a_file_operation_the_system_refuses_is_one_line(err, line, code):
    from slimdiff.errors import disk_error

    error = disk_error(err)
    assert error is not None and str(error).startswith(line) and error.exit_code == code
    if isinstance(err, OSError):
        wrapped = RuntimeError("export failed")
        wrapped.__cause__ = err  # raise ... from err: a library's own error around it
        assert str(disk_error(wrapped)) == str(error)
    assert disk_error(ValueError("bad shape")) is None
    bug = KeyError("a bug")  # raised while handling it: a bug keeps its traceback
    bug.__context__ = err
    assert disk_error(bug) is None


def test_a_terminated_export_cleans_up_and_exits_143(tmp_path, monkeypatch):
    """SIGTERM (kill, timeout, docker stop) unwinds as Ctrl-C does: no partial left."""
    import os
    import signal

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr("slimdiff.export.export_component", killed)
    try:
        result = CliRunner().invoke(main, ["export", "tiny:sd15", "--out", str(tmp_path / "b")])
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    assert result.exit_code == 143, result.output
    assert result.output.strip().splitlines()[-1] == "terminated"
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], [".b.lock"])
