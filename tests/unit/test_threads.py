"""slimdiff.threads: CPU budget arithmetic, override precedence, what reaches torch and ORT."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from slimdiff import threads
from slimdiff.errors import UserError
from slimdiff.threads import ENV, CpuState, choose_threads, cpu_budget, read_cpu_state


@pytest.fixture(autouse=True)
def _no_thread_env(monkeypatch):
    # Each test starts without an override and gets the environment back afterwards, also
    # when the code under test (the CLI) sets these variables itself.
    # (setenv first: delenv alone records nothing to restore for an unset variable)
    for var in (ENV, "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)


def _fake_root(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


# ----------------------------------------------------------------------------- reading


def test_cgroup_v2_quota_is_the_tightest_on_the_path(tmp_path):
    root = _fake_root(
        tmp_path,
        {
            "proc/self/cgroup": "0::/user.slice/job\n",
            "sys/fs/cgroup/user.slice/job/cpu.max": "max 100000\n",
            "sys/fs/cgroup/user.slice/cpu.max": "150000 100000\n",  # 1.5 CPUs, on the parent
            "sys/fs/cgroup/cpu.max": "400000 100000\n",
        },
    )
    assert read_cpu_state(root).quota == 1.5
    assert read_cpu_state(tmp_path / "nothing-there").quota is None  # no cgroup files


def test_cgroup_v1_cfs_quota_and_unlimited(tmp_path):
    files = {
        "proc/self/cgroup": "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n",
        "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "250000\n",
        "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
    }
    assert read_cpu_state(_fake_root(tmp_path / "limited", files)).quota == 2.5
    files["sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us"] = "-1\n"
    assert read_cpu_state(_fake_root(tmp_path / "unlimited", files)).quota is None


def test_affinity_mask_counts_not_the_machine(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert read_cpu_state(tmp_path).affinity == 3


# ----------------------------------------------------------------------------- budget


@pytest.mark.parametrize(
    ("state", "budget"),
    [
        (CpuState(affinity=8), 8),  # no quota: all of the mask
        (CpuState(affinity=8, quota=4.0), 4),  # cgroup quota cuts the mask
        (CpuState(affinity=8, quota=2.5), 2),  # a partial CPU of quota rounds down
        (CpuState(affinity=8, quota=0.5), 1),  # never below one
        (CpuState(affinity=2, quota=16.0), 2),  # a quota above the mask changes nothing
    ],
)
def test_cpu_budget(state, budget):
    assert cpu_budget(state) == budget


# ----------------------------------------------------------------------------- choice


def test_tiny_models_are_capped_and_large_ones_get_the_budget(monkeypatch):
    monkeypatch.setattr(threads, "read_cpu_state", lambda root="/": CpuState(affinity=6))
    assert choose_threads(3.3e6) == threads.TINY_MAX_THREADS == 2  # toy:shapes' UNet
    assert choose_threads("tiny") == 2
    assert choose_threads(860e6) == 6
    assert choose_threads("large") == 6
    monkeypatch.setattr(threads, "read_cpu_state", lambda root="/": CpuState(affinity=1))
    assert choose_threads("tiny") == 1 and choose_threads("large") == 1
    with pytest.raises(ValueError, match="parameter count or one of"):
        choose_threads("huge")


def test_override_beats_env_beats_policy(monkeypatch):
    monkeypatch.setattr(threads, "read_cpu_state", lambda root="/": CpuState(affinity=6))
    assert choose_threads("large") == 6
    monkeypatch.setenv(ENV, "3")
    assert choose_threads("large") == 3
    assert choose_threads("tiny") == 3  # an explicit count is not second-guessed
    assert choose_threads("large", override=5) == 5


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5", "1025", "99999999999999999999"])
def test_bad_thread_counts_are_user_errors(monkeypatch, bad):
    monkeypatch.setenv(ENV, bad)
    with pytest.raises(UserError, match=f"{ENV} must be a whole number from 1 to 1024"):
        choose_threads("large")
    with pytest.raises(UserError, match="threads must be a whole number from 1 to 1024"):
        choose_threads("large", override=bad)


def test_cli_threads_option_reaches_a_subprocess():
    from slimdiff.cli import main

    result = CliRunner().invoke(main, ["--threads", "3", "recipes"])
    assert result.exit_code == 0, result.output
    assert os.environ[ENV] == "3" and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    code = "from slimdiff.threads import choose_threads; print(choose_threads('large'))"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "3"


def test_cli_rejects_bad_thread_counts_in_one_line(monkeypatch):
    from slimdiff.cli import main

    assert CliRunner().invoke(main, ["--threads", "0", "recipes"]).exit_code == 2
    monkeypatch.setenv(ENV, "many")
    result = CliRunner().invoke(main, ["recipes"])
    assert result.exit_code == 2
    assert "SLIMDIFF_THREADS must be a whole number" in result.output
    assert "Traceback" not in result.output


def test_prepare_process_makes_openmp_passive_unless_the_user_chose(monkeypatch):
    threads.prepare_process()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")
    threads.prepare_process()
    assert "OMP_WAIT_POLICY" not in os.environ


# ----------------------------------------------------------------------------- torch, ORT


def _passive_in_child(code: str, **env: str) -> bool:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = "from slimdiff import threads\n" + code + "\nprint(threads.openmp_passive())"
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env}
    )
    assert child.returncode == 0, child.stderr
    return {"True": True, "False": False}[child.stdout.strip()]


def test_openmp_passive_knows_when_the_setting_came_too_late():
    # A stand-in module under the name "torch": only whether it is imported matters here.
    too_late = "import sys, types; sys.modules['torch'] = types.ModuleType('torch')"
    assert _passive_in_child("threads.prepare_process()") is True
    assert _passive_in_child(too_late + "\nthreads.prepare_process()") is False
    assert _passive_in_child(too_late, OMP_WAIT_POLICY="passive") is True  # from the start
    assert _passive_in_child("threads.prepare_process()", OMP_WAIT_POLICY="ACTIVE") is False
    assert _passive_in_child("", GOMP_SPINCOUNT="0") is True


def test_configure_torch_sets_intra_op_threads():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    try:
        threads.configure_torch(2)
        assert torch.get_num_threads() == 2
        threads.configure_torch(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_one_torch_thread_fixture_applies_the_policy(monkeypatch, request):
    import torch

    # The module-scoped fixture is built on first request, here: after the override.
    monkeypatch.setenv(ENV, "1")
    before = torch.get_num_threads()
    request.getfixturevalue("one_torch_thread")
    assert torch.get_num_threads() == 1
    assert before > 1 or os.cpu_count() == 1  # else this test proves nothing


def test_ort_session_options_carry_the_threads_and_no_spinning():
    ort = pytest.importorskip("onnxruntime")
    options = threads.ort_session_options(ort.SessionOptions(), 2)
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    spin = threads.ort_session_options(ort.SessionOptions(), 3, spinning=True)
    assert spin.intra_op_num_threads == 3
    assert spin.get_session_config_entry("session.intra_op.allow_spinning") == "1"
