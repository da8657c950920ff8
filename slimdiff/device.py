"""Which torch device compression and calibration run on: the recipe's `device:` or --device.

Example:
    >>> resolve_device("auto")   # "cuda" on a GPU machine
    'cpu'
"""

from __future__ import annotations

from slimdiff.errors import UserError

__all__ = ["resolve_device"]


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" when torch sees a GPU, else "cpu"; "cuda[:N]" checked to exist."""
    import torch

    if not isinstance(device, str):
        raise UserError(f"device {device!r}: use a name, one of auto, cpu, cuda, cuda:N")
    base, _, index = device.partition(":")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if base != "cuda" or (index and not index.isdigit()):
        raise UserError(f"device {device!r} is not one of: auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise UserError(
            f"device {device!r}: torch sees no CUDA GPU here (torch {torch.__version__}); "
            "use --device cpu, or install a CUDA build of torch"
        )
    if index and int(index) >= torch.cuda.device_count():
        raise UserError(
            f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
            "use cuda:0"
        )
    return device
