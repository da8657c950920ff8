"""Which heads and neurons `prune.ecodiff` keeps: binarise per-unit scores into a Keep.

EcoDiff (arXiv 2412.02852) binarises its learned mask logits λ one of three ways
(`create_pipeline` in the official src/sdib/utils/pipe.py): a threshold on λ
(`lambda_threshold`), the top `ratio` in each layer (`scope=local`), or one ranking across
the model (`scope=global`). Here the target is `sparsity`, the fraction of the *maskable
parameters* removed (`units.maskable_params`), each unit weighing what it costs
(`UnitGroup.params_per_unit`: a head spans thousands of parameters, a neuron a few
hundred), where the paper's `ratio` counts units.

- "global": one ranking across the model per kind of unit, heads among heads and neurons
  among neurons, as the official code binarises (each hooker's `binarize(scope, ratio)`
  in create_pipeline ranks its own λ): each kind loses `sparsity` of its parameters.
  Mask logits of the two kinds are not comparable (FLUX's paper settings learn them at
  learning rates 0.5 and 0.1, and the per-layer penalty pulls a 24-head layer harder than
  a 3072-neuron one): one joint ranking removed 71% of tiny FLUX's heads and 0.2% of its
  neurons at 0.2. Within a kind, the lowest-scored go while the removed parameters stay
  within the target; near it a unit that would overshoot is kept and the ranking continues
  past it (greedy fill), then one more unit goes if that lands nearer. Heads go first;
  the neurons' target takes up the heads' rounding (departure: the paper rounds each
  kind alone), so the total lands within one neuron of `sparsity` whenever the neurons
  can take it up (a model with more neuron than head parameters), where a prefix of one
  ranking can miss it by half a head (2.6% of tiny SD3's maskable parameters).
- "local": each group loses the same fraction of its units, rounded. Rounding down or up
  per group is chosen (largest remainder first, while that brings the total nearer), so
  the total is within half the largest unit of the target, where independent rounding
  (the paper's) can miss it by whole heads on small models. Tiny SD3 at 0.2 cannot come
  within 1%: its 8 heads are 5% of the maskable parameters each (it lands at 0.219).

Example:
    >>> keep = select(groups, scores, sparsity=0.2, scope="global")     # doctest: +SKIP
    >>> round(achieved_sparsity(groups, keep), 3)                        # doctest: +SKIP
    0.2
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from slimdiff.compress.prune.units import UnitGroup, maskable_params

__all__ = ["MAX_SPARSITY", "Keep", "achieved_sparsity", "select"]

# group key ("attn:<site>" | "ffn:<site>") -> sorted kept unit indices; [] = the module goes
# (what slicing.prune takes).
Keep = dict[str, list[int]]

MAX_SPARSITY = 0.95  # beyond this a model is its residual stream and biases


def select(
    groups: Sequence[UnitGroup],
    scores: Mapping[str, torch.Tensor],
    sparsity: float | None = None,
    scope: Literal["global", "local"] = "global",
    *,
    threshold: float | None = None,
) -> Keep:
    """The units to keep: higher score = keep. Give `sparsity` (0 to 0.95, a fraction of
    the maskable parameters, with `scope`) or `threshold` (keep units scoring above it).

    Ties break by module order, then unit index (the earlier unit goes first).
    """
    if (sparsity is None) == (threshold is None):
        raise ValueError("give one of sparsity or threshold")
    by_group = {g.key: _scores_of(g, scores) for g in groups}
    if threshold is not None:
        return {key: _indices(s > threshold) for key, s in by_group.items()}
    if not 0.0 <= sparsity <= MAX_SPARSITY:
        raise ValueError(f"sparsity must be in [0, {MAX_SPARSITY}], got {sparsity}")
    if scope == "global":
        return _global(groups, by_group, sparsity)
    if scope == "local":
        return _local(groups, by_group, sparsity)
    raise ValueError(f"scope must be 'global' or 'local', got {scope!r}")


def achieved_sparsity(groups: Sequence[UnitGroup], keep: Keep) -> float:
    """The fraction of the maskable parameters `keep` removes (groups not in it keep all)."""
    removed = sum(
        (g.count - len(keep.get(g.key, range(g.count)))) * g.params_per_unit for g in groups
    )
    return removed / max(1, maskable_params(list(groups)))


def _scores_of(group: UnitGroup, scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if group.key not in scores:
        raise ValueError(f"no scores for {group.key}")
    s = scores[group.key].detach().to("cpu", torch.float64).flatten()
    if s.numel() != group.count:
        raise ValueError(f"{group.key}: {s.numel()} scores for {group.count} units")
    if not torch.isfinite(s).all():
        raise ValueError(f"{group.key}: scores must be finite")
    return s


def _indices(kept: torch.Tensor) -> list[int]:
    return torch.nonzero(kept).flatten().tolist()


def _global(groups: Sequence[UnitGroup], scores: dict[str, torch.Tensor], sparsity: float) -> Keep:
    kinds: dict[str, list[int]] = {}  # kind -> indices into groups, in module order
    for gi, g in enumerate(groups):
        kinds.setdefault(g.kind, []).append(gi)
    # the kind with the coarsest units first; the finest (neurons) takes up their rounding
    order = sorted(kinds, key=lambda k: -max(groups[gi].params_per_unit for gi in kinds[k]))
    total = sparsity * maskable_params(list(groups))
    removed, gone = 0, []
    for n, kind in enumerate(order):
        members = kinds[kind]
        size = sum(groups[gi].params for gi in members)
        target = total - removed if n == len(order) - 1 else sparsity * size
        units = [
            (float(score), gi, unit)
            for gi in members
            for unit, score in enumerate(scores[groups[gi].key].tolist())
        ]
        units.sort()  # lowest score first; ties by module order, then index
        taken = _fill(units, groups, min(max(target, 0.0), size))
        removed += sum(groups[gi].params_per_unit for _, gi, _ in taken)
        gone += taken
    dropped: dict[str, set[int]] = {g.key: set() for g in groups}
    for _, gi, unit in gone:
        dropped[groups[gi].key].add(unit)
    return {g.key: [i for i in range(g.count) if i not in dropped[g.key]] for g in groups}


def _fill(units: list[tuple[float, int, int]], groups: Sequence[UnitGroup], target: float) -> list:
    """The units of one ranking (lowest first) that go: greedy fill down the ranking, a
    unit going if the removed parameters stay within the target; one that would overshoot
    is kept and the walk goes on to the next (a plain prefix stops at the first head that
    does not fit). Then at most one kept unit goes past the target, the lowest-ranked that
    lands nearer than stopping short."""
    removed, gone, over = 0, [], []
    for unit in units:
        cost = groups[unit[1]].params_per_unit
        if removed + cost <= target:
            removed += cost
            gone.append(unit)
        else:
            over.append(unit)
    for unit in over:
        if removed + groups[unit[1]].params_per_unit - target < target - removed:
            gone.append(unit)
            break
    return gone


def _local(groups: Sequence[UnitGroup], scores: dict[str, torch.Tensor], sparsity: float) -> Keep:
    target = sparsity * maskable_params(list(groups))
    ideal = [sparsity * g.count for g in groups]
    drop = [math.floor(x + 1e-9) for x in ideal]
    removed = sum(k * g.params_per_unit for k, g in zip(drop, groups, strict=True))
    # Round up where the remainder is largest, while that brings the total nearer.
    for gi in sorted(range(len(groups)), key=lambda i: -(ideal[i] - drop[i])):
        g = groups[gi]
        if ideal[gi] - drop[gi] <= 1e-9 or drop[gi] >= g.count:
            continue
        if abs(removed + g.params_per_unit - target) < abs(removed - target):
            drop[gi] += 1
            removed += g.params_per_unit
    keep: Keep = {}
    for k, g in zip(drop, groups, strict=True):
        order = torch.sort(scores[g.key], stable=True).indices  # lowest first
        keep[g.key] = sorted(order[k:].tolist())
    return keep
