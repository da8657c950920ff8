"""tools/gpu_latency.py on the CPU with tiny denoisers: the rows, the FLOP-floor fraction and
the skips a short GPU lease relies on (the GPU run itself is a benchmark, BENCHMARKS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "gpu_latency.py"


def _run(tmp_path, *extra: str) -> dict:
    cmd = [sys.executable, str(TOOL), "--device", "cpu", "--tiny"]
    if "--backends" not in extra:
        cmd += ["--backends", "eager"]
    cmd += ["--repeat", "2", "--warmup", "1", "--out", str(tmp_path), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((tmp_path / "results.json").read_text())


def test_rows_per_family_and_variant_with_the_flop_floor(tmp_path):
    families = ["--families", "sdxl", "sd15", "flux"]
    result = _run(tmp_path, *families, "--variants", "base", "ssd-1b", "bk-sdm-tiny")
    rows = {(r["family"], r["variant"]): r for r in result["rows"]}
    assert sorted(rows) == [
        ("flux", "base"),
        ("sd15", "base"),
        ("sd15", "bk-sdm-tiny"),
        ("sdxl", "base"),
        ("sdxl", "ssd-1b"),
    ]
    assert rows[("flux", "base")]["batch"] == 1  # no classifier-free guidance batch
    assert rows[("sdxl", "base")]["batch"] == 2
    # Presets written for another family's UNet are skipped with the reason, not fatal.
    assert any(s.startswith("sdxl bk-sdm-tiny: UserError") for s in result["skipped"])
    assert any(s.startswith("sd15 ssd-1b: UserError") for s in result["skipped"])
    rate = result["matmul"]["tflops"]
    for r in rows.values():
        assert r["size"] == [64, 64] and r["backend"] == "eager"
        assert r["ms_per_step"] > 0 and r["rel_err_vs_eager"] == 0.0
        expected = r["flops_per_step"] / (r["ms_per_step"] / 1e3) / (rate * 1e12)
        assert abs(r["flop_floor_fraction"] - expected) < 1e-12
    for family, student in (("sdxl", "ssd-1b"), ("sd15", "bk-sdm-tiny")):
        assert rows[(family, student)]["params"] < rows[(family, "base")]["params"]
        assert rows[(family, student)]["flops_per_step"] < rows[(family, "base")]["flops_per_step"]


def test_work_past_the_budget_is_skipped_and_listed(tmp_path):
    from slimdiff.compress.blocks.presets import presets_for

    result = _run(tmp_path, "--families", "sd15", "--budget", "0")
    assert result["rows"] == []
    variants = ("base", *presets_for("sd15"), "magnitude-20")  # the default plan
    assert len(variants) == 5
    assert result["skipped"] == [f"sd15 {v}: past the budget" for v in variants]


def test_onnx_backends_run_the_exported_graph_or_say_why_not(tmp_path):
    """ort-cpu stands in for ort-cuda here (the same runtime backend, IO binding off); a
    backend whose library is missing is a skipped row naming the install, not a crash."""
    import importlib.util

    result = _run(tmp_path, "--families", "sd15", "--variants", "base", "--backends", "eager",
                  "ort-cpu", "trt-rtx")  # fmt: skip
    rows = {r["backend"]: r for r in result["rows"]}
    assert set(rows) <= {"eager", "ort-cpu", "trt-rtx"} and {"eager", "ort-cpu"} <= set(rows)
    onnx = rows["ort-cpu"]
    assert onnx["ms_per_step"] > 0 and onnx["rel_err_vs_eager"] < 1e-5
    assert onnx["flops_per_step"] == rows["eager"]["flops_per_step"]
    assert (tmp_path / "sd15" / "base" / "ort-cpu" / "unet" / "model.onnx").is_file()
    if importlib.util.find_spec("onnxruntime_ep_nv_tensorrt_rtx") is None:
        assert result["skipped"] == [
            "sd15 base trt-rtx: UserError: backend trt-rtx needs the TensorRT-RTX execution "
            "provider for onnxruntime, which is not installed: pip install "
            "'onnxruntime>=1.24' onnxruntime-ep-nv-tensorrt-rtx-cu13"
        ]
