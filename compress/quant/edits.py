"""`quant.quest`'s typed edit: which denoiser layers are quantized, and how.

Pure data (pydantic, no torch), so registering the pass and validating a recipe stay
light; `layers.restore` replays it on a component rebuilt from its saved config (each
listed Linear/Conv2d becomes a QuantLayer holding integer weights and scales).
"""

from __future__ import annotations

from typing import Literal

import pydantic

from slimdiff.edits import Edit

__all__ = ["EDITS", "LayerQuant", "Quantized"]


class LayerQuant(pydantic.BaseModel):
    """One quantized layer: weight and activation bit widths, and what it carries."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    kind: Literal["linear", "conv"]
    weight_bits: Literal[4, 8]
    act_bits: Literal[4, 8] | None  # None: the input stays float (weight-only)
    # Convolutions requantize their output to 8 bit: onnxruntime fuses a convolution into
    # its integer kernel (QLinearConv) only with a QuantizeLinear after it.
    out_bits: Literal[8] | None = None
    rank: int = pydantic.Field(0, ge=0)  # SVDQuant low-rank branch (linear only)
    smooth: bool = False  # SVDQuant's per-input-channel smoothing factors


class Quantized(Edit):
    """The denoiser's quantized layers; activation step sizes per timestep group.

    `group_edges` are the timesteps between consecutive groups, in the order the sampler
    visits them (descending): a call at timestep t uses group sum(t < e for e in edges).
    They are in the units of the denoiser's `timestep` input (the scheduler's t divided by
    the kind's timestep_divisor: FLUX's are in [0, 1]).
    """

    op: Literal["quant.quest.layers"] = "quant.quest.layers"
    layers: dict[str, LayerQuant]
    groups: int = pydantic.Field(1, ge=1, le=64)
    group_edges: list[float] = pydantic.Field(default_factory=list)
    timestep_arg: str = "timestep"  # the denoiser's timestep keyword
    timestep_position: int = 1  # and its position when passed positionally

    @pydantic.model_validator(mode="after")
    def _edges(self):
        if len(self.group_edges) != self.groups - 1:
            raise ValueError(f"{self.groups} groups need {self.groups - 1} group_edges")
        if any(b >= a for a, b in zip(self.group_edges, self.group_edges[1:], strict=False)):
            raise ValueError("group_edges must be strictly descending")
        return self


EDITS = (Quantized,)
