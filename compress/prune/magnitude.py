"""The data-free baseline for `prune.ecodiff`: rank heads and neurons by weight magnitude.

What EcoDiff (arXiv 2412.02852) learns masks to beat: a unit's importance is the size of
the weights it spans, with no calibration data. A unit's score is the L2 norm of *all* the
weights removing it would delete, the coupled slices of every projection together, as
Torch-Pruning's `MagnitudeImportance(p=2)` scores a dependency group and LLM-Pruner's
vector-wise magnitude scores a head or an FFN channel:

- a head: its head_dim rows of Q, K, V (and of the context stream's, for SD3/FLUX joint
  attention) and its head_dim input columns of each output projection (image and context
  outputs; FLUX single blocks' fused proj_out, whose first columns are the heads');
- a neuron: its up-projection row (both GEGLU rows: value and gate) and its down-projection
  input column (FLUX single blocks: the proj_out columns after the attention's).

L2 rather than L1: it is the norm those tools default to, and the squared norm is what a
unit contributes to the Frobenius norm of the layer, the usual proxy for its output's size.
Biases are left out (they are offsets, not connections), as in both tools.

Scale: a head spans ~4 x in x head_dim weights, a neuron ~3 x in, so raw norms of heads and
neurons (and of narrow and wide layers) are not comparable in one ranking. With
`normalize="mean"` (the default) each group's scores are divided by the group's mean, as
Torch-Pruning's default `normalizer="mean"` does before its global ranking: a score says
how a unit compares with the others of its module, and `select(scope="global")` then
takes the relatively weakest heads anywhere, and the weakest neurons (each kind ranked
on its own). Within a group the order is unchanged.

Example:
    >>> scores = magnitude_scores(unit_groups(arch, pipe.unet), pipe.unet)  # doctest: +SKIP
    >>> keep = select(groups, scores, sparsity=0.2)                         # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from slimdiff.compress.prune.units import UnitGroup
from torch import nn

from slimdiff.models.structure import AttentionSite, FFNSite

__all__ = ["magnitude_scores"]


def magnitude_scores(
    groups: Sequence[UnitGroup],
    denoiser: nn.Module,
    normalize: Literal["mean", "none"] = "mean",
) -> dict[str, torch.Tensor]:
    """{group key: (units,) float32 CPU tensor}, the L2 norm of each unit's weights (see
    the module docstring), divided by the group's mean unless `normalize="none"`."""
    if normalize not in ("mean", "none"):
        raise ValueError(f"normalize must be 'mean' or 'none', got {normalize!r}")
    scores = {}
    with torch.no_grad():
        for g in groups:
            if g.kind == "heads":
                sq = _head_squares(denoiser, g.site)
            else:
                sq = _neuron_squares(denoiser, g.site)
            norm = sq.sqrt()
            if normalize == "mean" and norm.mean() > 0:
                norm = norm / norm.mean()
            scores[g.key] = norm.to("cpu", torch.float32)
    return scores


def _weight(denoiser: nn.Module, name: str) -> torch.Tensor:
    return denoiser.get_submodule(name).weight.detach().double()


def _head_squares(denoiser: nn.Module, site: AttentionSite) -> torch.Tensor:
    """(heads,) sum of squares of every weight each head spans."""
    heads, d = site.heads, site.head_dim
    total = torch.zeros(heads, dtype=torch.float64)
    for name in (*site.qkv, *site.context_qkv):
        rows = _weight(denoiser, name).pow(2).sum(1)  # (heads * d, in) -> (heads * d,)
        total += rows.view(heads, d).sum(1).cpu()
    for name in (*site.out, *site.context_out):
        # (out, heads * d [+ rest]) -> (heads * d,): the heads are the first columns
        cols = _weight(denoiser, name)[:, : heads * d].pow(2).sum(0)
        total += cols.view(heads, d).sum(1).cpu()
    return total


def _neuron_squares(denoiser: nn.Module, site: FFNSite) -> torch.Tensor:
    """(hidden,) sum of squares of each neuron's up row(s) and down column."""
    hidden = site.hidden
    rows = _weight(denoiser, site.up).pow(2).sum(1)  # (hidden [x 2], in) -> (hidden [x 2],)
    if site.gated:
        rows = rows[:hidden] + rows[hidden:]  # value row i and gate row hidden + i
    down = _weight(denoiser, site.down)
    first = down.shape[1] - hidden if site.down_columns == "last" else 0
    cols = down[:, first : first + hidden].pow(2).sum(0)  # (out, hidden) -> (hidden,)
    return (rows + cols).cpu()
