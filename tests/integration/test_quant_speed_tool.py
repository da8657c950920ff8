"""tools/quant_speed.py end to end on tiny:sd15 (the full-size run is a benchmark)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "quant_speed.py"


def test_quant_speed_times_both_graphs_and_reports_errors(tmp_path):
    cmd = [sys.executable, str(TOOL), "--model", "tiny:sd15", "--size", "64", "--steps", "2"]
    cmd += ["--repeat", "2", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["batch"] == 2 and r["eval_calls"] == 4  # 2 prompts x 2 steps, CFG pairs
    assert len(r["ratios"]) == 2 and r["fp32_ms"] > 0 and r["quant_ms"] > 0
    # Quantization costs something, but the graph computes the model (not noise).
    assert 0 < r["rel_err_vs_fp32_onnx"] < 0.2
    assert r["rel_err_vs_fake_quant_torch"] < 0.2
    assert (
        r["kernels"].get("QLinearConv", 0) > 0 and r["kernels"].get("MatMulIntegerToFloat", 0) > 0
    )
    assert r["quant_bytes"] < 0.6 * r["fp32_bytes"]
