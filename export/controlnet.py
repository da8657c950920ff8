"""The ControlNets an export joins to the UNet (`export --controlnet`): the list given,
refusals that need no model (the folder or file, the target, the weights route), and each
ControlNet loaded and checked against the model's UNet (slimdiff/models/controlnet.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from slimdiff.export.components import model_device
from torch import nn

from slimdiff.errors import UserError
from slimdiff.limits import MAX_CONTROLNETS
from slimdiff.models.lazy import is_lazy, materialize
from slimdiff.models.loading import LoadedModel
from slimdiff.models.vae import vae_scale_factor

__all__ = ["check_controlnet_export", "controlnet_specs", "load_checked"]


def controlnet_specs(controlnet: str | Sequence[str] | None) -> list[str]:
    """export_bundle's `controlnet` as a list (none, one or several); UserError for more
    than MAX_CONTROLNETS. One may come twice (two poses, one OpenPose ControlNet)."""
    if controlnet is None:
        return []
    specs = [controlnet] if isinstance(controlnet, (str, Path)) else list(controlnet)
    if len(specs) > MAX_CONTROLNETS:
        raise UserError(
            f"{len(specs)} ControlNets: a bundle takes at most {MAX_CONTROLNETS} (each adds "
            "about 40% to every step)"
        )
    return [str(s) for s in specs]


def check_controlnet_export(spec: str, weights: str) -> None:
    """UserError for a ControlNet export that cannot be: a bad folder (controlnet_folder),
    or a weights route that cannot take one (every target can). Cheap: callers run it
    before the model loads."""
    from slimdiff.models.controlnet import controlnet_folder

    if weights == "stream":
        raise UserError(
            "--controlnet traces the UNet and the ControlNet together from weights in memory, "
            "which --weights stream never loads; use --weights auto or memory"
        )
    controlnet_folder(spec)


def load_checked(
    model: LoadedModel, spec: str, weights: str, allow_pickle: bool = False
) -> nn.Module:
    """The ControlNet at `spec`, loaded and checked against `model`'s UNet (UserError),
    with that UNet's weights in memory: the two trace as one graph."""
    from slimdiff.models.controlnet import check_controlnet, load_controlnet

    check_controlnet_export(spec, weights)  # before the weights load
    if is_lazy(model.denoiser):
        materialize(model.denoiser)
    controlnet = load_controlnet(spec, model.denoiser, allow_pickle=allow_pickle)
    check_controlnet(controlnet, model.denoiser, vae_scale_factor(model.pipe.vae.config), spec)
    return controlnet.to(model_device(model.denoiser))
