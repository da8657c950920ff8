"""A bench results row as `_bench_one` returns it, for tests of the report and the loop."""

from __future__ import annotations


def bench_row(name: str = "r", **over) -> dict:
    row = {
        "name": name,
        "size": [64, 64],
        "steps": 4,
        "guidance": 7.5,
        "guidance_rescale": 0.0,
        "backend": "ort-cpu",
        "params": 1e6,
        "bytes_on_disk": 2e6,
        "denoiser_bytes": 1e6,
        "flops_per_step": 4.5e8,
        "latency_ms": {"denoiser_step": 20.0, "denoiser_step_p90": 21.0, "end_to_end": 400.0},
        "torch_eager_ms_per_step": 70.0,
        "speedup_vs_eager": 3.5,
        "peak_rss_mib": 120.0,
        "flop_floor_fraction": 0.125,
        "fidelity": {"psnr_db": 40.0, "latent_rel_err": 1e-3},
        "images": [],
        "reference_images": [],
    }
    return {**row, **over}
