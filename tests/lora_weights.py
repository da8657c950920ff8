"""A pipeline's weights before a LoRA test, and the check that a refused LoRA left them
as they were (tests/unit/test_lora_*.py)."""

from __future__ import annotations

import torch


def weights(pipe) -> dict[str, torch.Tensor]:
    """A copy of every weight of the pipeline's torch components but the VAE."""
    return {
        f"{name}.{key}": value.clone()
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module) and name != "vae"
        for key, value in module.state_dict().items()
    }


def assert_unchanged(pipe, before: dict) -> None:
    """Every weight as it was, and no adapter layer left (its state-dict keys differ)."""
    after = weights(pipe)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], before[key]) for key in before)
