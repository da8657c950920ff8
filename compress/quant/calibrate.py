"""Ranges from the calibration trajectories: activation statistics per timestep group,
SVDQuant's smoothing and low-rank split, and the initial step sizes.

The denoiser's inputs at every (prompt, step) of the teacher's trajectories (the paper:
25 timesteps x 128 samples for SD) are replayed, batched by step so a call has one
timestep and so one group. While observing, quantizers record their inputs and pass them
through unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator

import torch
from slimdiff.compress.quant.layers import ActQuantizer, QuantLayer, act_quantizers
from torch import nn

__all__ = [
    "ActStats",
    "batches_by_step",
    "channel_amax",
    "choose_range",
    "init_lowrank",
    "init_ranges",
    "observe",
    "replay",
    "weight_error",
]

log = logging.getLogger(__name__)

_SAMPLE_CAP = 1 << 16  # values kept per (quantizer, group) for percentile / MSE search
_PERCENTILES = (0.999, 0.9999, 0.99999, 1.0)  # QuEST's candidates (1.0: the full range)


def batches_by_step(data, pairs: list[tuple[int, int]], batch: int) -> list[list[tuple[int, int]]]:
    """`pairs` grouped into batches of one step each (one timestep, so one group)."""
    by_step: dict[int, list[tuple[int, int]]] = {}
    for prompt, step in pairs:
        by_step.setdefault(step, []).append((prompt, step))
    out = []
    for step in sorted(by_step):
        items = by_step[step]
        out += [items[i : i + batch] for i in range(0, len(items), batch)]
    return out


class ActStats:
    """Per activation quantizer and group: exact min/max and a sample of values; per
    QuantLayer input (for smoothing), the per-channel absolute maximum."""

    def __init__(self, seed: int = 0) -> None:
        self.lo: dict[int, dict[int, float]] = {}
        self.hi: dict[int, dict[int, float]] = {}
        self.samples: dict[int, dict[int, list[torch.Tensor]]] = {}
        self.counts: dict[int, dict[int, int]] = {}
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, q: ActQuantizer, x: torch.Tensor) -> None:
        key, g = id(q), q.group
        x = x.detach().float()
        lo, hi = float(x.min()), float(x.max())
        self.lo.setdefault(key, {})[g] = min(self.lo.get(key, {}).get(g, lo), lo)
        self.hi.setdefault(key, {})[g] = max(self.hi.get(key, {}).get(g, hi), hi)
        have = self.counts.setdefault(key, {}).get(g, 0)
        if have >= _SAMPLE_CAP:
            return
        flat = x.reshape(-1)
        take = min(flat.numel(), max(4096, _SAMPLE_CAP // 16), _SAMPLE_CAP - have)
        idx = torch.randint(flat.numel(), (take,), generator=self.generator).to(flat.device)
        self.samples.setdefault(key, {}).setdefault(g, []).append(flat[idx].cpu())
        self.counts[key][g] = have + take


@contextlib.contextmanager
def observe(model: nn.Module, stats: ActStats) -> Iterator[None]:
    quantizers = act_quantizers(model)
    for q in quantizers:
        q.observer = stats
    try:
        yield
    finally:
        for q in quantizers:
            q.observer = None


def replay(
    model: nn.Module,
    data,
    batches: list[list[tuple[int, int]]],
    advance: Callable[[int], None] | None = None,
) -> None:
    """Run `model` on the recorded denoiser inputs of every batch (no gradients)."""
    p = next(model.parameters())
    with torch.no_grad():
        for pairs in batches:
            args, kwargs = data.inputs(pairs, p.device, p.dtype)
            model(*args, **kwargs, return_dict=False)
            if advance is not None:
                advance(1)


def channel_amax(
    model: nn.Module, layers: dict[str, QuantLayer], data, batches
) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of each of `layers` (float model, quantizers off)."""
    amax: dict[str, torch.Tensor] = {}
    handles = []
    for name, layer in layers.items():

        def hook(_m, args, name=name, layer=layer):
            x = args[0].detach().float()
            dims = [
                d for d in range(x.dim()) if d != (x.dim() - 1 if layer.kind == "linear" else 1)
            ]
            value = x.abs().amax(dim=dims)
            amax[name] = torch.maximum(amax[name], value) if name in amax else value

        handles.append(layer.register_forward_pre_hook(hook))
    stats = ActStats()  # quantizers pass through while observing
    try:
        with observe(model, stats):
            replay(model, data, batches)
    finally:
        for h in handles:
            h.remove()
    return amax


def init_lowrank(layer: QuantLayer, x_amax: torch.Tensor, alpha: float) -> None:
    """SVDQuant: smoothing λ_j = max|x_j|^α / max|W_:j|^(1-α) moves activation outliers into
    the weight; the top `rank` singular directions of the smoothed weight become a float
    branch (lr_up @ lr_down) and only the residual is quantized. The paper's α is 0.5; its
    rank 32 on FLUX/SDXL-size layers."""
    w = layer.weight.detach().float()
    w_amax = w.abs().amax(0).clamp(min=1e-5)
    smooth = (x_amax.clamp(min=1e-5).pow(alpha) / w_amax.pow(1 - alpha)).clamp(1e-2, 1e2)
    ws = w * smooth[None, :]
    u, s, vh = torch.linalg.svd(ws, full_matrices=False)
    r = min(layer.spec.rank, s.numel())
    up = u[:, :r] * s[:r]
    down = vh[:r]
    with torch.no_grad():
        layer.smooth.copy_(smooth)
        layer.lr_up.zero_()
        layer.lr_down.zero_()
        layer.lr_up[:, :r].copy_(up)
        layer.lr_down[:r].copy_(down)
        layer.weight.copy_((ws - up @ down).to(layer.weight.dtype))


def _quant_mse(x: torch.Tensor, lo: float, hi: float, qmax: int) -> float:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / qmax, 1e-8)
    zero = min(max(round(-lo / scale), 0), qmax)
    q = torch.clamp((x / scale).round() + zero, 0, qmax)
    return float(((q - zero) * scale - x).pow(2).mean())


def choose_range(
    values: torch.Tensor, lo: float, hi: float, qmax: int, how: str
) -> tuple[float, float]:
    """An activation range: the observed one (minmax), the 0.9999 percentile, or (mse)
    QuEST's search over percentile clips for the least quantization MSE."""
    if how == "minmax" or values.numel() < 16:
        return lo, hi
    sample = values.float()

    def clip(p: float) -> tuple[float, float]:
        if p >= 1.0:
            return lo, hi
        qs = torch.quantile(sample, torch.tensor([1.0 - p, p]))
        return float(qs[0]), float(qs[1])

    if how == "percentile":
        return clip(0.9999)
    best, best_err = (lo, hi), math.inf
    for p in _PERCENTILES:
        cand = clip(p)
        err = _quant_mse(sample, *cand, qmax)
        if err < best_err:
            best, best_err = cand, err
    return best


def init_ranges(model: nn.Module, stats: ActStats, groups: int, how: str) -> int:
    """Set every activation quantizer's per-group range from `stats`; a group no call
    reached takes the union of the others. Returns the number of quantizers set."""
    done = 0
    for q in act_quantizers(model):
        seen = stats.lo.get(id(q), {})
        if not seen:
            continue
        los, his = [], []
        for g in range(groups):
            if g in seen:
                values = torch.cat(stats.samples[id(q)][g])
                lo, hi = choose_range(values, seen[g], stats.hi[id(q)][g], q.qmax, how)
            else:
                lo, hi = min(seen.values()), max(stats.hi[id(q)].values())
            los.append(lo)
            his.append(hi)
        q.set_range(torch.tensor(los), torch.tensor(his))
        done += 1
    return done


def weight_error(layer: QuantLayer) -> float:
    """Relative squared error of the layer's quantized weight (a report figure)."""
    w = layer.weight.detach()
    q = layer.integer_weight().to(w.dtype)
    s = layer.weight_scale.reshape(-1, *([1] * (w.dim() - 1)))
    return float((q * s - w).pow(2).sum() / w.pow(2).sum().clamp(min=1e-12))
