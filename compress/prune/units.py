"""What `prune.ecodiff` masks and removes: groups of units (attention heads, FFN neurons) and
the parameters each unit spans, from the ArchSpec's structure declarations.

One `UnitGroup` per attention module (its heads) and per feed-forward block (its hidden
neurons). Keys are "attn:<site>" and "ffn:<site>": FLUX's single-stream blocks are one site
with both. A unit's parameter count is what removing it saves, so sparsity is a fraction of
the *maskable* parameters, as the issue and the paper count it:

- a head: its head_dim rows (and biases) of every projection that makes it (Q, K, V, and the
  context stream's for SD3/FLUX joint attention), and its head_dim input columns of every
  output projection (the image and context outputs; FLUX single blocks' fused proj_out);
- a neuron: its row of the up projection (two rows for GEGLU: value and gate, with biases)
  and its input column of the down projection.

Example:
    >>> groups = unit_groups(get_arch("sdxl"), pipe.unet)               # doctest: +SKIP
    >>> groups[0].key, groups[0].count, groups[0].params_per_unit       # doctest: +SKIP
    ('attn:down_blocks.1.attentions.0.transformer_blocks.0.attn1', 2, 8224)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from slimdiff.models.arch import ArchSpec
from slimdiff.models.structure import AttentionSite, FFNSite, attention_sites, ffn_sites

__all__ = ["UnitGroup", "maskable_params", "unit_groups"]


@dataclass(frozen=True)
class UnitGroup:
    """The heads of one attention module or the neurons of one feed-forward block."""

    key: str  # "attn:<site name>" | "ffn:<site name>"
    kind: Literal["heads", "neurons"]
    site: AttentionSite | FFNSite
    count: int  # units in the group
    params_per_unit: int  # parameters one unit spans (what removing it saves)
    width: int  # channels per unit: head_dim for heads, 1 for neurons

    @property
    def params(self) -> int:
        return self.count * self.params_per_unit


def _linear(denoiser: nn.Module, name: str) -> nn.Linear:
    module = denoiser.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{name} is a {type(module).__name__}, not the Linear a unit spans")
    return module


def _head_params(denoiser: nn.Module, site: AttentionSite) -> int:
    d = site.head_dim
    per = 0
    for name in (*site.qkv, *site.context_qkv):  # head_dim output rows, and their biases
        lin = _linear(denoiser, name)
        per += d * lin.in_features + (d if lin.bias is not None else 0)
    for name in (*site.out, *site.context_out):  # head_dim input columns
        per += d * _linear(denoiser, name).out_features
    return per


def _neuron_params(denoiser: nn.Module, site: FFNSite) -> int:
    up, down = _linear(denoiser, site.up), _linear(denoiser, site.down)
    rows = 2 if site.gated else 1
    return rows * (up.in_features + (1 if up.bias is not None else 0)) + down.out_features


def unit_groups(arch: ArchSpec, denoiser: nn.Module) -> list[UnitGroup]:
    """Every head group and neuron group of `denoiser`, attention first, in module order."""
    groups = [
        UnitGroup(f"attn:{s.name}", "heads", s, s.heads, _head_params(denoiser, s), s.head_dim)
        for s in attention_sites(arch, denoiser)
    ]
    # A feed-forward block pruned to no neurons (a FLUX single block keeps its site at
    # width 0) has nothing left to mask: a model pruned once can be pruned again.
    groups += [
        UnitGroup(f"ffn:{s.name}", "neurons", s, s.hidden, _neuron_params(denoiser, s), 1)
        for s in ffn_sites(arch, denoiser)
        if s.hidden > 0
    ]
    return groups


def maskable_params(groups: list[UnitGroup]) -> int:
    """Parameters the masks cover: what a sparsity fraction is a fraction of."""
    return sum(g.params for g in groups)
