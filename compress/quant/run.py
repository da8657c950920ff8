"""The body of `quant.quest` (imported when the pass runs; registering it stays light)."""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch
from slimdiff.compress.base import PassReport, checkpoint_root
from slimdiff.compress.quant import calibrate as cal
from slimdiff.compress.quant.edits import Quantized
from slimdiff.compress.quant.finetune import (
    Stage,
    finetune,
    only_quantized,
    rank_sensitivity,
    trainable,
)
from slimdiff.compress.quant.layers import quant_layers, replace_layers
from slimdiff.compress.quant.quest import (
    checkpoint_key,
    group_edges,
    layer_plan,
    sample_pairs,
)

from slimdiff.lowbit import merged_scales
from slimdiff.models.arch import matches
from slimdiff.models.families import arch_of_pipeline
from slimdiff.models.fingerprint import module_digest
from slimdiff.progress import Progress

__all__ = ["apply_quest"]

log = logging.getLogger(__name__)

_SENSITIVITY_BATCHES = 2  # calibration batches (an early and a late step) per layer
_EVAL_BATCHES = 4  # for the report's output errors


def apply_quest(p, pipe: Any, calib: Any) -> PassReport:
    cfg = p.config
    arch = arch_of_pipeline(pipe)
    denoiser = getattr(pipe, arch.denoiser)
    plan = layer_plan(cfg, arch, denoiser)
    if calib is None:  # `inspect --recipe`: quantization changes neither params nor FLOPs
        bits = [f"w{s.weight_bits}a{s.act_bits or 'fp'}" for s in plan.values()]
        counts = {b: bits.count(b) for b in sorted(set(bits))}
        return PassReport(p.name, summary={"preview": True, "layers": counts})
    data = calib.record()
    groups = cfg.timestep_groups
    edit = Quantized(
        component=arch.denoiser,
        layers=plan,
        groups=groups,
        # in the units the denoiser's `timestep` takes, which the group hook reads
        # (FluxPipeline passes t / 1000: edges from the scheduler's t put every call in
        # the last group, and the scales were not timestep-aware)
        group_edges=group_edges([t / arch.kind.timestep_divisor for t in data.timesteps], groups),
    )
    digest = module_digest(denoiser)
    teacher = copy.deepcopy(denoiser).eval() if cfg.method == "quest" else None
    # Frozen while the pass works; afterwards, every parameter as the model had them (new
    # ones, the layers' biases, branches and step sizes, as their source's): a reloaded
    # artifact has the loader's default, and CPU kernels differ by an ulp between the two.
    trainable_after = any(p.requires_grad for p in denoiser.parameters())
    for param in denoiser.parameters():
        param.requires_grad_(False)
    denoiser.eval()
    layers = replace_layers(denoiser, edit)
    pairs = sample_pairs(data, cfg.calib_pairs, cfg.finetune.seed)
    batches = cal.batches_by_step(data, pairs, cfg.finetune.batch)
    summary: dict[str, Any] = {
        "layers": len(layers),
        "weights": cfg.weights,
        "activations": cfg.activations,
        "method": cfg.method,
        "timestep_groups": groups,
        "calibration_pairs": len(pairs),
    }
    t0 = time.perf_counter()
    # 1-2. SVDQuant's smoothing and low-rank split, from the float model's activations.
    ranked = {n: lay for n, lay in layers.items() if lay.spec.rank}
    if ranked:
        amax = cal.channel_amax(denoiser, ranked, data, batches)
        for name, layer in ranked.items():
            cal.init_lowrank(layer, amax[name], cfg.smooth_alpha)
    # 3. weight step sizes.
    for layer in layers.values():
        layer.init_weight_scale(search=cfg.method == "quest")
    # 4. activation ranges per group, observed with the quantized weights in place.
    stats = cal.ActStats(seed=cfg.finetune.seed)
    with cal.observe(denoiser, stats), Progress("quant ranges", len(batches)) as progress:
        cal.replay(denoiser, data, batches, progress.advance)
    cal.init_ranges(denoiser, stats, groups, cfg.range_init)
    del stats
    summary["calibration_s"] = round(time.perf_counter() - t0, 2)
    summary["weight_rel_sq_err"] = {
        f"w{b}": _mean(
            [cal.weight_error(lay) for lay in layers.values() if lay.spec.weight_bits == b]
        )
        for b in sorted({lay.spec.weight_bits for lay in layers.values()})
    }
    eval_batches = batches[:: max(1, len(batches) // _EVAL_BATCHES)][:_EVAL_BATCHES]
    if teacher is not None:
        summary["output_rel_err_before_finetune"] = _output_err(
            denoiser, teacher, data, eval_batches
        )
        summary.update(
            _quest(cfg, arch, calib, denoiser, teacher, data, batches, digest, edit.group_edges)
        )
        summary["output_rel_err"] = _output_err(denoiser, teacher, data, eval_batches)
        if groups > 1:  # what exporting one merged scale per quantizer costs
            with merged_scales():
                summary["output_rel_err_merged_scales"] = _output_err(
                    denoiser, teacher, data, eval_batches
                )
    for layer in layers.values():
        layer.finalise()
    for param in denoiser.parameters():
        param.requires_grad_(trainable_after)
    summary["bytes_weights"] = _weight_bytes(layers)
    del teacher
    return PassReport(p.name, summary=summary, edits=[edit])


def _quest(cfg, arch, calib, denoiser, teacher, data, batches, digest, edges) -> dict[str, Any]:
    ft = cfg.finetune
    layers = quant_layers(denoiser)
    out: dict[str, Any] = {}
    sens_batches = batches[:: max(1, len(batches) // _SENSITIVITY_BATCHES)][:_SENSITIVITY_BATCHES]
    ranking: list[tuple[str, float]] = []
    if ft.sensitive and ft.epochs:  # one forward a layer: only when it chooses something
        ranking = rank_sensitivity(denoiser, teacher, data, sens_batches, list(layers))
        out["sensitivity"] = [{"layer": n, "output_mse": e} for n, e in ranking]
        width = max(len(n) for n, _ in ranking[:10])
        log.info(
            "quant.quest: most sensitive layers (output MSE, quantized alone):\n%s",
            "\n".join(f"  {n:<{width}}  {e:.3e}" for n, e in ranking[:10]),
        )
    root = checkpoint_root(cfg.work_dir, calib)
    key = checkpoint_key(cfg, calib, digest, edges)
    ckpt = (
        (lambda stage: root / f"quest-{key}" / f"{stage}.safetensors") if root else (lambda s: None)
    )
    time_names = [n for n in layers if matches(n, arch.time_layers)] if ft.time_layers else []
    stages = []
    if time_names:
        w, s = [], []
        for n in time_names:
            a, b = trainable(layers[n], weights=True)
            w += a
            s += b
        stages.append(
            Stage(
                "quest time layers", [(w, ft.lr_time), (s, ft.lr_time)], time_names, ft.epochs_time
            )
        )
    chosen = [n for n, _ in ranking if n not in time_names][: ft.sensitive]
    out["finetuned_layers"] = {"time": time_names, "sensitive": chosen}
    weights = [p for n in chosen for p in trainable(layers[n], weights=True)[0]]
    # QuEST's second stage trains every activation step size outside the time-embedding
    # layers (theirs are the first stage's; pd_optimize_timewise skips `emb` quantizers);
    # without a first stage, every one
    first = set(time_names) if ft.epochs_time else set()
    scales = [
        p for n, lay in layers.items() if n not in first for p in trainable(lay, weights=False)[1]
    ]
    stages.append(
        Stage(
            "quest sensitive layers",
            [(weights, ft.lr_weights), (scales, ft.lr_scales)],
            chosen,
            ft.epochs,
        )
    )
    done = {}
    for i, stage in enumerate(stages):
        later = [ckpt(s.label.replace(" ", "-")) for s in stages[i + 1 :]]
        if any(c is not None and c.is_file() for c in later):
            continue  # a later stage's checkpoint holds this stage's result already
        start = time.perf_counter()
        result = finetune(
            denoiser, teacher, data, batches, stage, ft, ckpt(stage.label.replace(" ", "-"))
        )
        result["seconds"] = round(time.perf_counter() - start, 2)
        done[stage.label] = result
    out["finetune"] = done
    return out


def _output_err(student, teacher, data, batches) -> float:
    errs = []
    with torch.no_grad(), only_quantized(student, None):
        for pairs in batches:
            p = next(teacher.parameters())
            args, kwargs = data.inputs(pairs, p.device, p.dtype)
            ref = teacher(*args, **kwargs, return_dict=False)[0]
            got = student(*args, **kwargs, return_dict=False)[0]
            errs.append(rel_err(got, ref))
    return _mean(errs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def _weight_bytes(layers) -> int:
    total = 0
    for layer in layers.values():
        total += layer.weight_q.numel() * layer.weight_q.element_size()
        total += layer.weight_scale.numel() * 4
    return total
