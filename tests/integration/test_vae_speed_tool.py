"""tools/vae_speed.py end to end on tiny:sdxl's VAE against a TAESD-config tiny decoder
(the full-size run is a benchmark)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

TOOL = Path(__file__).resolve().parents[2] / "tools" / "vae_speed.py"


def test_vae_speed_exports_counts_and_times_both_decoders(tmp_path):
    cmd = [sys.executable, str(TOOL), "--smoke", "--sizes", "64", "--repeat", "1"]
    done = subprocess.run([*cmd, "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "results.json").read_text())["decoders"]
    assert rows["taesd"]["params"] == 1_222_531  # TAESD's decoder
    for name, row in rows.items():
        graph = onnx.load(str(tmp_path / name / "model.onnx")).graph
        weights = sum(int(np.prod(t.dims)) for t in graph.initializer)
        assert abs(weights / row["params"] - 1) < 0.01, name  # the decoder, nothing else
        cell = row["sizes"]["64"]
        assert cell["ms"] > 0 and cell["gflops"] > 0
    assert "| taesd | 1,222,531 | 64 |" in done.stdout
