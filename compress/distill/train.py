"""Layer-level distillation: train a student denoiser to match its teacher.

BK-SDM (arXiv 2305.15798), SSD-1B / Segmind-Vega (arXiv 2401.02677), KOALA (arXiv
2312.04005). The loss is

    L = w_task * MSE(eps_s, eps) + w_out * MSE(eps_s, eps_t) + w_feat * sum_pairs MSE(f_s, f_t)

with the feature pairs of `features.feature_pairs`. Where this departs from the papers:

- Data-free: the inputs are the teacher's own trajectories on the calibration prompts
  (`Calibration.record`), not noised training images, so there is no true noise
  eps and no task term (w_task = 0; the config refuses more until images are supported);
  the papers train on LAION-scale image-text pairs at random timesteps. The student sees
  exactly the (latent, timestep, prompt) states it will meet at inference.
- Modules the ArchSpec marks frozen (never_touch: conv_in/out and the output norm; the
  time and added embeddings) stay bit-identical. The papers train the whole student.
- Each iteration's (prompt, step) pairs are drawn from (seed, iteration) alone, and the
  student, optimizer, EMA weights and iteration are checkpointed, so a killed run resumed
  from its last checkpoint ends bit-identical to one that was never interrupted.

With `ema_decay` (BK-SDM's preset: 0.9999, as its kd_train.sh --use_ema), diffusers'
EMAModel averages the trained parameters after every optimizer step and the average
replaces them at the end, as BK-SDM saves its EMA UNet. Its decay warms up as
(1 + n) / (10 + n) at step n, so a run of a few hundred iterations averages roughly its
last tenth; the reported losses are the trained weights', before the average.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from slimdiff.compress.distill.config import DistillSettings, check_settings
from slimdiff.compress.distill.features import capture

from slimdiff.errors import UserError
from slimdiff.models.arch import matches
from slimdiff.progress import Progress
from slimdiff.trainstate import can_resume, checkpoint_if_due, load_train_state, read_train_state
from slimdiff.trajectories import Trajectories

__all__ = ["DistillReport", "distill", "draw_pairs"]

log = logging.getLogger(__name__)


@dataclass
class DistillReport:
    iterations: int  # completed, in total
    resumed_from: int  # the checkpoint's iteration; 0 for a fresh run
    losses: dict[str, float] = field(default_factory=dict)  # the last iteration's
    first_losses: dict[str, float] = field(default_factory=dict)  # iteration 1's
    feature_pairs: int = 0
    seconds: float = 0.0  # this run's, not counting earlier runs that were resumed


def draw_pairs(seed: int, iteration: int, total: int, batch: int) -> list[int]:
    """Flat (prompt, step) indices for `iteration`: a function of (seed, iteration) only."""
    rng = np.random.default_rng([seed, iteration])
    return rng.choice(total, size=batch, replace=batch > total).tolist()


def distill(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    data: Trajectories,
    pairs: list[tuple[str, str]],
    settings: DistillSettings,
    checkpoint: Path | None = None,
    frozen: tuple[str, ...] = (),
    on_iteration: Callable[[int], None] | None = None,
) -> DistillReport:
    """Train `student` in place for `settings.steps` iterations; resume from `checkpoint`.

    `pairs` are (student, teacher) module names whose outputs are compared; `frozen` are
    module-name globs left untrained (arch.matches: a glob covers its submodules).
    `on_iteration(i)` runs after iteration i is done (and checkpointed when due); tests
    stop a run there to resume it.

    Example:
        report = distill(student, teacher, calib.record(), pairs,
                         DistillSettings(steps=100, lr=1e-4), Path("work/distill.safetensors"))
    """
    start_time = time.perf_counter()
    check_settings(settings)
    # What a checkpoint must have been written with to be resumed (the batch drawing, the
    # loss and the optimizer; not the checkpoint interval or the report's label).
    state = {k: v for k, v in asdict(settings).items() if k not in ("source", "checkpoint_every")}
    if not settings.ema_decay:
        del state["ema_decay"]  # checkpoints from before EMA existed stay resumable
    resume = can_resume(checkpoint)
    if resume and read_train_state(checkpoint)[1].get("settings") != json.loads(json.dumps(state)):
        raise UserError(
            f"{checkpoint} is a checkpoint of other distillation settings; delete it or "
            "give distill.work_dir another folder"
        )
    dtype = next(student.parameters()).dtype
    was_training = student.training
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    # Half-precision weights cannot take AdamW's small updates: train in float32.
    if dtype != torch.float32:
        student.float()
    student.train()
    teacher.eval()
    params = []
    for name, p in student.named_parameters():
        train = not matches(name.rsplit(".", 1)[0], frozen)
        p.requires_grad_(train)
        if train:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=settings.lr)
    modules: dict[str, torch.nn.Module] = {"student": student}
    ema = None
    if settings.ema_decay and settings.steps:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=settings.ema_decay)
        modules["ema"] = _Shadow(ema.shadow_params)  # checkpointed with the student
    start, losses, first = 0, {}, {}
    if resume:
        start, extra = load_train_state(checkpoint, modules, opt)
        losses, first = extra["losses"], extra["first_losses"]
        if ema is not None:
            ema.optimization_step = start  # the decay's warm-up goes on from there
        log.info("distill: resuming at iteration %d from %s", start, checkpoint)
    step = functools.partial(
        _iteration, student, teacher, data, pairs if settings.feat_weight > 0 else [], settings
    )
    resumable = (
        f"a checkpoint every {settings.checkpoint_every} in {checkpoint.parent} lets a killed run "
        "resume; "
        if checkpoint
        else ""
    )
    hint = f"{resumable}lower distill.steps or run on a GPU (--device cuda)"
    try:
        with Progress("distill", settings.steps, start, unit="iterations", hint=hint) as progress:
            for it in range(start, settings.steps):
                opt.zero_grad(set_to_none=True)
                losses = step(it)
                if settings.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                opt.step()
                if ema is not None:
                    ema.step(params)
                first = first or losses
                done = it + 1
                extra = {"settings": state, "losses": losses, "first_losses": first}
                checkpoint_if_due(
                    checkpoint,
                    modules,
                    opt,
                    done,
                    settings.steps,
                    settings.checkpoint_every,
                    extra,
                )
                progress.advance(description=_describe(losses))
                if on_iteration is not None:
                    on_iteration(done)
        if ema is not None:
            ema.copy_to(params)  # the result is the average, as BK-SDM saves it
    finally:
        if dtype != torch.float32:
            student.to(dtype)
        student.train(was_training)
        for name, p in student.named_parameters():
            p.requires_grad_(flags[name])
    log.info("distill: %d iterations, %s", settings.steps, _describe(losses))
    return DistillReport(
        iterations=settings.steps,
        resumed_from=start,
        losses=losses,
        first_losses=first,
        feature_pairs=len(pairs) if settings.feat_weight > 0 else 0,
        seconds=time.perf_counter() - start_time,
    )


class _Shadow(torch.nn.Module):
    """EMAModel's shadow parameters as buffers (the same tensors, updated in place), so
    the train-state checkpoint saves and restores them with the student."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__()
        for i, tensor in enumerate(tensors):
            self.register_buffer(f"p{i}", tensor)


def _iteration(student, teacher, data, pairs, settings: DistillSettings, it: int):
    """Forward and backward over iteration `it`'s pairs (in `accumulate` chunks, each
    weighted by its share of the batch, so the gradient is the whole batch's)."""
    device = next(student.parameters()).device
    t_dtype = next(teacher.parameters()).dtype
    drawn = draw_pairs(settings.seed, it, len(data), settings.batch)
    parts: dict[str, float] = {}
    for chunk in np.array_split(np.asarray(drawn), settings.accumulate):
        batch = [data.pair(int(i)) for i in chunk]
        share = len(batch) / len(drawn)
        with torch.no_grad(), capture(teacher, [t for _, t in pairs]) as t_feats:
            args, kwargs = data.inputs(batch, device, t_dtype)
            t_eps = teacher(*args, **kwargs, return_dict=False)[0]
        args, kwargs = data.inputs(batch, device, torch.float32)
        with capture(student, [s for s, _ in pairs]) as s_feats:
            s_eps = student(*args, **kwargs, return_dict=False)[0]
        loss, chunk_parts = _loss(s_eps, t_eps, s_feats, t_feats, pairs, settings)
        (loss * share).backward()
        for k, v in chunk_parts.items():
            parts[k] = parts.get(k, 0.0) + v * share
    return parts


def _loss(s_eps, t_eps, s_feats, t_feats, pairs, settings: DistillSettings):
    """The weighted loss and its parts (floats, for the report and the progress bar)."""
    out = F.mse_loss(s_eps.float(), t_eps.float())
    feat = s_eps.new_zeros(())
    for s, t in pairs:
        fs, ft = s_feats[s], t_feats[t]
        if fs.shape != ft.shape:  # the pairing is wrong: a slimdiff bug
            raise RuntimeError(f"feature pair {s} {tuple(fs.shape)} / {t} {tuple(ft.shape)}")
        feat = feat + F.mse_loss(fs.float(), ft.float())
    total = settings.out_weight * out + settings.feat_weight * feat
    parts = {"total": total.item(), "out": out.item(), "feat": feat.item()}
    return total, parts


def _describe(losses: dict[str, float]) -> str:
    if not losses:
        return "distill"
    total, out, feat = losses["total"], losses["out"], losses["feat"]
    return f"distill loss {total:.4g} (out {out:.3g}, feat {feat:.3g})"
