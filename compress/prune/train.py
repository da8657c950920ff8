"""EcoDiff's mask learning (arXiv 2412.02852): λ trained end to end over whole trajectories,
with time-step gradient checkpointing.

Per prompt the objective is that of the paper and of the official scripts/train.py:

    L = MSE(x_T of the masked denoiser from the prompt's noise, x_T of the original) + beta * R(λ)

with R the `Masks.penalty` regulariser. The denoiser is frozen; AdamW trains λ alone.
The target x_T is the teacher's final latent, recorded once by the calibration
(`Calibration.record`), and the masked trajectory starts from the same initial noise and
runs the pipeline's CFG and scheduler steps (`slimdiff.denoise.DenoiseLoop`).

Time-step gradient checkpointing (`checkpointing=True`): the trajectory runs under no_grad
keeping only each step's input latent and sampler state; dL/dx_T comes from the loss; then
the walk goes back one step at a time, recomputing step i with grad from the stored x_i and
state and calling `torch.autograd.grad` once for (λ, x_i, state) with the carried gradients.
Activation memory is one step's, not T steps' (tools/ecodiff_memory.py measures it).

Where this departs from the official code, and why:

- The recomputed step uses the masks its forward pass used (`Masks.sample(iteration, i)`
  is seeded); the official walk resamples the hard-concrete noise, so its λ gradient is
  not the gradient of the loss it computed. With this, the checkpointed gradient equals
  plain backprop's (tests: within 1e-5 relative, all four tiny families).
- Multistep samplers are exact: DPM-Solver++ 2M carries the previous step's data
  prediction in `SamplerState.x0`, PLMS its noise predictions and first sample (`eps`,
  `start`), outputs of earlier steps, so the walk carries their gradients back with the
  latent's (`SamplerState.tensors()`). The official walk follows the latent alone (and
  patches `scheduler._step_index`).
- One autograd call per step for all inputs, not two with retain_graph.
- Gradients of the `prompts_per_iteration` trajectories of one optimizer step are averaged
  (the gradient of the mean loss); the official accumulation sums them, and steps the
  optimizer after the very first sample alone. AdamW is nearly scale-free, so this is a
  choice of what the reported loss means more than of the result.
- Learning rate: constant from the first step, as the official runs have it: their
  configs name a "constant" schedule with `warmup_steps: 10`, and diffusers'
  get_scheduler("constant", ...) ignores the warm-up steps. `warmup` (default 0) is
  there for a linear warm-up over that many iterations (the first step at lr / warmup).
- AdamW keeps torch's default weight decay (0.01) on λ, as the official optimizer does.
- The norm masks of the official FLUX configs (AdaLN modulation outputs) are not learned:
  pruning them saves parameters but no compute (its `SparsityLinear` scatters the kept
  outputs back to full width).
- Prompts are drawn from (seed, iteration) alone, and λ, AdamW and the iteration are
  checkpointed, so a killed run resumed ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from slimdiff.compress.prune.masks import MASK_TYPES, Masks, apply_masks

from slimdiff.denoise import DenoiseLoop
from slimdiff.errors import UserError
from slimdiff.progress import Progress
from slimdiff.sampler import StepNoise
from slimdiff.trainstate import can_resume, checkpoint_if_due, load_train_state, read_train_state

__all__ = ["MaskReport", "MaskSettings", "draw_prompts", "mask_gradients", "train_masks"]

log = logging.getLogger(__name__)

RECON_NORMS = ("l2", "l1")


@dataclass(frozen=True)
class MaskSettings:
    """Mask learning, resolved. Defaults are the official SDXL config's where it has one.

    `prompts_per_iteration` 4 is the paper's optimizer batch (batch 1, accumulate_grad_batches
    4): each prompt is one whole trajectory forward and backward, so an iteration costs 4
    trajectories; 100 iterations are the paper's 4 epochs over 100 prompts. `beta` 0.5 is
    SDXL's and SD3's (FLUX uses 0.01). `checkpoint_every` is in iterations.
    """

    iterations: int = 100
    lr: float = 0.1
    beta: float = 0.5
    checkpointing: bool = True
    checkpoint_every: int = 10
    prompts_per_iteration: int = 4
    seed: int = 0
    warmup: int = 0  # iterations of linear LR warm-up; 0: constant, as the official runs
    mask_type: str = "hard_concrete"
    recon_norm: str = "l2"
    ffn_lr: float | None = None  # the neuron masks' learning rate; None: lr
    bounded_penalty: bool = False  # Masks.penalty(bounded=True): EcoDiff's FLUX setting

    def __post_init__(self) -> None:
        for name in ("iterations", "warmup"):
            if getattr(self, name) < 0:
                raise UserError(f"mask learning: {name} must be >= 0, not {getattr(self, name)}")
        for name in ("checkpoint_every", "prompts_per_iteration"):
            if getattr(self, name) < 1:
                raise UserError(f"mask learning: {name} must be >= 1, not {getattr(self, name)}")
        if self.mask_type not in MASK_TYPES:
            raise UserError(f"mask_type {self.mask_type!r}: use one of {', '.join(MASK_TYPES)}")
        if self.recon_norm not in RECON_NORMS:
            raise UserError(f"recon_norm {self.recon_norm!r}: use one of {', '.join(RECON_NORMS)}")


@dataclass
class MaskReport:
    iterations: int  # completed, in total
    resumed_from: int  # the checkpoint's iteration; 0 for a fresh run
    losses: dict[str, float] = field(default_factory=dict)  # the last iteration's
    first_losses: dict[str, float] = field(default_factory=dict)  # the first iteration's
    seconds: float = 0.0  # this run's, not counting earlier runs that were resumed


def draw_prompts(seed: int, iteration: int, prompts: int, count: int) -> list[int]:
    """Prompt indices for `iteration`: a function of (seed, iteration) only."""
    rng = np.random.default_rng([seed, iteration])
    return rng.choice(prompts, size=count, replace=count > prompts).tolist()


def _objective(
    final: torch.Tensor,
    target: torch.Tensor,
    masks: Masks,
    beta: float,
    recon_norm: str,
    bounded: bool = False,
) -> torch.Tensor:
    distance = F.mse_loss if recon_norm == "l2" else F.l1_loss
    return distance(final.float(), target) + beta * masks.penalty(bounded)


def mask_gradients(
    loop: DenoiseLoop,
    masks: Masks,
    cond: dict[str, Any],
    noise: torch.Tensor,
    target: torch.Tensor,
    iteration: int,
    beta: float,
    checkpointing: bool,
    recon_norm: str = "l2",
    bounded_penalty: bool = False,
    step_noise: StepNoise | None = None,
) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss of ONE masked trajectory and its gradient: (loss, {group key: dL/dλ}).

    L = recon(final latent of `loop` from `noise` under masks.sample(iteration, step),
    `target`) + beta * masks.penalty(). `loop` runs the frozen denoiser (calib.loop),
    `cond` is its recorded conditioning (calib.conditioning), `noise` and `target` the
    prompt's initial noise and the teacher's final latent (calib.record().noise / .final).
    `checkpointing`: time-step gradient checkpointing (see module); otherwise plain backprop
    through the whole trajectory, whose memory grows with the number of steps.
    `step_noise`: the prompt's (calib.step_noise), which a stochastic sampler adds at each
    step as the teacher's recorded run did; the walk back reuses each step's draw.

    Example:
        loss, grads = mask_gradients(calib.loop(unet), masks, calib.conditioning(0, unet),
                                     data.noise(0), data.final(0), 0, 0.5, True)
    """
    param = next(loop.denoiser.parameters())
    noise = noise.to(param.device, param.dtype)
    target = target.to(param.device, torch.float32)
    keys = masks.keys
    params = [masks.logit(k) for k in keys]
    step = [0]  # the step the denoiser is running: what the hooks' masks are drawn for

    def draw():
        return masks.sample(iteration, step[0])

    with apply_masks(loop.denoiser, masks.groups, draw):
        if not checkpointing:
            with torch.enable_grad():
                x, state = loop.start(noise, step_noise)
                for i in range(loop.steps):
                    step[0] = i
                    x, state = loop.step(i, x, state, cond)
                loss = _objective(x, target, masks, beta, recon_norm, bounded_penalty)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            return loss.item(), _by_key(keys, params, grads)

        saved = []  # per step: its input latent and sampler state, nothing else
        with torch.no_grad():
            x, state = loop.start(noise, step_noise)
            for i in range(loop.steps):
                step[0] = i
                saved.append((x, state))
                x, state = loop.step(i, x, state, cond)
        with torch.enable_grad():
            final = x.detach().requires_grad_(True)
            loss = _objective(final, target, masks, beta, recon_norm, bounded_penalty)
            g_x, *acc = torch.autograd.grad(loss, [final, *params], allow_unused=True)
        # dL/d(the state's history tensors) of the step after: SamplerState.tensors() order
        g_state: tuple[torch.Tensor | None, ...] = ()
        for i in reversed(range(loop.steps)):
            x_i, state_i = saved.pop()
            step[0] = i
            x_in = x_i.detach().requires_grad_(True)
            history_in = tuple(t.detach().requires_grad_(True) for t in state_i.tensors())
            with torch.enable_grad():
                x_out, state_out = loop.step(i, x_in, state_i.with_tensors(history_in), cond)
            outputs, grad_outputs = [x_out], [g_x]
            history_out = state_out.tensors()
            later = g_state or (None,) * len(history_out)  # the last step: nothing later
            for t, g in zip(history_out, later, strict=True):
                if g is not None:  # a later step used this one (an x0, an eps, a sample)
                    outputs.append(t)
                    grad_outputs.append(g)
            got = torch.autograd.grad(
                outputs, [*params, x_in, *history_in], grad_outputs, allow_unused=True
            )
            n = len(params)
            acc = [_add(a, g) for a, g in zip(acc, got[:n], strict=True)]
            g_x, g_state = got[n], tuple(got[n + 1 :])
            if g_x is None:  # cannot happen for a real sampler: x_{i+1} depends on x_i
                g_x = torch.zeros_like(x_in)
    return loss.item(), _by_key(keys, params, acc)


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return a if b is None else b if a is None else a + b


def _by_key(keys, params, grads) -> dict[str, torch.Tensor]:
    return {
        k: torch.zeros_like(p) if g is None else g
        for k, p, g in zip(keys, params, grads, strict=True)
    }


def _param_groups(masks: Masks, settings: MaskSettings) -> list[dict[str, Any]]:
    """AdamW groups: head masks at `lr`, neuron masks at `ffn_lr` (default `lr`), as the
    official configs give attention and FFN masks each their own rate."""
    ffn_lr = settings.lr if settings.ffn_lr is None else settings.ffn_lr
    groups = []
    for kind, lr in (("heads", settings.lr), ("neurons", ffn_lr)):
        params = [masks.logit(g.key) for g in masks.groups if g.kind == kind]
        if params:
            groups.append({"params": params, "lr": lr, "base_lr": lr})
    return groups


def _warmup_factor(iteration: int, warmup: int) -> float:
    return 1.0 if warmup == 0 else min(1.0, (iteration + 1) / warmup)


def train_masks(
    denoiser: torch.nn.Module,
    masks: Masks,
    calib: Any,
    settings: MaskSettings,
    checkpoint: Path | None = None,
    on_iteration: Callable[[int], None] | None = None,
) -> MaskReport:
    """Learn `masks` (in place) on `calib`'s trajectories; resume from `checkpoint`.

    `denoiser` is frozen while it runs (requires_grad off, eval) and its flags restored
    after. `masks` must have been made with `settings.mask_type` and `settings.seed`.
    `on_iteration(i)` runs after iteration i is done (and checkpointed when due); tests stop
    a run there to resume it.

    Example:
        masks = Masks.for_denoiser(arch, unet, mask_type="hard_concrete", seed=0)
        report = train_masks(unet, masks, calib, MaskSettings(iterations=100),
                             Path("work/checkpoints/ecodiff/masks.safetensors"))
    """
    start_time = time.perf_counter()
    if (masks.mask_type, masks.seed) != (settings.mask_type, settings.seed):
        raise ValueError(
            f"masks are {masks.mask_type!r} seed {masks.seed}, settings say "
            f"{settings.mask_type!r} seed {settings.seed}: build Masks from the settings"
        )
    data = calib.record()
    device = next(denoiser.parameters()).device
    masks.to(device)
    resume = can_resume(checkpoint)
    state: dict[str, Any] = {}
    if checkpoint is not None:
        state = _fingerprint(settings, masks, calib.key)
    if resume and read_train_state(checkpoint)[1].get("settings") != state:
        raise UserError(
            f"{checkpoint} is a checkpoint of other mask-learning settings (or another model "
            "or calibration); delete it or use another work folder"
        )
    was_training = denoiser.training
    flags = {n: p.requires_grad for n, p in denoiser.named_parameters()}
    denoiser.requires_grad_(False).eval()
    opt = torch.optim.AdamW(_param_groups(masks, settings))
    start, losses, first = 0, {}, {}
    if resume:
        start, extra = load_train_state(checkpoint, {"masks": masks}, opt)
        losses, first = extra["losses"], extra["first_losses"]
        log.info("ecodiff masks: resuming at iteration %d from %s", start, checkpoint)
    loop = calib.loop(denoiser)
    conds: dict[int, dict[str, Any]] = {}
    per = settings.prompts_per_iteration
    resumable = (
        f"a checkpoint every {settings.checkpoint_every} in {checkpoint.parent} lets a killed run "
        "resume; "
        if checkpoint
        else ""
    )
    hint = (
        f"{resumable}each iteration runs {per} trajectories of {loop.steps} steps forward and "
        "back; fewer iterations or prompts per iteration, fewer calibration.steps, or a GPU "
        "(--device cuda) is faster"
    )
    try:
        with Progress(
            "ecodiff masks", settings.iterations, start, unit="iterations", hint=hint
        ) as progress:
            for it in range(start, settings.iterations):
                for group in opt.param_groups:
                    group["lr"] = group["base_lr"] * _warmup_factor(it, settings.warmup)
                with torch.no_grad():
                    # λ is fixed within an iteration
                    penalty = masks.penalty(settings.bounded_penalty).item()
                total, summed = 0.0, {}
                for k, prompt in enumerate(draw_prompts(settings.seed, it, len(data.prompts), per)):
                    if prompt not in conds:
                        conds[prompt] = calib.conditioning(prompt, denoiser)
                    loss, grads = mask_gradients(
                        loop,
                        masks,
                        conds[prompt],
                        data.noise(prompt),
                        data.final(prompt),
                        it * per + k,  # each trajectory of the iteration draws its own masks
                        settings.beta,
                        settings.checkpointing,
                        settings.recon_norm,
                        settings.bounded_penalty,
                        calib.step_noise(prompt),
                    )
                    total += loss
                    for key, g in grads.items():
                        summed[key] = g if key not in summed else summed[key] + g
                for key, lam in masks.named_logits():
                    lam.grad = summed[key] / per
                opt.step()
                opt.zero_grad(set_to_none=True)
                total /= per
                losses = {
                    "total": total,
                    "recon": total - settings.beta * penalty,
                    "penalty": penalty,
                }
                first = first or losses
                done = it + 1
                extra = {"settings": state, "losses": losses, "first_losses": first}
                checkpoint_if_due(
                    checkpoint,
                    {"masks": masks},
                    opt,
                    done,
                    settings.iterations,
                    settings.checkpoint_every,
                    extra,
                )
                progress.advance(description=_describe(losses))
                if on_iteration is not None:
                    on_iteration(done)
    finally:
        denoiser.train(was_training)
        for name, p in denoiser.named_parameters():
            p.requires_grad_(flags[name])
    log.info("ecodiff masks: %d iterations, %s", settings.iterations, _describe(losses))
    return MaskReport(
        iterations=settings.iterations,
        resumed_from=start,
        losses=losses,
        first_losses=first,
        seconds=time.perf_counter() - start_time,
    )


def _fingerprint(settings: MaskSettings, masks: Masks, calib_key: str) -> dict[str, Any]:
    """What a checkpoint must have been written with to be resumed: the settings (not the
    checkpoint interval), the calibration, and the groups and initial logit of the masks."""
    groups = json.dumps([[g.key, g.count] for g in masks.groups])
    state = {k: v for k, v in asdict(settings).items() if k != "checkpoint_every"}
    state.update(
        calibration=calib_key,
        groups=hashlib.sha256(groups.encode()).hexdigest(),
        init_logit=masks.init_logit,
    )
    return json.loads(json.dumps(state))


def _describe(losses: dict[str, float]) -> str:
    if not losses:
        return "ecodiff masks"
    total, recon, penalty = losses["total"], losses["recon"], losses["penalty"]
    return f"ecodiff masks loss {total:.4g} (recon {recon:.3g}, penalty {penalty:.3g})"
