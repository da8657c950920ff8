"""tools/train_toy.py on a few steps: stages run, and a run stopped with --until then
continued ends bit-identical to one run straight through."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from safetensors.numpy import load_file

TOOL = Path(__file__).resolve().parents[2] / "tools" / "train_toy.py"
SMALL = ["--vae-steps", "2", "--vae-batch", "2", "--images", "16", "--decoder-steps", "2"]
SMALL += ["--batch", "2", "--every", "2", "--threads", "1", "--device", "cpu"]


def _train(work: Path, out: Path, *extra: str) -> None:
    cmd = [sys.executable, str(TOOL), "--work", str(work), "--out", str(out), *SMALL, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_until_then_continue_matches_one_run(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    _train(straight, tmp_path / "out-straight", "--steps", "4")
    _train(split, tmp_path / "out-split", "--steps", "4", "--until", "2")
    first = json.loads((tmp_path / "out-split" / "TRAINING.json").read_text())
    assert first["unet_steps"] == 2
    _train(split, tmp_path / "out-split", "--steps", "4")
    assert json.loads((tmp_path / "out-split" / "TRAINING.json").read_text())["unet_steps"] == 4
    weights = ("unet/diffusion_pytorch_model", "text_encoder/model", "vae/diffusion_pytorch_model")
    for name in weights:
        a = load_file(tmp_path / "out-straight" / f"{name}.safetensors")
        b = load_file(tmp_path / "out-split" / f"{name}.safetensors")
        assert a.keys() == b.keys()
        assert all((a[k] == b[k]).all() for k in a), name
