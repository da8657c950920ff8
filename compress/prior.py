"""What earlier compression did to the denoiser a pass is given (an artifact compressed
before, loaded as the recipe's model), for the passes' preflights: a quantized denoiser
is not pruned or quantized again, and block removal distils from a denoiser whose layers
are what its config describes (not pruned). Refused before the teacher's trajectories.

Example:
    >>> refuse_quantized(unet, "prune.ecodiff", "prune before quantizing")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from slimdiff.errors import UserError

__all__ = ["refuse_quantized", "refuse_reshaped"]


def refuse_quantized(denoiser: Any, what: str, fix: str) -> None:
    """UserError when `denoiser` holds quant.quest's layers (a quantized artifact)."""
    from slimdiff.compress.quant.layers import QuantLayer

    names = [name for name, m in denoiser.named_modules() if isinstance(m, QuantLayer)]
    if names:
        raise UserError(
            f"{what}: the model is quantized already ({len(names)} quant.quest layers, e.g. "
            f"{names[0]}); {fix}"
        )


def refuse_reshaped(denoiser: Any, what: str, fix: str) -> None:
    """UserError when `denoiser`'s weights are not the shapes its config builds (pruned
    heads or neurons, quantized layers): compared with the model built from its config on
    the meta device (no memory, no weights)."""
    import torch

    config = getattr(denoiser, "config", None)
    if config is None or not hasattr(type(denoiser), "from_config"):
        return
    with torch.device("meta"):
        built = type(denoiser).from_config(config)
    expected = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in denoiser.state_dict().items()}
    differ = sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))
    if differ:
        raise UserError(
            f"{what}: the {type(denoiser).__name__}'s layers are not what its config "
            f"describes ({len(differ)} tensors, e.g. {differ[0]}: pruned or quantized by an "
            f"earlier compression); {fix}"
        )
