"""tools/controlnet_cost.py end to end on tiny:sd15 (the full-size run is a benchmark)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "controlnet_cost.py"

pytestmark = pytest.mark.slow


def test_controlnet_cost_times_both_graphs(tmp_path):
    cmd = [sys.executable, str(TOOL), "--model", "tiny:sd15", "--size", "64", "--repeat", "2"]
    done = subprocess.run(
        [*cmd, "--out", str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["batch"] == 2 and r["size"] == [64, 64]
    assert all(len(runs) == 2 for runs in r["ms_runs"].values())
    # the ControlNet adds parameters, bytes and time; at scale 0 it adds nothing to the output
    assert r["params"]["unet+controlnet"] > 1.3 * r["params"]["unet"]
    assert r["graph_bytes"]["unet+controlnet"] > 1.3 * r["graph_bytes"]["unet"]
    assert r["controlnet_cost"] > 1.0
    assert r["rel_err_at_scale_0"] < 1e-5
