"""This process's resident memory, for logs and reports (standard library only: the
torch-free runtime's bench worker uses it too).

Example:
    >>> peak_rss_mib() >= rss_mib() > 0
    True
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import sys
from pathlib import Path

__all__ = ["available_bytes", "peak_rss_mib", "release_memory", "release_memory_past", "rss_mib"]


def _status_mib(field: str) -> float | None:
    # /proc/self/status (Linux): "VmRSS:   123456 kB"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def rss_mib() -> float:
    """Resident memory now (VmRSS); the peak where /proc is missing."""
    now = _status_mib("VmRSS")
    return peak_rss_mib() if now is None else now


def peak_rss_mib() -> float:
    """The high-water resident memory of this process (VmHWM, else ru_maxrss)."""
    peak = _status_mib("VmHWM")
    if peak is not None:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return maxrss / (1024.0**2 if sys.platform == "darwin" else 1024.0)


def available_bytes() -> int | None:
    """Memory the OS can give this process now without swapping (MemAvailable, capped by a
    cgroup limit); None where neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:  # cgroup v2: a container's limit, less its anonymous memory (page cache is
        # counted in memory.current but given back under pressure)
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        stat = Path("/sys/fs/cgroup/memory.stat").read_text().split()
        used = int(stat[stat.index("anon") + 1])
        if limit != "max":
            found.append(max(int(limit) - used, 0))
    except (OSError, ValueError, IndexError):
        pass
    return min(found) if found else None


# Freed bytes past which release_memory_past collects and trims at once.
RELEASE_BYTES = 256 * 2**20


def release_memory_past(nbytes: int) -> None:
    """release_memory() when `nbytes` (what was just freed) reach RELEASE_BYTES. Below,
    the cycle collection alone costs more than it gives back: 0.27 s a call in a process
    holding torch, diffusers and a tiny SDXL pipeline, 4 calls in an 8 s export of it."""
    if nbytes >= RELEASE_BYTES:
        release_memory()


def release_memory() -> None:
    """Collect reference cycles now and give free heap pages back to the OS.

    onnxruntime.transformers' optimizer leaves its model in reference cycles, so a deleted
    graph's weights (protobuf arenas) stay allocated until the cyclic collector runs:
    measured on fp32 SDXL, 21.6 GiB resident during the UNet's parity session, the graph
    and the session's copy of it side by side. The runtime's low-memory mode releases its
    sessions the same way (runtime/sessions.py).
    """
    gc.collect()
    if sys.platform.startswith("linux"):
        # glibc keeps freed small blocks in its heap; malloc_trim returns every free page.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
