"""Training checkpoints as safetensors: resumable long runs with nothing unpickled.

A checkpoint holds named modules' weights, an optimizer's state (its tensors flattened into
the same file, its scalars and param groups as JSON metadata), the step and any extra JSON.
It is written atomically (`slimdiff.fsutil.atomic_file`: a temp name unique to the writer in
the same folder, fsync, rename, fsync the folder), so a kill or power loss leaves either the
previous checkpoint or the new one, and two processes saving the same path do not collide.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slimdiff.fsutil import atomic_file  # which clears a killed writer's temp file first

__all__ = ["can_resume", "load_train_state", "read_train_state", "save_train_state"]

log = logging.getLogger(__name__)


def can_resume(path: Path | None) -> bool:
    """Whether `path` holds a checkpoint to resume from. A damaged one (another program
    wrote or cut it: slimdiff's own writes are atomic) is moved aside to NAME.damaged, with
    a warning, and the work starts over rather than ending in a traceback."""
    if path is None or not path.is_file():
        return False
    try:
        _meta(path)
        return True
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        aside = path.with_name(path.name + ".damaged")
        os.replace(path, aside)
        log.warning(
            "checkpoint %s is unreadable (%s): moved to %s, starting over", path, err, aside
        )
        return False


def checkpoint_if_due(
    path: Path | None,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    done: int,
    total: int,
    every: int,
    extra: dict[str, Any],
) -> None:
    """After step `done` of `total`: save a resumable checkpoint every `every` steps and
    at the end (nothing when `path` is None), as distillation and mask learning do."""
    if path is None or (done % every and done != total):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    save_train_state(path, modules, optimizer, done, extra)


def save_train_state(
    path: str | Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    step: int = 0,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write `modules`' weights, `optimizer`'s state, `step` and `extra` to `path`.

    Temp files of earlier saves that were killed midway (a checkpoint can be gigabytes)
    are removed first.

    Example:
        save_train_state("run/state.safetensors", {"student": unet}, opt, step=500)
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"module.{name}.{key}"] = value.detach().contiguous().cpu()
    opt_meta: dict[str, Any] = {}
    if optimizer is not None:
        state = optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for index, slots in state["state"].items():
            for slot, value in slots.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    tensors[f"optim.{index}.{slot}"] = value.contiguous().cpu()
                else:
                    number = value.item() if torch.is_tensor(value) else value
                    scalars.setdefault(str(index), {})[slot] = number
        opt_meta = {"param_groups": state["param_groups"], "scalars": scalars}
    meta = {"step": step, "extra": extra or {}, "optimizer": opt_meta}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"slimdiff.train_state": json.dumps(meta)})


def read_train_state(path: str | Path) -> tuple[int, dict[str, Any]]:
    """(step, extra) of a checkpoint, without loading its tensors."""
    meta = _meta(path)
    return int(meta["step"]), meta["extra"]


def _meta(path: str | Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["slimdiff.train_state"])


def load_train_state(
    path: str | Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[int, dict[str, Any]]:
    """Restore what `save_train_state` wrote into `modules` and `optimizer`; (step, extra)."""
    meta = _meta(path)
    tensors = load_file(str(path))
    for name, module in modules.items():
        prefix = f"module.{name}."
        module.load_state_dict(
            {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        )
    if optimizer is not None and meta["optimizer"]:
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, slot = key.split(".", 2)
                state.setdefault(int(index), {})[slot] = value
        for index, slots in meta["optimizer"]["scalars"].items():
            for slot, number in slots.items():
                # Adam keeps `step` as a tensor; restore tensors where the optimizer had them.
                state.setdefault(int(index), {})[slot] = torch.tensor(float(number))
        optimizer.load_state_dict(
            {"state": state, "param_groups": meta["optimizer"]["param_groups"]}
        )
    return int(meta["step"]), meta["extra"]
