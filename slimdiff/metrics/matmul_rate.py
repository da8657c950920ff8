"""The matrix rate a device reaches on large products: the denominator of a bench row's
"fraction of the FLOP floor" (FLOPs per denoiser step / measured time / this rate).

Measured, not looked up: the datasheet peak of a GPU (an H100's 989 TFLOP/s dense bf16) is
not what a real GEMM reaches (about 790 on large squares, the figure issue 14 cites), and a
CPU's depends on the threads the bench gives the runtime. CUDA: bf16 8192^3 products timed
with CUDA events; CPU: fp32 2048^3 products (what ORT-CPU's MLAS computes in) on `threads`
threads. Medians of `repeat` after one warm-up.

Example:
    >>> matmul_tflops("cpu", threads=2)["tflops"]   # doctest: +SKIP
    0.21
"""

from __future__ import annotations

import statistics
import time
from typing import Any

__all__ = ["matmul_tflops"]


def matmul_tflops(device: str, threads: int | None = None, repeat: int = 5) -> dict[str, Any]:
    """{"tflops", "dtype", "n", "device"}: the median rate of n x n x n products."""
    import torch

    cuda = device.startswith("cuda")
    n, dtype = (8192, torch.bfloat16) if cuda else (2048, torch.float32)
    previous = torch.get_num_threads()
    if threads and not cuda:
        torch.set_num_threads(threads)
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        seconds = []
        for i in range(repeat + 1):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
                start.record()
                torch.mm(a, b)
                end.record()
                end.synchronize()
                elapsed = start.elapsed_time(end) / 1e3
            else:
                t0 = time.perf_counter()
                torch.mm(a, b)
                elapsed = time.perf_counter() - t0
            if i:  # the first call warms up (allocations, kernel selection)
                seconds.append(elapsed)
    finally:
        torch.set_num_threads(previous)
    return {
        "tflops": 2 * n**3 / statistics.median(seconds) / 1e12,
        "dtype": str(dtype).removeprefix("torch."),
        "n": n,
        "device": device,
    }
