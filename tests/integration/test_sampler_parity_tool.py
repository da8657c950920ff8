"""tools/sampler_parity.py on its first cases (the whole run is a benchmark:
docs/BENCHMARKS.md, "EcoDiff's sampler against diffusers")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "sampler_parity.py"


def test_prints_both_tables_with_zero_error_on_its_first_cases():
    cmd = [sys.executable, str(TOOL), "--limit", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| ")]
    steps = [r for r in rows if len(r) == 3 and "Scheduler" in r[0]]
    ecodiff = [r for r in rows if len(r) == 4 and r[0].strip().startswith("tiny:")]
    assert [r[0].strip() for r in steps] == ["EulerDiscreteScheduler"]
    assert [r[1].strip() for r in ecodiff] == ["PNDMScheduler"]
    errors = [float(r[2]) for r in steps] + [float(v) for r in ecodiff for v in r[2:]]
    assert all(0 <= e < 1e-5 for e in errors), errors
