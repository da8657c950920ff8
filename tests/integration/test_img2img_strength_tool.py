"""tools/img2img_strength.py end to end on the tiny:sdxl bundle (the toy:shapes run is a
benchmark): one JSON row per strength and mode, and the steps each strength runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TOOL = Path(__file__).resolve().parents[2] / "tools" / "img2img_strength.py"


def _rows(bundle: Path, *extra: str) -> list[dict]:
    cmd = [sys.executable, str(TOOL), str(bundle), "--pairs", "2", "--steps", "4", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_the_strength_tool_measures_each_strength_and_mode(tiny_bundle):
    _, bundle = tiny_bundle("sdxl")
    judged, *rows = _rows(bundle, "--strengths", "0.5", "1.0")
    # the rendered sources are judged as drawn, and not as the edit asks
    assert judged == {"sources_judged_as_captioned": 1.0, "sources_judged_as_edited": 0.0}
    assert [(r["strength"], r["steps_run"]) for r in rows] == [(0.5, 2), (1.0, 4)]
    assert all(0 <= r["edit_accuracy"] <= 1 and r["ms_per_image"] > 0 for r in rows)
    inpaint = _rows(bundle, "--strengths", "1.0", "--inpaint")
    assert [(r["strength"], r["mode"]) for r in inpaint] == [(1.0, "inpaint"), (1.0, "img2img")]
    assert all(r["kept_half_abs_diff"] > 0 for r in inpaint)
