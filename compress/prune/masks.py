"""EcoDiff's learnable unit masks (arXiv 2412.02852): one logit per attention head and per
FFN neuron, shared by every denoising step, applied by hooks on the output projections.

`Masks` holds one logit vector λ per `compress.prune.units` group ("attn:<site>" heads,
"ffn:<site>" neurons). A gate multiplies each unit's channels at the input of the
projection that reads them (attention: `to_out.0` / `to_add_out`, whose input columns are
grouped by head, channel c in head c // head_dim as diffusers lays heads out; FFN: the down
projection, one column per neuron; FLUX single blocks: one fused `proj_out` whose input is
[attention output | MLP hidden], heads first and neurons last). This is where the official
code masks too: its processors scale each head's attention output before `to_out`, and its
FFN hook scales `ff.net[0]`'s output, which reaches `net[2]` through an identity dropout.

Gates (the official `masking`):

- "hard_concrete" (Louizos et al. 2018, arXiv 1712.01312; EcoDiff's "hard_discrete"):
  u ~ U(0, 1), s = sigmoid((log u - log(1 - u) + λ) / 0.83), stretched to (-0.1, 1.1) and
  clamped to [0, 1]. One draw per unit per denoiser call, shared by the CFG halves of the
  batch (as the official hooks do).
- "sigmoid": sigmoid(λ), deterministic.

Where this departs from the official code, and why:

- Draws are seeded: `sample(iteration, step)` takes u from a generator seeded by
  (seed, iteration, step), split over the groups in module order, so the backward walk of
  time-step gradient checkpointing recomputes step i with exactly the masks its forward
  pass used. The official code draws
  fresh noise on the recomputation, so its gradients are not those of the loss it computed.
- No noise floor on u: the official configs set `masking_eps` (SDXL, SD3: 0.5; FLUX: 0.1),
  which becomes log(u + eps) - log(1 - u + eps) and narrows the logistic noise to
  (-1.1, 1.1) at 0.5, (-2.4, 2.4) at 0.1; here it is
  Louizos' full logistic noise (u clamped to [1e-6, 1 - 1e-6] only to keep logs finite).
- Eval masks (`eval_masks`, for ranking and inspection after training) are the hard-concrete
  *median*, the gate at u = 1/2: clamp(sigmoid(λ / 0.83) * 1.2 - 0.1, 0, 1). It has a closed
  form (the mean has none), is exactly 0 or 1 for saturated logits, so an open mask is the
  unmasked model, and it is increasing in λ, so ranking by it is ranking by λ, which is
  what the official binarisation (`binarize`, global or local) sorts. (Louizos' test-time
  gate omits the temperature; it ranks the same.)

The penalty (`penalty`) is the official `reg: 1` regulariser, read from `calculate_reg_loss`
in src/sdib/utils/utils.py of YaNgZhAnG-V5/EcoDiff (commit 1ce66e7, via the code search) and
its caller `pruning_loss` in scripts/train.py: per layer ||λ||_1 / width over the *logits*
(the SDXL/SD3/SD2 configs have `lambda_reg: false`), averaged over the attention layers and
over the FFN layers separately, the two averages added; `penalty(bounded=True)` is the FLUX
configs' variant (`lambda_reg: true`: sigmoid(0.4 λ + 1) first).

Example:
    masks = Masks.for_denoiser(arch, unet)                       # λ = arch.mask_init_logit
    with apply_masks(unet, masks.groups, lambda: masks.sample(0, step)):
        eps = unet(x, t, text).sample                            # masked, grads reach λ
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from slimdiff.compress.prune.units import UnitGroup, unit_groups
from torch import nn

from slimdiff.errors import UserError
from slimdiff.models.arch import ArchSpec

__all__ = ["MASK_TYPES", "Masks", "apply_masks", "hard_concrete"]

MASK_TYPES = ("hard_concrete", "sigmoid")
TEMPERATURE = 0.83  # Louizos et al.'s beta (renamed: EcoDiff's beta weighs the penalty)
GAMMA, ZETA = -0.1, 1.1  # the stretch interval
_U_EPS = 1e-6

MaskDict = dict[str, torch.Tensor]


def hard_concrete(logit: torch.Tensor, u: torch.Tensor | float) -> torch.Tensor:
    """The hard-concrete gate of `logit` at uniform draw `u` (u = 0.5: the median)."""
    u = torch.as_tensor(u, dtype=logit.dtype, device=logit.device)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + logit) / TEMPERATURE)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def _safe_name(key: str) -> str:
    # ParameterDict names cannot contain "."
    return key.replace(":", "__").replace(".", "_")


def _generator(*entropy: int) -> torch.Generator:
    """A CPU generator seeded from integers (SeedSequence mixes them: no two tuples collide
    in practice, unlike seed + iteration + step)."""
    (state,) = np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)
    return torch.Generator("cpu").manual_seed(int(state) >> 1)  # a non-negative int64


class Masks(nn.Module):
    """One learnable logit vector per unit group, in the groups' order (see module).

    Example:
        masks = Masks(unit_groups(arch, unet), init_logit=3.0)
        gates = masks.sample(iteration=0, step=5)    # {"attn:...": (heads,), "ffn:...": ...}
        loss = ... + beta * masks.penalty()
    """

    def __init__(
        self,
        groups: Sequence[UnitGroup],
        init_logit: float,
        *,
        mask_type: str = "hard_concrete",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if mask_type not in MASK_TYPES:
            raise UserError(f"mask type {mask_type!r}: use one of {', '.join(MASK_TYPES)}")
        self.groups = tuple(groups)
        self.keys = [g.key for g in self.groups]
        self.init_logit, self.mask_type, self.seed = float(init_logit), mask_type, int(seed)
        self._names = {k: _safe_name(k) for k in self.keys}
        if len(set(self._names.values())) != len(self.keys):
            raise ValueError("two unit groups map to the same parameter name")
        self.logits = nn.ParameterDict(
            {
                self._names[g.key]: nn.Parameter(torch.full((g.count,), self.init_logit))
                for g in self.groups
            }
        )

    @classmethod
    def for_denoiser(
        cls,
        arch: ArchSpec,
        denoiser: nn.Module,
        init_logit: float | None = None,
        *,
        mask_type: str = "hard_concrete",
        seed: int = 0,
    ) -> Masks:
        """Masks over every group of `denoiser`, starting at `arch.mask_init_logit`."""
        init = arch.mask_init_logit if init_logit is None else init_logit
        masks = cls(unit_groups(arch, denoiser), init, mask_type=mask_type, seed=seed)
        return masks.to(next(denoiser.parameters()).device)

    def logit(self, key: str) -> nn.Parameter:
        """λ of group `key` ("attn:<site>" / "ffn:<site>")."""
        return self.logits[self._names[key]]

    def named_logits(self) -> Iterator[tuple[str, nn.Parameter]]:
        for key in self.keys:
            yield key, self.logit(key)

    def sample(self, iteration: int, step: int) -> MaskDict:
        """Every group's gates for denoising `step` of draw `iteration`; differentiable in λ.

        Hard-concrete noise comes from one generator seeded by (seed, iteration, step),
        drawn on the CPU for all units at once and split by group in module order (group
        index = position): the same call gives bit-identical masks, on any device, in any
        order. One draw, not one generator per group: seeding 200 generators per denoiser
        call cost half a toy UNet step.
        """
        if self.mask_type == "sigmoid":
            return {key: torch.sigmoid(lam) for key, lam in self.named_logits()}
        logits = [lam for _, lam in self.named_logits()]
        flat = torch.cat(logits)  # (all units,): one gate computation, split after
        g = _generator(self.seed, iteration, step)
        u = torch.rand(flat.shape, generator=g, dtype=torch.float32).clamp(_U_EPS, 1 - _U_EPS)
        gates = hard_concrete(flat, u.to(flat.device, flat.dtype))
        return dict(zip(self.keys, gates.split([lam.numel() for lam in logits]), strict=True))

    @torch.no_grad()
    def eval_masks(self) -> MaskDict:
        """Deterministic gates: the hard-concrete median (u = 1/2) or sigmoid(λ)."""
        if self.mask_type == "sigmoid":
            return {key: torch.sigmoid(lam) for key, lam in self.named_logits()}
        return {key: hard_concrete(lam, 0.5) for key, lam in self.named_logits()}

    def penalty(self, bounded: bool = False) -> torch.Tensor:
        """EcoDiff's `reg: 1`: mean over layers of ||λ||_1 / width, per kind (heads,
        neurons), the kinds' means added (official `pruning_loss`: attn_reg + ffn_reg).
        `bounded`: of sigmoid(0.4 λ + 1) instead of λ (its FLUX configs' `lambda_reg`),
        which stops pulling once a logit is far below zero."""
        per_kind: dict[str, list[torch.Tensor]] = {}
        for group in self.groups:
            lam = self.logit(group.key)
            if bounded:
                lam = torch.sigmoid(0.4 * lam + 1.0)
            per_kind.setdefault(group.kind, []).append(lam.abs().sum() / lam.numel())
        if not per_kind:
            return torch.zeros(())
        return sum(torch.stack(terms).mean() for terms in per_kind.values())


# ----------------------------------------------------------------------------- hooks


@dataclass(frozen=True)
class _Segment:
    """One group's columns of a projection's input."""

    key: str
    units: int
    repeat: int  # channels per unit: head_dim for heads, 1 for neurons
    place: str  # "all" | "first" | "last"

    @property
    def channels(self) -> int:
        return self.units * self.repeat


def _plan(denoiser: nn.Module, groups: Sequence[UnitGroup]) -> dict[str, list[_Segment]]:
    """Projection name -> the segments of its input that groups mask, checked against the
    projections' widths."""
    plan: dict[str, list[_Segment]] = {}
    for g in groups:
        site = g.site
        if g.kind == "heads":
            targets = [(n, "first" if site.out_columns == "first" else "all") for n in site.out]
            targets += [(n, "all") for n in site.context_out]
        else:
            targets = [(site.down, "last" if site.down_columns == "last" else "all")]
        for name, place in targets:
            plan.setdefault(name, []).append(_Segment(g.key, g.count, g.width, place))
    for name, segments in plan.items():
        module = denoiser.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{name} is a {type(module).__name__}; masks hook Linear inputs")
        width = sum(s.channels for s in segments)
        places = sorted(s.place for s in segments)
        if places == ["all"]:
            fits = width == module.in_features
        else:  # a fused projection: heads first, neurons last, at most one of each
            fits = places in (["first"], ["last"], ["first", "last"])
            fits = fits and width <= module.in_features
        if not fits:
            raise ValueError(
                f"{name}: groups {[s.key for s in segments]} cover {width} of its "
                f"{module.in_features} input channels as {places}"
            )
    return plan


def _channel_mask(
    segments: list[_Segment], x: torch.Tensor, in_features: int, gates: MaskDict
) -> torch.Tensor | None:
    """The (in_features,) multiplier of one projection's input `x`, in its dtype and on its
    device: [heads or neurons | ones | neurons]; None when no segment is masked."""
    if not any(s.key in gates for s in segments):
        return None

    def piece(s: _Segment) -> torch.Tensor:
        gate = gates.get(s.key)
        if gate is None:
            return x.new_ones(s.channels)
        # (units,) -> (units * repeat,): channel c belongs to unit c // repeat
        return gate.to(x.device, x.dtype).repeat_interleave(s.repeat)

    pieces = [piece(s) for s in segments if s.place in ("all", "first")]
    gap = in_features - sum(s.channels for s in segments)
    if gap:  # the other part of a fused projection (FLUX single blocks), unmasked here
        pieces.append(x.new_ones(gap))
    pieces += [piece(s) for s in segments if s.place == "last"]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


@contextlib.contextmanager
def apply_masks(
    denoiser: nn.Module, groups: Sequence[UnitGroup], masks_fn: Callable[[], MaskDict]
) -> Iterator[None]:
    """Multiply each group's channels by its gates while the context is open.

    `masks_fn()` is called once per denoiser call (from a forward pre-hook on `denoiser`)
    and returns {group key: (units,) gates}; a group it leaves out is unmasked, a key that
    is no group is an error. Gates multiply in the activations' dtype; autograd flows
    through them into whatever they were computed from. Every hook is removed on exit,
    whatever happens inside.

    Example:
        with apply_masks(unet, masks.groups, lambda: masks.sample(it, step)):
            unet(...)
    """
    plan = _plan(denoiser, groups)
    known = {g.key for g in groups}
    current: list[MaskDict | None] = [None]

    def start(_module, _args):
        gates = masks_fn()
        unknown = set(gates) - known
        if unknown:
            raise KeyError(f"masks for groups that are not hooked: {sorted(unknown)[:3]}")
        current[0] = gates

    def end(_module, _args, _output):
        current[0] = None

    def mask_input(segments, module, args):
        gates = current[0]
        if gates is None:
            raise RuntimeError("a masked projection ran outside its denoiser's forward")
        (x, *rest) = args
        mask = _channel_mask(segments, x, module.in_features, gates)
        if mask is None:
            return None
        return (x * mask, *rest)

    handles = []
    try:
        handles.append(denoiser.register_forward_pre_hook(start))
        handles.append(denoiser.register_forward_hook(end, always_call=True))
        for name, segments in plan.items():
            hook = functools.partial(mask_input, segments)
            handles.append(denoiser.get_submodule(name).register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
