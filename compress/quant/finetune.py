"""QuEST's selective finetuning: sensitivity ranking, then training chosen layers against
the full-precision denoiser (MSE at those layers' outputs and at the denoiser's output).

Resumable like distillation: a checkpoint of the student and its optimizer every
`checkpoint_every` steps (slimdiff/trainstate.py); a killed run picks up at the step it
reached, with the same batch order (drawn from the seed per epoch).
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from slimdiff.compress.quant.layers import QuantLayer, quant_layers
from torch import nn

from slimdiff.progress import Progress
from slimdiff.trainstate import can_resume, checkpoint_if_due, load_train_state

__all__ = ["Stage", "finetune", "only_quantized", "rank_sensitivity", "trainable"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def only_quantized(student: nn.Module, names: set[str] | None) -> Iterator[None]:
    """Quantization on in the layers `names` only (None: all)."""
    layers = quant_layers(student)
    saved = {n: layer.enabled for n, layer in layers.items()}
    for n, layer in layers.items():
        layer.enabled = names is None or n in names
    try:
        yield
    finally:
        for n, layer in layers.items():
            layer.enabled = saved[n]


def _out(model: nn.Module, data, pairs) -> torch.Tensor:
    p = next(model.parameters())
    args, kwargs = data.inputs(pairs, p.device, p.dtype)
    return model(*args, **kwargs, return_dict=False)[0]


def rank_sensitivity(
    student: nn.Module, teacher: nn.Module, data, batches: list, names: list[str]
) -> list[tuple[str, float]]:
    """Each layer quantized alone: the denoiser's output MSE against the float model's, on
    `batches`; highest first (QuEST picks its finetuned set by what is sensitive to low
    bit-width; here it is measured per layer rather than fixed per task)."""
    with torch.no_grad():
        refs = [_out(teacher, data, b) for b in batches]
        scores = []
        with Progress("sensitivity", len(names), unit="layers") as progress:
            for name in names:
                with only_quantized(student, {name}):
                    err = sum(
                        float((_out(student, data, b) - r).pow(2).mean())
                        for b, r in zip(batches, refs, strict=True)
                    )
                scores.append((name, err / len(batches)))
                progress.advance(1)
    return sorted(scores, key=lambda kv: -kv[1])


@dataclass
class Stage:
    """One finetuning stage: parameter groups (params, lr) and the layers it supervises."""

    label: str
    groups: list[tuple[list[nn.Parameter], float]]
    supervised: list[str]
    epochs: int


def finetune(
    student: nn.Module,
    teacher: nn.Module,
    data,
    batches: list,
    stage: Stage,
    settings,
    checkpoint: Path | None,
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Train `stage` in place; returns {"steps", "loss_first", "loss_last"}."""
    params = [p for ps, _ in stage.groups for p in ps]
    if not params or stage.epochs == 0 or not batches:
        return {"steps": 0}
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam([{"params": ps, "lr": lr} for ps, lr in stage.groups if ps])
    total = stage.epochs * len(batches)
    start = 0
    if can_resume(checkpoint):
        start, _ = load_train_state(checkpoint, {"student": student}, optimizer)
        log.info("%s: resuming at step %d of %d", stage.label, start, total)
    captured: dict[str, dict[str, torch.Tensor]] = {"s": {}, "t": {}}
    handles = []
    for name in stage.supervised:
        for side, model in (("s", student), ("t", teacher)):

            def hook(_m, _a, out, side=side, name=name):
                captured[side][name] = out

            handles.append(model.get_submodule(name).register_forward_hook(hook))
    losses = []
    student.train(False)
    try:
        with Progress(stage.label, total - start, unit="steps") as progress:
            for step in range(start, total):
                epoch, i = divmod(step, len(batches))
                order = list(range(len(batches)))
                random.Random(settings.seed * 1000 + epoch).shuffle(order)
                pairs = batches[order[i]]
                with torch.no_grad():
                    ref = _out(teacher, data, pairs)
                out = _out(student, data, pairs)
                loss = settings.out_weight * (out - ref).pow(2).mean()
                if stage.supervised and settings.layer_weight:
                    layer = sum(
                        (captured["s"][n] - captured["t"][n].detach()).pow(2).mean()
                        for n in stage.supervised
                    )
                    loss = loss + settings.layer_weight * layer / len(stage.supervised)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                checkpoint_if_due(
                    checkpoint,
                    {"student": student},
                    optimizer,
                    step + 1,
                    total,
                    settings.checkpoint_every,
                    {"stage": stage.label},
                )
                progress.advance(1)
                if on_step is not None:
                    on_step(step + 1)
    finally:
        for h in handles:
            h.remove()
        for p in params:
            p.requires_grad_(False)
    return {
        "steps": total,
        "resumed_at": start,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
    }


def trainable(layer: QuantLayer, weights: bool) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights and bias, activation step sizes) of one layer."""
    w = [layer.weight] + ([layer.bias] if layer.bias is not None else []) if weights else []
    scales = [q.scale for q in (layer.act, layer.out_act) if q is not None]
    return w, scales
