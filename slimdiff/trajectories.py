"""Teacher trajectories: every calibration prompt's denoising run, as passes need it.

Recorded by a forward pre-hook on the denoiser while the whole pipeline runs, so they are
exactly what the deployed model sees: the CFG-batched latents after the scheduler's input
scaling, the timestep, the text embeddings and, for SDXL, `added_cond_kwargs`
(text_embeds, time_ids). Calls are stored by keyword (positional arguments are named from
the denoiser's signature), so `kwargs.sample` (UNet) or `kwargs.hidden_states` (SD3, FLUX)
is the latent input whatever the pipeline's call style. Per prompt they also hold the
initial noise (as diffusers' `latents=` takes it) and the final latent (as
output_type="latent" returns it), and the scheduler's timestep of every step, so a pass can
rerun the trajectory with a stateless sampler (slimdiff/denoise.py) and compare endpoints.
Distillation replays the per-step inputs into a teacher and a student
(`Trajectories.inputs`), without the text encoders, VAE or scheduler.

On disk, one safetensors file per prompt. A tensor that changes from step to step is stored
stacked, (steps, B, ...); one that does not (the text embeddings) once, (B, ...).

    trajectories/<key>/meta.json                {"format", "key", "prompts", "steps",
                                                 "timesteps", "unbatched"}
    trajectories/<key>/prompt_0000.safetensors  "step.kwargs.sample" (S, B, C, H, W),
                                                "step.kwargs.timestep" (S, B),
                                                "const.kwargs.encoder_hidden_states" (B, 77, D),
                                                "traj.noise" (1, C, H, W), "traj.final", ...
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from slimdiff.fsutil import atomic_dir, atomic_file

__all__ = [
    "Trajectories",
    "load_prompts",
    "load_trajectories",
    "record_trajectories",
    "save_prompt",
    "save_trajectories",
]

log = logging.getLogger(__name__)

_FORMAT = 2
_TRAJ = "traj."  # per-prompt tensors that are not denoiser inputs: noise, final


@dataclass
class Trajectories:
    """Per prompt, the denoiser inputs of every step; `inputs(pairs)` batches them.

    Example:
        args, kwargs = trajectories.inputs([(0, 3), (1, 0)])   # (prompt, step) pairs
        eps = unet(*args, **kwargs, return_dict=False)[0]       # (2 * B, C, H, W)
    """

    prompts: list[str]
    steps: int
    # per prompt: "step.<name>", "const.<name>" (denoiser inputs), "traj.noise", "traj.final"
    tensors: list[dict[str, torch.Tensor]]
    unbatched: frozenset[str] = frozenset()  # names without a leading batch axis
    key: str = ""
    timesteps: list[float] = field(default_factory=list)  # the scheduler's t at each step

    def __len__(self) -> int:
        return len(self.prompts) * self.steps

    def pair(self, index: int) -> tuple[int, int]:
        """The (prompt, step) of flat index `index` in [0, len)."""
        return divmod(index, self.steps)

    def step_of(self, t: float) -> int:
        """The step whose scheduler timestep is `t`: caches and scales key by timestep, so
        they stay meaningful for another step count or a resumed run."""
        for i, value in enumerate(self.timesteps):
            if abs(value - float(t)) <= 1e-4 * max(1.0, abs(value)):
                return i
        raise KeyError(f"timestep {t} is not one of this calibration's {self.timesteps}")

    def noise(self, prompt: int) -> torch.Tensor:
        """The initial noise of `prompt`'s run, as diffusers' `latents=` takes it."""
        return self.tensors[prompt][_TRAJ + "noise"]

    def final(self, prompt: int) -> torch.Tensor:
        """`prompt`'s final latent, as the pipeline returns it with output_type="latent"."""
        return self.tensors[prompt][_TRAJ + "final"]

    def conditioning(
        self,
        prompt: int,
        skip: Iterable[str],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> dict[str, Any]:
        """The denoiser's keyword arguments for `prompt` that stay the same at every step (text
        states, added conditions, ids, guidance), without the names in `skip` (the latent
        and timestep inputs, which a rerun supplies)."""
        skipped = {f"kwargs.{name}" for name in skip}
        flat = {}
        for key, value in self.tensors[prompt].items():
            kind, name = key.split(".", 1)
            if kind == "const" and name not in skipped:
                if dtype is not None and value.is_floating_point():
                    value = value.to(dtype)
                flat[name] = value.to(device) if device is not None else value
        return _unflatten(flat)[1]

    def inputs(
        self,
        pairs: Iterable[tuple[int, int]],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[list[Any], dict[str, Any]]:
        """Positional and keyword arguments of one denoiser call over `pairs`, concatenated
        on the batch axis; floating tensors cast to `dtype`."""
        parts: dict[str, list[torch.Tensor]] = {}
        for prompt, step in pairs:
            for key, value in self.tensors[prompt].items():
                if key.startswith(_TRAJ):
                    continue
                kind, name = key.split(".", 1)
                parts.setdefault(name, []).append(value[step] if kind == "step" else value)
        flat = {}
        for name, values in parts.items():
            t = values[0] if name in self.unbatched else torch.cat(values)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            flat[name] = t.to(device) if device is not None else t
        return _unflatten(flat)


def record_trajectories(
    denoiser: torch.nn.Module,
    run_prompt: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    prompts: list[str],
    progress: Callable[[], None] | None = None,
    timesteps: Callable[[], Iterable[float]] | None = None,
    done: dict[int, tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None,
    on_prompt: Callable[[int, dict[str, torch.Tensor], dict[str, Any]], None] | None = None,
) -> Trajectories:
    """Run `run_prompt(i)` for every prompt while a pre-hook records `denoiser`'s inputs.

    `run_prompt(i)` returns (initial noise, final latent); `timesteps()` the scheduler's
    timesteps of the run just made. `done`: prompts an earlier, killed run recorded,
    {i: (tensors, meta)}, taken as they are; `on_prompt(i, tensors, meta)` is called as
    each prompt is recorded (calib.py saves it, so a killed run resumes there).
    """
    calls: list[dict[str, torch.Tensor]] = []
    unbatched: set[str] = set()  # FLUX's token ids: shared, not concatenated, when batched
    counts = set()
    signature = inspect.signature(denoiser.forward)

    def hook(_module, args, kwargs):
        batch, flat = _flatten(signature, args, kwargs)
        unbatched.update(k for k, v in flat.items() if v.shape[0] != batch)
        calls.append(flat)

    tensors = []
    steps: list[float] = []
    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(len(prompts)):
            if done and i in done:  # recorded before a kill: as it was
                packed, meta = done[i]
                counts.add(int(meta["calls"]))
                unbatched.update(meta["unbatched"])
                steps = [float(t) for t in meta["timesteps"]]
            else:
                calls.clear()
                noise, final = run_prompt(i)
                counts.add(len(calls))
                packed = _pack(calls)
                packed[_TRAJ + "noise"] = noise.detach().float().cpu().contiguous()
                packed[_TRAJ + "final"] = final.detach().float().cpu().contiguous()
                steps = [float(t) for t in timesteps()] if timesteps is not None else []
                if on_prompt is not None:
                    meta = {"calls": len(calls), "unbatched": sorted(unbatched), "timesteps": steps}
                    on_prompt(i, packed, meta)
            tensors.append(packed)
            if progress is not None:
                progress()
    finally:
        handle.remove()
    if len(counts) != 1:  # a scheduler that adapts its step count: cannot index by step
        raise RuntimeError(f"the denoiser ran {sorted(counts)} times per prompt; expected one")
    return Trajectories(list(prompts), counts.pop(), tensors, frozenset(unbatched), "", steps)


def save_trajectories(folder: Path, t: Trajectories) -> None:
    """Write `t` to `folder` atomically (a killed run leaves no folder that looks complete)."""
    with atomic_dir(folder) as tmp:
        for i, tensors in enumerate(t.tensors):
            save_file(tensors, str(tmp / f"prompt_{i:04d}.safetensors"))
        meta = {
            "format": _FORMAT,
            "key": t.key,
            "prompts": t.prompts,
            "steps": t.steps,
            "timesteps": t.timesteps,
            "unbatched": sorted(t.unbatched),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def save_prompt(folder: Path, i: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """One prompt's recording, as it is made (atomic): what a killed run resumes from."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / f"prompt_{i:04d}.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"slimdiff.prompt": json.dumps(meta)})


def load_prompts(folder: Path, count: int) -> dict[int, tuple[dict[str, torch.Tensor], dict]]:
    """The prompts of `count` that `save_prompt` wrote to `folder`; an unreadable file is
    left out (recorded again)."""
    done = {}
    for i in range(count):
        path = folder / f"prompt_{i:04d}.safetensors"
        if not path.is_file():
            continue
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads(f.metadata()["slimdiff.prompt"])
            done[i] = (load_file(str(path)), meta)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
            log.warning(
                "calibration: %s is unreadable (%s); recording that prompt again", path, err
            )
    return done


def load_trajectories(folder: Path) -> Trajectories | None:
    """The trajectories saved in `folder`; None when there are none (or another format, or
    a damaged file: warned of, recorded again)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("format") != _FORMAT:
        return None
    try:
        tensors = [
            load_file(str(folder / f"prompt_{i:04d}.safetensors"))
            for i in range(len(meta["prompts"]))
        ]
    except (OSError, SafetensorError) as err:
        log.warning(
            "calibration: %s is damaged (%s); recording the trajectories again", folder, err
        )
        return None
    return Trajectories(
        prompts=meta["prompts"],
        steps=meta["steps"],
        tensors=tensors,
        unbatched=frozenset(meta["unbatched"]),
        key=meta["key"],
        timesteps=[float(t) for t in meta["timesteps"]],
    )


# ----------------------------------------------------------------------------- helpers


def _flatten(
    signature: inspect.Signature, args: tuple, kwargs: dict
) -> tuple[int, dict[str, torch.Tensor]]:
    """Tensor arguments by dotted keyword ("kwargs.sample", "kwargs.added_cond_kwargs.time_ids").

    Positional arguments are named from the denoiser's signature. A 0-d tensor (diffusers
    passes the timestep as one) is expanded to the batch, so calls from different steps
    concatenate; the denoiser broadcasts it the same way. Arguments that are not tensors
    (None, return_dict) are left to the replaying call's defaults.
    """
    kwargs = dict(signature.bind_partial(*args, **kwargs).arguments)
    for name, param in signature.parameters.items():  # **kwargs-style catch-alls
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in kwargs:
            kwargs.update(kwargs.pop(name))
    values = [*kwargs.values()]
    batch = next((v.shape[0] for v in values if torch.is_tensor(v) and v.dim() > 0), 1)
    out: dict[str, torch.Tensor] = {}

    def put(name: str, value: Any) -> None:
        if torch.is_tensor(value):
            value = value.detach()
            if value.dim() == 0:
                value = value.expand(batch)
            out[name] = value.to("cpu", copy=True).contiguous()
        elif isinstance(value, dict):
            for key, item in value.items():
                put(f"{name}.{key}", item)

    for key, value in kwargs.items():
        put(f"kwargs.{key}", value)
    return batch, out


def _pack(calls: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One prompt's calls: tensors that vary over steps stacked, the others stored once."""
    if not calls:
        raise RuntimeError("the pipeline never called its denoiser; nothing was recorded")
    out = {}
    for name, first in calls[0].items():
        values = [c[name] for c in calls]
        if all(torch.equal(first, v) for v in values[1:]):
            out[f"const.{name}"] = first
        else:
            out[f"step.{name}"] = torch.stack(values)
    return out


def _unflatten(flat: dict[str, torch.Tensor]) -> tuple[list[Any], dict[str, Any]]:
    args: dict[int, Any] = {}
    kwargs: dict[str, Any] = {}
    for name, value in flat.items():
        kind, rest = name.split(".", 1)
        if kind == "args":
            args[int(rest)] = value
            continue
        node = kwargs
        *path, leaf = rest.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return [args[i] for i in sorted(args)], kwargs
