"""tools/train_toy.py on a few steps: stages run, a run stopped with --until then
continued ends bit-identical to one run straight through, and --init goes on from a
written pipeline folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from safetensors.numpy import load_file

TOOL = Path(__file__).resolve().parents[2] / "tools" / "train_toy.py"
SMALL = ["--vae-steps", "2", "--vae-batch", "2", "--images", "16", "--decoder-steps", "2"]
SMALL += ["--batch", "2", "--every", "2", "--threads", "1", "--device", "cpu"]


def _train(work: Path, out: Path, *extra: str, ok: bool = True) -> str:
    cmd = [sys.executable, str(TOOL), "--work", str(work), "--out", str(out), *SMALL, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == (0 if ok else 2), done.stderr[-2000:]
    return done.stderr


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


def test_init_goes_on_from_a_pipeline_folder(tmp_path):
    first, second = tmp_path / "out-first", tmp_path / "out-second"
    _train(tmp_path / "scratch", first, "--steps", "2")
    _train(tmp_path / "more", second, "--steps", "3", "--seed", "1", "--init", str(first))
    info = json.loads((second / "TRAINING.json").read_text())
    assert info["unet_steps"] == 5 and info["decoder_finetuned"] is True
    assert info["continued_from"] == {"folder_unet_steps": 2, "steps_here": 3}
    # The VAE and its latent scaling are the folder's; the UNet trained on.
    vae = "vae/diffusion_pytorch_model.safetensors"
    a, b = load_file(first / vae), load_file(second / vae)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    scale = [
        json.loads((d / "vae/config.json").read_text())["scaling_factor"] for d in (first, second)
    ]
    assert scale[0] == scale[1]
    unet = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(first / unet), load_file(second / unet)
    assert any((a[k] != b[k]).any() for k in a)
    # Nothing of the loading machine (its path, the tokenizers' load flags) is written.
    configs = "".join(f.read_text() for f in second.rglob("*.json"))
    assert "_name_or_path" not in configs and "is_local" not in configs
    # The work folder remembers where it came from; a from-scratch one refuses --init.
    err = _train(tmp_path / "more", second, "--steps", "3", ok=False)
    assert f"continues from {first.resolve()}" in err
    err = _train(tmp_path / "scratch", second, "--steps", "3", "--init", str(first), ok=False)
    assert "from-scratch run" in err
    err = _train(tmp_path / "other", second, "--init", str(tmp_path), ok=False)
    assert "not a pipeline folder" in err
