"""tools/unet_speed.py end to end on tiny:sdxl's UNet (the full-width run is a benchmark)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

TOOL = Path(__file__).resolve().parents[2] / "tools" / "unet_speed.py"


def test_unet_speed_exports_times_and_ranks_variants(tmp_path):
    cmd = [sys.executable, str(TOOL), "--tiny", "--variants", "base", "ssd-1b", "magnitude-20"]
    cmd += ["--size", "64", "--repeat", "2", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "results.json").read_text())
    base, student = result["variants"]["base"], result["variants"]["ssd-1b"]
    assert result["size"] == [64, 64] and result["batch"] == 2
    # SSD-1B halves the deepest stage's transformer depths and drops the mid-block's.
    assert 0 < student["params"] < base["params"]
    weights = {}
    for name, row in (("base", base), ("ssd-1b", student)):
        assert len(row["ms_runs"]) == 2 and row["ms_per_step"] > 0
        # Each variant's own graph was exported and timed: its weights are its parameters
        # (to 1%: the exporter folds constants and shares identical initializers).
        graph = onnx.load(str(tmp_path / name / "unet" / "model.onnx")).graph
        weights[name] = sum(int(np.prod(t.dims)) for t in graph.initializer)
        assert abs(weights[name] / row["params"] - 1) < 0.01, name
    assert weights["ssd-1b"] < weights["base"]
    # magnitude-20: 20% of the maskable (head and FFN-neuron) parameters pruned.
    pruned = result["variants"]["magnitude-20"]
    graph = onnx.load(str(tmp_path / "magnitude-20" / "unet" / "model.onnx")).graph
    assert abs(sum(int(np.prod(t.dims)) for t in graph.initializer) / pruned["params"] - 1) < 0.01
    assert 0.8 * base["params"] < pruned["params"] < 0.95 * base["params"]
    assert base["speedup_vs_base"] == 1.0
    assert student["speedup_vs_base"] == base["ms_per_step"] / student["ms_per_step"]
    assert "| ssd-1b |" in done.stdout
