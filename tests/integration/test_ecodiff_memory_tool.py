"""tools/ecodiff_memory.py end to end on tiny:sd15 at 64x64 (the full-width run is a
benchmark: docs/BENCHMARKS.md, "EcoDiff mask learning: peak memory vs denoising steps")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "ecodiff_memory.py"


def _run(out: Path, *args: str) -> tuple[dict, str]:
    cmd = [sys.executable, str(TOOL), "--tiny", "--out", str(out), "--threads", "1", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((out / "results.json").read_text()), done.stdout


def test_each_step_count_is_measured_in_its_own_child(tmp_path):
    result, stdout = _run(tmp_path, "--steps", "2", "4", "--plain-steps", "2")
    assert result["model"] == "tiny:sd15" and result["size"] == [64, 64]
    assert result["batch"] == 2  # guidance 7.5: CFG batches (uncond, cond)
    runs = {(r["checkpointing"], r["steps"]): r for r in result["runs"]}
    assert list(runs) == [(True, 2), (True, 4), (False, 2)]
    units = {r["mask_units"] for r in runs.values()}
    assert len(units) == 1 and units.pop() > 0  # every run learns the same masks
    assert len({r["code"] for r in runs.values()}) == 1  # and ran the same source files
    for (ckpt, steps), r in runs.items():
        assert r["status"] == "ok" and r["cfg"] is True and r["torch_threads"] == 1
        assert (r["checkpointing"], r["steps"]) == (ckpt, steps)
        assert r["peak_rss_gib"] >= r["baseline_gib"] > 0.1  # torch alone is more than that
        assert abs(r["delta_gib"] - (r["peak_rss_gib"] - r["baseline_gib"])) < 0.002
        assert r["peak_source"] in ("kernel", "sampled") and r["seconds"] >= 0
    # The same prompt, noise, masks and teacher: the two paths compute the same loss.
    assert abs(runs[True, 2]["loss"] - runs[False, 2]["loss"]) < 1e-4 * runs[False, 2]["loss"]
    ratios = result["ratios"]
    assert ratios["steps"] == [2, 4]
    assert ratios["peak_rss"] == round(
        runs[True, 4]["peak_rss_gib"] / runs[True, 2]["peak_rss_gib"], 3
    )
    assert "| yes | 4 |" in stdout and "checkpointed 4 steps / 2 steps" in stdout


def test_a_child_past_the_memory_cap_is_killed_and_recorded(tmp_path):
    # 0.15 GiB: less than importing torch takes, so each child is killed while it starts.
    result, stdout = _run(tmp_path, "--max-gib", "0.15", "--steps", "2", "--plain-steps", "2", "4")
    ckpt, plain2, plain4 = result["runs"]
    assert ckpt["status"] == plain2["status"] == "out of memory"
    assert plain2["note"].startswith("out of memory at 2 steps")
    assert plain2["rss_when_stopped_gib"] >= 0.15
    # More steps by plain backprop need more memory still: not run.
    assert plain4["status"] == "not run" and "at 2 steps" in plain4["note"]
    assert result["ratios"] == {}
    assert "out of memory at 2 steps" in stdout
