"""ControlNets: a diffusers ControlNetModel read from a folder (or the hub), checked against
the model it steers, and joined with its UNet into one denoiser for export.

The bundle's denoiser graph is the UNet and its ControlNets in one (ControlledDenoiser), as
onnxruntime's stable-diffusion tooling (UNet2DConditionControlNetModel) and TensorRT's
demoDiffusion (UNetXLModelControlNet) build theirs: two more inputs, the control images
stacked (`controlnet_cond`, (N, B, 3, 8H, 8W) pixels in [0, 1], N ControlNets) and their
conditioning scales (`conditioning_scale`, (N,)), and one graph, one engine and one call
per step.

A ControlNet fits a UNet whose down path it mirrors: one residual per UNet skip connection
(conv_in's, each ResNet's, each downsampler's) of the same width, and one for the mid
block. Block removal (BK-SDM, SSD-1B, Vega, KOALA) drops ResNets from the down path, so a
ControlNet trained for the full model does not fit the compressed one: diffusers would zip
the residuals onto the wrong skips without a word (UNet2DConditionModel.forward), so it is
refused here, naming what differs. BK-SDM's mid-block removal keeps the mid residual's
place (diffusers adds it to the down path's output), as BK-SDM's ControlNet users do
(BK-SDM #64).

Example:
    >>> controlnet = load_controlnet("controlnet-canny", model)   # doctest: +SKIP
    >>> denoiser = ControlledDenoiser(model.denoiser, [controlnet]) # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimdiff.errors import UserError
from slimdiff.limits import MAX_CONTROLNETS
from slimdiff.models.arch import TensorSpec
from slimdiff.models.hub import hub_offline, local_path, looks_like_hub_id
from slimdiff.models.kinds import (
    CONTROL_GUESS,
    CONTROL_IMAGE,
    CONTROL_ROWS,
    CONTROL_SCALE,
    is_inpainting,
)
from slimdiff.models.weights import dtype_keyword

__all__ = [
    "CONTROL_IMAGE",
    "CONTROL_SCALE",
    "MAX_CONTROLNETS",
    "ControlledDenoiser",
    "check_controlnet",
    "check_controlnet_config",
    "control_specs",
    "controlnet_folder",
    "load_controlnet",
    "pixels_per_latent",
    "precheck_controlnets",
]


def control_specs(count: int) -> tuple[TensorSpec, ...]:
    """The inputs `count` ControlNets add to the UNet's, in graph order: their control
    images stacked, one scale each, and guess mode's row weights and switch
    (ControlledDenoiser). "8H"/"8W": image pixels, the latent side times the VAE's (and
    the ControlNets') pixels per latent pixel."""
    return (
        TensorSpec(CONTROL_IMAGE, "float32", (count, "B", 3, "8H", "8W")),
        TensorSpec(CONTROL_SCALE, "float32", (count,)),
        TensorSpec(CONTROL_ROWS, "float32", ("B",)),
        TensorSpec(CONTROL_GUESS, "float32", (1,)),
    )


_CLASS = "ControlNetModel"
# Single files: read when .safetensors; pickled ones refused by name (never unpickled).
_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# ControlNet classes diffusers has that a UNet bundle cannot take (yet), and why.
_OTHER_CLASSES = {
    "SD3ControlNetModel": "an SD3 ControlNet",
    "SD3MultiControlNetModel": "an SD3 ControlNet",
    "FluxControlNetModel": "a FLUX ControlNet",
    "FluxMultiControlNetModel": "a FLUX ControlNet",
    "ControlNetUnionModel": "a ControlNet-Union (several control types in one)",
    "ControlNetXSAdapter": "a ControlNet-XS adapter",
    "SparseControlNetModel": "a video (AnimateDiff) ControlNet",
    "T2IAdapter": "a T2I-Adapter, not a ControlNet",
}


def controlnet_folder(spec: str) -> Path | str:
    """The ControlNet `spec` names, its config read and its class checked: a ControlNetModel
    folder, or a pipeline folder saved with one (its controlnet/); or a single file (its
    path, read by load_controlnet). A path that does not exist locally is taken as a hub
    id and returned as given."""
    path = local_path(spec)
    if not path.exists():
        if looks_like_hub_id(spec):
            return spec  # a hub id: from_pretrained fetches it (or finds it in the cache)
        raise UserError(f"ControlNet {spec}: no such folder or file")
    if path.is_file():
        if path.suffix.lower() not in _FILE_SUFFIXES:
            raise UserError(
                f"ControlNet {spec}: a ControlNet file is a .safetensors file (or pass a "
                "diffusers ControlNet folder)"
            )
        return path  # a single-file ControlNet (models/controlnet_file.py)
    if not (path / "config.json").is_file() and (path / "controlnet" / "config.json").is_file():
        path = path / "controlnet"  # a ControlNet pipeline's folder
    config = _read_config(path)
    name = config.get("_class_name")
    if name in _OTHER_CLASSES:
        raise UserError(
            f"ControlNet {spec} is {_OTHER_CLASSES[name]} ({name}); slimdiff takes SD1.5 "
            "and SDXL ControlNets (ControlNetModel) only"
        )
    if name != _CLASS:
        raise UserError(
            f"ControlNet {spec}: config.json names {name!r}, not a {_CLASS}; pass the "
            "ControlNet's own folder"
        )
    return path


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise UserError(
            f"ControlNet {path} has no config.json: pass a diffusers ControlNet folder"
        ) from None
    except (OSError, ValueError) as err:
        raise UserError(f"ControlNet {path}/config.json is not readable JSON ({err})") from None
    if not isinstance(config, dict):
        raise UserError(f"ControlNet {path}/config.json is not a JSON object")
    return config


def load_controlnet(
    spec: str,
    unet: nn.Module | None = None,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
) -> nn.Module:
    """The ControlNetModel at `spec` (controlnet_folder), for inference (no gradients), on
    the CPU: from safetensors (an fp16 variant too, where it is all the folder holds), or
    from pickled .bin weights with `allow_pickle`. A single file is configured after
    `unet`, the UNet it steers (models/controlnet_file.py)."""
    from diffusers import ControlNetModel

    where = controlnet_folder(spec)
    if isinstance(where, Path) and where.is_file():
        if unet is None:
            raise ValueError("a single-file ControlNet is configured after its UNet: pass unet")
        from slimdiff.models.controlnet_file import load_controlnet_file

        return load_controlnet_file(where, unet, dtype)
    local = isinstance(where, Path)
    safe, variant = _weights_files(where, spec, allow_pickle) if local else (True, None)
    try:
        with _quiet_loaders():
            controlnet = ControlNetModel.from_pretrained(
                str(where),
                use_safetensors=safe,
                variant=variant,
                **dtype_keyword(dtype),
                local_files_only=local or hub_offline(),
            )
    except (OSError, ValueError, RuntimeError) as err:
        detail = " ".join(str(err).split())[:240] or type(err).__name__
        fix = (
            "its weights do not fit its config.json, or a file is damaged"
            if local
            else "download it first (huggingface-cli download) and pass its folder"
        )
        raise UserError(f"ControlNet {spec}: could not load it: {fix} ({detail})") from None
    controlnet.requires_grad_(False)
    return controlnet.eval()


_WEIGHTS = "diffusion_pytorch_model"


def _weights_files(folder: Path, spec: str, allow_pickle: bool) -> tuple[bool, str | None]:
    """from_pretrained's (use_safetensors, variant) for a local folder, from the files it
    holds: its safetensors (whole or sharded), else an fp16 variant's, else (with
    `allow_pickle`) its .bin; UserError naming what is missing otherwise."""
    names = {p.name for p in folder.iterdir()}
    for variant in (None, "fp16"):
        stem = _WEIGHTS if variant is None else f"{_WEIGHTS}.{variant}"
        if {f"{stem}.safetensors", f"{stem}.safetensors.index.json"} & names:
            return True, variant
    if any(n.startswith(_WEIGHTS) and n.endswith(".bin") for n in names):
        if allow_pickle:
            return False, None
        raise UserError(
            f"ControlNet {spec} holds only pickled weights (.bin; unpickling can run code): "
            "pass --allow-pickle if you trust them, or use a .safetensors copy"
        )
    raise UserError(f"ControlNet {spec} has no {_WEIGHTS}.safetensors (no weights to load)")


@contextlib.contextmanager
def _quiet_loaders() -> Iterator[None]:
    """diffusers' and huggingface_hub's own lines (an error logged before the exception
    this module turns into one line, deprecation warnings) kept off the terminal."""
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def pixels_per_latent(config: Mapping[str, Any]) -> int:
    """How many image pixels a ControlNet (its config) maps to one latent pixel: its
    conditioning embedding halves the side once per step between its channel counts."""
    return 2 ** (len(config["conditioning_embedding_out_channels"]) - 1)


def _skip_channels(down_blocks, first: int) -> list[int]:
    """Widths of a down path's residuals, in order: conv_in's, then each block's ResNets'
    and downsamplers' (diffusers' down blocks append one per ResNet and per downsampler)."""
    widths = [first]
    for block in down_blocks:
        widths += [resnet.out_channels for resnet in block.resnets]
        widths += [down.out_channels for down in (block.downsamplers or ())]
    return widths


def check_controlnet(controlnet: nn.Module, unet: nn.Module, vae_scale: int, spec: str) -> None:
    """UserError, naming what differs, when `controlnet` cannot steer `unet` (a UNet with
    latents of `vae_scale` pixels per latent pixel): another denoiser kind, another text
    width or added conditioning, another latent grid (check_controlnet_config), or another
    down path."""
    where = f"ControlNet {spec}"
    check_controlnet_config(dict(controlnet.config), unet, vae_scale, spec)
    ours = _skip_channels(unet.down_blocks, unet.conv_in.out_channels)
    theirs = [conv.out_channels for conv in controlnet.controlnet_down_blocks]
    mid = controlnet.controlnet_mid_block.out_channels
    if ours != theirs or mid != ours[-1]:
        raise UserError(
            f"{where} gives {len(theirs)} down residuals of widths {theirs}, but this UNet's "
            f"down path has {len(ours)} skips of widths {ours}: the ControlNet was trained for "
            "another UNet (block removal drops ResNets from the down path); use one trained "
            "on this model's UNet (diffusers' ControlNetModel.from_unet, then training)"
        )


def check_controlnet_config(
    config: dict[str, Any], unet: nn.Module, vae_scale: int, spec: str
) -> None:
    """check_controlnet's checks that a ControlNet's config alone answers (a folder's
    config.json, before any weights load): the denoiser kind, the text width and added
    conditioning, the latent channels and the pixels per latent pixel."""
    from diffusers import ControlNetModel

    where = f"ControlNet {spec}"
    if not hasattr(unet, "down_blocks") or not hasattr(unet, "conv_in"):
        raise UserError(
            f"{where}: this model's denoiser is a {type(unet).__name__}; ControlNets steer "
            "SD1.5 and SDXL UNets (UNet2DConditionModel) only"
        )
    defaults = {
        k: p.default
        for k, p in inspect.signature(ControlNetModel.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    cn, un = {**defaults, **config}, unet.config
    if cn["conditioning_channels"] != 3:
        raise UserError(
            f"{where} takes {cn['conditioning_channels']}-channel control images; slimdiff "
            "feeds RGB (3)"
        )
    for key in (
        "cross_attention_dim",
        "addition_embed_type",
        "projection_class_embeddings_input_dim",
    ):
        if cn.get(key) != un.get(key):
            raise UserError(
                f"{where} has {key} {cn.get(key)}, this model's UNet {un.get(key)}: it is a "
                "ControlNet for another model (SD1.5 vs SDXL, or SDXL base vs its refiner)"
            )
    # an inpainting UNet takes the latents, the mask and the masked image's latents
    latent_channels = (un.in_channels - 1) // 2 if is_inpainting(un) else un.in_channels
    if cn["in_channels"] != latent_channels:
        raise UserError(
            f"{where} takes {cn['in_channels']}-channel latents, this model has {latent_channels}"
        )
    pixels = pixels_per_latent(cn)
    if pixels != vae_scale:
        raise UserError(
            f"{where} maps {pixels} image pixels to a latent pixel, this model's VAE "
            f"{vae_scale}: they do not fit"
        )


def precheck_controlnets(specs: list[str], unet: nn.Module, vae_scale: int) -> None:
    """check_controlnet_config for each ControlNet folder of `specs` against `unet`: a
    ControlNet for another family refused before minutes of compressing (a single file or
    a hub id is checked when it loads)."""
    for spec in specs:
        where = controlnet_folder(spec)
        if isinstance(where, Path) and where.is_dir():
            check_controlnet_config(_read_config(where), unet, vae_scale, spec)


def _guess(
    controlnet: nn.Module,
    down: Sequence[torch.Tensor],
    mid: torch.Tensor,
    rows: torch.Tensor,
    guess: torch.Tensor,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One ControlNet's residuals weighted for guess mode (ControlledDenoiser)."""
    # ControlNetModel.forward's guess-mode scales: logspace(-1, 0) over the residuals; none
    # for a ControlNet that pools its conditions (ones: the switch stays a graph input)
    ramp = torch.ones(len(down) + 1, dtype=mid.dtype, device=mid.device)
    if not controlnet.config.get("global_pool_conditions"):
        ramp = torch.logspace(-1, 0, len(down) + 1, dtype=mid.dtype, device=mid.device)
    weights = 1 + guess.to(mid.dtype) * (ramp - 1)
    per_row = rows.to(mid.dtype).reshape(-1, 1, 1, 1)
    down = [d * weights[k] * per_row for k, d in enumerate(down)]
    return down, mid * weights[-1] * per_row


class ControlledDenoiser(nn.Module):
    """A UNet steered by one or more ControlNets, as one module: each ControlNet runs on the
    latents (an inpainting UNet's first `in_channels` of them, as diffusers' ControlNet
    inpaint pipeline feeds it) with its own control image and scale, and the sum of their
    scaled residuals goes into the UNet's skips (diffusers' MultiControlNetModel).

    Called as the UNet is (the exporter's DenoiserWrapper), with the control images
    stacked (N, B, 3, 8H, 8W), the scales (N,), and guess mode's row weights (B,) and
    switch (1,) as more keywords; returns the UNet's output tuple. `config` is the UNet's,
    so everything that reads the denoiser's config reads it as before.

    Guess mode (diffusers' `guess_mode`): each residual is scaled by logspace(-1, 0) over
    the residuals, shallowest 0.1 to the mid block's 1 (ControlNetModel.forward; not for a
    ControlNet that pools its conditions, whose residuals diffusers leaves unscaled), and
    the rows' weights zero the residuals of the unconditional half under CFG: diffusers
    runs the ControlNet on the conditional half only and adds zeros to the other, which
    equals this, rows being independent. Switch 0 and weights 1 are plain ControlNet, and
    leave its output bit for bit.
    """

    def __init__(self, unet: nn.Module, controlnets: Sequence[nn.Module]) -> None:
        super().__init__()
        if not controlnets:
            raise ValueError("ControlledDenoiser needs at least one ControlNet")
        self.unet = unet
        self.controlnets = nn.ModuleList(controlnets)
        self.input_specs = control_specs(len(controlnets))

    @property
    def config(self):
        return self.unet.config

    @property
    def pixels_per_latent(self) -> int:
        return pixels_per_latent(self.controlnets[0].config)  # all checked equal to the VAE's

    def _parts(self) -> list[tuple[str, nn.Module]]:
        return [("unet", self.unet)] + [
            (f"controlnets.{i}", c) for i, c in enumerate(self.controlnets)
        ]

    @property
    def attn_processors(self) -> dict[str, Any]:
        return {
            f"{name}.{key}": processor
            for name, part in self._parts()
            for key, processor in part.attn_processors.items()
        }

    def set_attn_processor(self, processor) -> None:
        """One processor for all, or a dict keyed as attn_processors (every part's)."""
        for name, part in self._parts():
            own, prefix = processor, f"{name}."
            if isinstance(processor, dict):
                own = {k[len(prefix) :]: v for k, v in processor.items() if k.startswith(prefix)}
            part.set_attn_processor(own)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: torch.Tensor,
        control_rows: torch.Tensor | None = None,
        control_guess: torch.Tensor | None = None,
        added_cond_kwargs: dict | None = None,
        return_dict: bool = False,
        **unet_kwargs: Any,
    ) -> tuple[torch.Tensor, ...]:
        down, mid = None, None
        for i, controlnet in enumerate(self.controlnets):
            down_i, mid_i = controlnet(
                sample[:, : controlnet.config.in_channels],
                timestep,
                encoder_hidden_states=encoder_hidden_states,
                controlnet_cond=controlnet_cond[i],
                conditioning_scale=conditioning_scale[i],
                added_cond_kwargs=added_cond_kwargs,
                return_dict=False,
            )
            if control_guess is not None:
                down_i, mid_i = _guess(controlnet, down_i, mid_i, control_rows, control_guess)
            if down is None:
                down, mid = down_i, mid_i
            else:  # MultiControlNetModel's sum
                down = [a + b for a, b in zip(down, down_i, strict=True)]
                mid = mid + mid_i
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added_cond_kwargs,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
            **unet_kwargs,
        )
