"""Which heads and neurons `prune.ecodiff` keeps: binarise per-unit scores into a Keep.

EcoDiff (arXiv 2412.02852) binarises its learned mask logits λ one of three ways
(`create_pipeline` in the official src/sdib/utils/pipe.py): a threshold on λ
(`lambda_threshold`), the top `ratio` in each layer (`scope=local`), or one ranking across
the model (`scope=global`). Here the target is `sparsity`, the fraction of the *maskable
parameters* removed (`units.maskable_params`), each unit weighing what it costs
(`UnitGroup.params_per_unit`: a head spans thousands of parameters, a neuron a few
hundred), where the paper's `ratio` counts units.

- "global": every unit in one ranking by score, heads and neurons together, as the paper
  ranks λ; the lowest-scored go while the removed parameters stay within the target. Near
  the target a unit that would overshoot it is kept and the ranking continues past it
  (greedy fill), then one more unit goes if that lands nearer: the result is within one
  small unit (a neuron) of the target, where a prefix of the ranking can miss it by half
  a head (2.6% of tiny SD3's maskable parameters; little on full-size models).
  Scores must be comparable across groups: mask logits are (one parametrisation for every
  mask); weight norms are not (a head's norm grows with its width): `magnitude_scores`
  normalises them per group for that reason.
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
    target = sparsity * maskable_params(list(groups))
    units = [
        (float(score), gi, unit)
        for gi, g in enumerate(groups)
        for unit, score in enumerate(scores[g.key].tolist())
    ]
    units.sort()  # lowest score first; ties by module order, then index
    # Greedy fill down the ranking: a unit goes if the removed parameters stay within the
    # target; one that would overshoot is kept and the walk goes on to the next (a plain
    # prefix stops at the first head that does not fit: off by up to half a head, 2.5% of
    # tiny SD3's maskable parameters). Then at most one kept unit goes past the target,
    # the lowest-ranked that lands nearer than stopping short.
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
    dropped: dict[str, set[int]] = {g.key: set() for g in groups}
    for _, gi, unit in gone:
        dropped[groups[gi].key].add(unit)
    return {g.key: [i for i in range(g.count) if i not in dropped[g.key]] for g in groups}


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
