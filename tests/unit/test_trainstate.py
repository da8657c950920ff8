"""Training checkpoints: a resumed run ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import torch

from slimdiff.trainstate import load_train_state, save_train_state


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
    assert not (tmp_path / "state.safetensors.tmp").exists()

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
