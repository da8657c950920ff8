"""Training checkpoints: a resumed run ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from slimdiff import trainstate
from slimdiff.trainstate import load_train_state, read_train_state, save_train_state


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def _train(model, opt, steps: range):
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x = torch.randn(16, 4, generator=g)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_resume_matches_an_uninterrupted_run(tmp_path):
    straight, opt = _setup()
    _train(straight, opt, range(6))

    first, opt = _setup()
    _train(first, opt, range(3))
    ckpt = tmp_path / "state.safetensors"
    save_train_state(ckpt, {"model": first}, opt, step=3, extra={"note": "halfway"})
    assert [p.name for p in tmp_path.iterdir()] == ["state.safetensors"]  # no temp left

    resumed, opt2 = _setup()  # fresh weights and optimizer, as after a kill
    step, extra = load_train_state(ckpt, {"model": resumed}, opt2)
    assert (step, extra) == (3, {"note": "halfway"})
    _train(resumed, opt2, range(step, 6))
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_modules_only(tmp_path):
    model, _ = _setup()
    save_train_state(tmp_path / "w.safetensors", {"m": model})
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))
    assert load_train_state(tmp_path / "w.safetensors", {"m": other}) == (0, {})
    assert torch.equal(other[0].weight, model[0].weight)


def _record_temps(monkeypatch, during=None):
    """Record the temp names save_file writes to; call `during()` once, mid-write."""
    temps, real = [], trainstate.save_file

    def save_file(tensors, filename, metadata=None):
        temps.append(filename)
        real(tensors, filename, metadata=metadata)
        if during is not None and len(temps) == 1:
            during()

    monkeypatch.setattr(trainstate, "save_file", save_file)
    return temps


def test_each_save_writes_a_unique_temp_beside_the_checkpoint(tmp_path, monkeypatch):
    model, _ = _setup()
    ckpt = tmp_path / "state.safetensors"
    # A second writer saving the same path while the first is mid-write (two processes,
    # or a signal handler): with one fixed temp name the first rename finds nothing.
    temps = _record_temps(monkeypatch, lambda: save_train_state(ckpt, {"m": model}, step=2))
    save_train_state(ckpt, {"m": model}, step=1)
    assert len(set(temps)) == 2
    assert all(os.path.dirname(t) == str(tmp_path) for t in temps)
    assert read_train_state(ckpt) == (1, {})
    assert [p.name for p in tmp_path.iterdir()] == ["state.safetensors"]


def test_a_failed_save_keeps_the_previous_checkpoint_and_no_temp(tmp_path, monkeypatch):
    model, _ = _setup()
    ckpt = tmp_path / "state.safetensors"
    save_train_state(ckpt, {"m": model}, step=1)

    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"torn")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainstate, "save_file", save_file)
    with pytest.raises(OSError, match="No space"):
        save_train_state(ckpt, {"m": model}, step=2)
    assert read_train_state(ckpt) == (1, {})
    assert [p.name for p in tmp_path.iterdir()] == ["state.safetensors"]


def test_temps_of_saves_killed_midway_are_removed(tmp_path):
    code = "from slimdiff.fsutil import _owner; print(_owner())"
    dead = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    leftover = tmp_path / f".state.safetensors.{dead.stdout.strip()}.0123abcd.tmp"
    leftover.write_bytes(b"torn checkpoint")
    model, _ = _setup()
    save_train_state(tmp_path / "state.safetensors", {"m": model})
    assert [p.name for p in tmp_path.iterdir()] == ["state.safetensors"]


def test_a_damaged_checkpoint_is_set_aside_and_the_work_starts_over(tmp_path, caplog):
    from slimdiff.trainstate import can_resume

    path = tmp_path / "ckpt.safetensors"
    assert not can_resume(None) and not can_resume(path)
    model = torch.nn.Linear(2, 2)
    save_train_state(path, {"m": model}, None, step=3)
    assert can_resume(path)
    path.write_bytes(path.read_bytes()[:40])  # cut by another program
    with caplog.at_level("WARNING", logger="slimdiff.trainstate"):
        assert not can_resume(path)
    assert not path.exists() and (tmp_path / "ckpt.safetensors.damaged").is_file()
    assert "starting over" in caplog.text
