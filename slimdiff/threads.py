"""How many CPU threads slimdiff's torch and onnxruntime work uses, and how they wait.

Standard library only: the torch-free runtime imports it.

Why it matters. Both thread pools synchronise at the end of every operator, and both
*spin* while they wait by default: libgomp (torch's OpenMP, also MKL's and oneDNN's) busy-
waits up to GOMP_SPINCOUNT (300,000 iterations) before it sleeps; onnxruntime spins
between operators (`session.intra_op.allow_spinning`). On a CPU that other processes share,
a spinning thread burns the time slice its descheduled peer needs, at every one of a small
model's ~1,000 operators per step. Measured with `python tools/load_test.py` on toy:shapes
(3.3M-parameter UNet, CFG batch 2, 16x16 latents): ms per step, median over 11-17 runs
from 4 sessions of 2026-12-01 (22:44-23:34 UTC), on a 2-CPU KVM Xeon whose load average
was 4-6 from other users even at N=0, with N extra `while True: pass` competitors
(docs/BENCHMARKS.md, "CPU contention", has the full tables):

    configuration                       N=0    N=1    N=2    N=3   CPU ms/step
    torch 2 threads, spinning (default)  445    331    324    733   680  (runs: 41 ms-13 s)
    torch 2 threads, OMP PASSIVE          58     69     86    143    56
    torch 1 thread                        58    108    130    280    53
    ORT 2 threads, spinning (default)     24     32     54     62    33
    ORT 2 threads, no spinning            17     18     32     48    18
    ORT 1 thread                          15     32     36     55    15
    64x64 latents (16x the work per operator), 3 runs each:
    torch 2 threads PASSIVE / 1 thread   440 / 231             458 / 1716
    ORT 2 threads no spin / 1 thread     178 / 187             165 / 819

The policy, from those numbers:

1. **Never spin.** `prepare_process()` sets OMP_WAIT_POLICY=PASSIVE unless the user set a
   wait policy (OMP_WAIT_POLICY, GOMP_SPINCOUNT, KMP_BLOCKTIME), and `ort_session_options`
   sets `session.intra_op.allow_spinning` to "0". In the same round and competitor count
   PASSIVE beat spinning torch in 42 of 44 pairs (median 6.6x faster, 12x less CPU) and
   ORT without spinning beat ORT with it in 40 of 44 (1.7x). libgomp reads its environment
   once, when `import torch` loads it, so `prepare_process()` must run before torch is
   imported: the CLI's `main` calls it first, and so must any other entry point that
   imports torch (tools, `python -m` modules, test configuration).
2. **Threads = the CPUs this process may use**, `cpu_budget()`: its affinity mask, cut to
   its cgroup CPU quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us`, tightest on the path). Other
   processes' load does not lower it, although it was the obvious candidate (1-minute load
   average, /proc/pressure/cpu): with sleeping waits, two threads beat one under
   competitors (torch: 30 of 39 pairs, 1.5x; ORT 21 of 39, 1.1x; at 64x64 latents two
   threads lost nothing to 3 competitors where one thread slowed 4.4-7.4x). Likely why (not
   measured directly): the scheduler (EEVDF, Linux 6.18 here) runs a thread that sleeps at
   every barrier promptly when it wakes, ahead of CPU-bound competitors, so fewer threads
   only hand the CPU to those competitors.
3. **Tiny models get at most TINY_MAX_THREADS (2)** when they have fewer than
   SMALL_MODEL_PARAMS parameters (toy:shapes, the tiny: test models). With no added
   competitor one thread was 14-18% faster (10 and 12 of 17 pairs, torch and ORT); with
   competitors two were faster (above). Two is kept because contention is what hurt; the
   cap (not measured: this machine has 2 CPUs) keeps a many-core machine from putting
   10-microsecond operators behind a 32-way barrier.
   The cap is for per-operator work too small to split, which a parameter count does not
   tell for convolutions on full-resolution activations: a VAE decoder has 49.5M parameters
   (fp32 weights 198 MB, under the cap's 50M) yet is the heaviest call of an image (10.5
   TFLOP per 1024x1024 SDXL decode), and TAESD's 1.2M parameters run at full resolution
   too. A caller that knows it runs such a model passes the work IMAGE: never capped.
4. **An explicit count wins**: `override=` beats SLIMDIFF_THREADS, which beats the policy.
   `slimdiff --threads N` sets SLIMDIFF_THREADS, so subprocesses (the bench worker)
   inherit it.
5. **The other pools follow**: the tokenizers library's Rayon pool and numpy's OpenBLAS
   pool size themselves from the CPUs they see, not from --threads (OpenBLAS not from a
   cgroup quota either). `prepare_process()` sets RAYON_NUM_THREADS and
   OPENBLAS_NUM_THREADS to SLIMDIFF_THREADS, else `cpu_budget()` (and
   TOKENIZERS_PARALLELISM=false for one thread), where the user did not set them. Both
   read their variable once, when the library loads (numpy's import, the first parallel
   encode), so this too must run before those imports.

Example:
    >>> from slimdiff import threads
    >>> threads.prepare_process()                  # before `import torch`
    >>> n = threads.choose_threads(3.3e6)          # toy:shapes: min(CPUs, 2)
    >>> threads.configure_torch(n)                 # doctest: +SKIP
    >>> options = threads.ort_session_options(onnxruntime.SessionOptions(), n)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimdiff.errors import UserError

__all__ = [
    "ENV",
    "IMAGE",
    "SMALL_MODEL_PARAMS",
    "TINY",
    "TINY_MAX_THREADS",
    "CpuState",
    "choose_threads",
    "configure_torch",
    "cpu_budget",
    "openmp_passive",
    "ort_session_options",
    "prepare_process",
    "read_cpu_state",
    "threads_from_env",
]

log = logging.getLogger(__name__)

ENV = "SLIMDIFF_THREADS"
# Models under this many parameters (toy:shapes 3.3M, the tiny: test models) are capped at
# TINY_MAX_THREADS: a many-way barrier around 10-microsecond operators costs more than it
# saves. Not measured (the measuring machine has 2 CPUs, where the cap changes nothing).
SMALL_MODEL_PARAMS = 50_000_000
TINY_MAX_THREADS = 2
# Named sizes for callers that know the class of model but not its parameter count. IMAGE:
# convolutions on full-resolution activations (a VAE, TAESD), heavy per operator whatever
# the parameter count (policy 3 above): never capped.
TINY, LARGE, IMAGE = "tiny", "large", "image"
_NAMED_WORK = {TINY: 1e6, LARGE: 1e9, IMAGE: math.inf}
# Thread-count variables of the libraries slimdiff's work loads besides torch and ORT, set by
# prepare_process() where the user did not (policy 5): the tokenizers library's Rayon pool,
# numpy's OpenBLAS.
_POOL_VARS = ("RAYON_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_PARALLELISM_VAR = "TOKENIZERS_PARALLELISM"
# What prepare_process() set, so a later call (the CLI run in-process again with another
# --threads) may change its own values but never the user's.
_set_here: dict[str, str] = {}
# OpenMP variables that mean the user already chose how threads wait.
_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
# Set by prepare_process() when it runs before torch is imported (openmp_passive()).
_prepared_before_torch = False


@dataclass(frozen=True)
class CpuState:
    """What `cpu_budget` decides from; `read_cpu_state()` fills it from /proc and /sys."""

    affinity: int  # CPUs in this process's affinity mask
    quota: float | None = None  # CPUs' worth of cgroup quota; None when unlimited


def read_cpu_state(root: str | Path = "/") -> CpuState:
    """The CPUs this process may run on; `root` lets tests fake /proc and /sys."""
    root = Path(root)
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        affinity = os.cpu_count() or 1
    return CpuState(affinity=max(1, affinity), quota=_cgroup_quota(root))


def cpu_budget(state: CpuState | None = None) -> int:
    """The CPUs this process may use: its affinity mask, cut to its cgroup CPU quota.

    Other processes' load does not lower it (see the module docstring for why).

    Example:
        >>> cpu_budget(CpuState(affinity=8, quota=4.0))
        4
        >>> cpu_budget(CpuState(affinity=2, quota=0.5))
        1
    """
    state = read_cpu_state() if state is None else state
    cpus = state.affinity
    if state.quota is not None:
        # floor: threads beyond the quota get the whole cgroup throttled mid-period
        cpus = min(cpus, max(1, math.floor(state.quota)))
    return cpus


def threads_from_env() -> int | None:
    """`SLIMDIFF_THREADS` as a positive int, None when unset or empty."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    return _positive(raw, f"environment variable {ENV}")


def choose_threads(work: str | float, override: int | None = None) -> int:
    """Threads for one model: `override`, else `SLIMDIFF_THREADS`, else the policy.

    `work` is the model's parameter count, or "tiny" / "large" when the caller knows only
    the class, or "image" (IMAGE) for a model whose convolutions run on full-resolution
    activations (a VAE), whatever its size. The policy is `cpu_budget()`, at most
    TINY_MAX_THREADS for models under SMALL_MODEL_PARAMS that are not IMAGE work.

    Example:
        >>> choose_threads("tiny") <= TINY_MAX_THREADS
        True
        >>> choose_threads(IMAGE) == cpu_budget()
        True
        >>> choose_threads(860e6, override=3)
        3
    """
    if override is not None:
        return _positive(override, "threads")
    explicit = threads_from_env()
    if explicit is not None:
        return explicit
    params = _NAMED_WORK.get(work) if isinstance(work, str) else float(work)
    if params is None:
        raise ValueError(f"work must be a parameter count or one of {sorted(_NAMED_WORK)}")
    budget = cpu_budget()
    return min(budget, TINY_MAX_THREADS) if params < SMALL_MODEL_PARAMS else budget


def prepare_process() -> None:
    """Make OpenMP threads sleep, not spin, while they wait, and size the tokenizers' and
    OpenBLAS's pools (policy 5); call before `import torch`, `numpy` or `tokenizers`.

    Leaves a wait policy the user set (OMP_WAIT_POLICY, GOMP_SPINCOUNT, KMP_BLOCKTIME) and
    pool sizes the user set (RAYON_NUM_THREADS, OPENBLAS_NUM_THREADS, TOKENIZERS_PARALLELISM)
    alone. When torch is already imported OpenMP has read its environment, so the setting
    comes too late for this process (`openmp_passive()` stays False); its subprocesses
    still inherit it; the same holds for numpy and OpenBLAS. Logged at debug level only:
    the CLI calls this before logging is set up, and in-process CLI tests have torch
    imported already.
    """
    global _prepared_before_torch
    if "torch" not in sys.modules:
        _prepared_before_torch = True
    try:
        _size_library_pools(threads_from_env() or cpu_budget())
    except UserError:  # a bad SLIMDIFF_THREADS: its one line comes where threads are chosen
        log.debug("%s is not a thread count: the pools keep their defaults", ENV)
    if any(var in os.environ for var in _WAIT_VARS):
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if "torch" in sys.modules:
        log.debug("OMP_WAIT_POLICY set after torch was imported: only subprocesses get it")


def _size_library_pools(n: int) -> None:
    """RAYON_NUM_THREADS and OPENBLAS_NUM_THREADS = `n`, TOKENIZERS_PARALLELISM=false when
    `n` is 1 (no pool at all), each where the user did not set it."""
    wanted = dict.fromkeys(_POOL_VARS, str(n))
    if n == 1:
        wanted[_PARALLELISM_VAR] = "false"
    for var in (*_POOL_VARS, _PARALLELISM_VAR):
        current = os.environ.get(var)
        if current is not None and current != _set_here.get(var):
            continue  # the user's
        if var in wanted:
            os.environ[var] = _set_here[var] = wanted[var]
        elif current is not None:  # ours, from an earlier call with one thread
            del os.environ[var]
            del _set_here[var]
    if "numpy" in sys.modules:
        log.debug("OPENBLAS_NUM_THREADS set after numpy was imported: only subprocesses get it")


def openmp_passive() -> bool:
    """Whether this process's OpenMP threads (torch's) sleep while they wait.

    True when the environment the process started with asked for it, or when
    `prepare_process()` ran before torch was imported and the environment asks for it.
    A torch caller that gets False should stay on one thread (`configure_torch` warns).
    """
    env = os.environ if _prepared_before_torch else _initial_environ()
    return env.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" or env.get("GOMP_SPINCOUNT") == "0"


def _initial_environ() -> dict[str, str]:
    """The environment this process was started with (/proc/self/environ on Linux; later
    changes to os.environ do not show there), or os.environ where that is unreadable."""
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        return dict(os.environ)
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def configure_torch(n: int) -> None:
    """torch on `n` intra-op threads and one inter-op thread.

    The inter-op pool can be sized only before its first use, once per process; later
    calls keep what it has (slimdiff runs no inter-op parallel work, so it only matters
    as threads that exist).
    """
    import torch

    n = _positive(n, "threads")
    if n > 1 and not openmp_passive():
        log.warning(
            "torch on %d threads whose OpenMP spins while waiting: slow on a shared CPU; "
            "call slimdiff.threads.prepare_process() before importing torch, or set "
            "OMP_WAIT_POLICY=PASSIVE",
            n,
        )
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or inter-op work already ran
        log.debug("torch inter-op threads already fixed at %d", torch.get_num_interop_threads())
    log.debug("torch: %d intra-op threads", n)


def ort_session_options(options: Any, n: int, spinning: bool = False) -> Any:
    """Set `n` intra-op threads, one inter-op thread and no spinning on ORT `options`.

    `spinning=True` keeps onnxruntime's default busy-wait between operators, for a caller
    that owns a many-core machine outright: on the 2-CPU machine measured above spinning
    lost in 40 of 44 paired runs. Returns `options`.

    Example:
        >>> import onnxruntime                                        # doctest: +SKIP
        >>> o = ort_session_options(onnxruntime.SessionOptions(), 2)  # doctest: +SKIP
        >>> o.get_session_config_entry("session.intra_op.allow_spinning")  # doctest: +SKIP
        '0'
    """
    n = _positive(n, "threads")
    options.intra_op_num_threads = n
    options.inter_op_num_threads = 1  # only the parallel execution mode uses it
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


MAX_THREADS = 1024  # what --threads takes too: beyond, onnxruntime's pools fail or stall


def _positive(value: Any, what: str) -> int:
    try:
        n = int(str(value).strip())
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_THREADS:
        raise UserError(f"{what} must be a whole number from 1 to {MAX_THREADS}, not {value!r}")
    return n


# ----------------------------------------------------------------------------- readers


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _cgroup_quota(root: Path) -> float | None:
    """The tightest CPU quota on this process's cgroup path, in CPUs; None if unlimited."""
    cgroups = _read(root / "proc" / "self" / "cgroup") or ""
    limits: list[float] = []
    for line in cgroups.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":  # cgroup v2: "0::/path", files cpu.max = "QUOTA PERIOD"
            for folder in _ancestors(root / "sys" / "fs" / "cgroup", rel):
                limit = _v2_limit(_read(folder / "cpu.max"))
                if limit is not None:
                    limits.append(limit)
        elif "cpu" in controllers.split(","):  # v1: cpu.cfs_quota_us / cpu.cfs_period_us
            for mount in ("cpu,cpuacct", "cpu", "cpuacct,cpu"):
                for folder in _ancestors(root / "sys" / "fs" / "cgroup" / mount, rel):
                    limit = _v1_limit(folder)
                    if limit is not None:
                        limits.append(limit)
    return min(limits) if limits else None


def _ancestors(base: Path, rel: str) -> list[Path]:
    """base/rel and each of its parents up to base (a container sees its cgroup as /)."""
    parts = [p for p in rel.strip().split("/") if p and p != ".."]
    return [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _v2_limit(text: str | None) -> float | None:
    fields = (text or "").split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = float(fields[0]), float(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_limit(folder: Path) -> float | None:
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    try:
        q, p = float(quota or "-1"), float(period or "0")
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None
