"""EcoDiff's hard pruning: slice the kept heads and FFN neurons into a smaller dense model.

EcoDiff ("Effortless Efficiency: Low-Cost Pruning of Diffusion Models", arXiv 2412.02852)
learns one mask per attention head and FFN neuron, then prunes for real: the rows of the
projections that make each dropped unit and the input columns of the projections that read
it go (official code: `linear_layer_pruning` / `ffn_linear_layer_pruning` in
src/sdib/utils/utils.py, called by scripts/load_pruned_model.py). Which projections a unit
spans comes from the ArchSpec (`slimdiff.models.structure`), so one code path serves the
UNets, SD3's joint attention and FLUX's double and single-stream blocks.

Where this departs from the official code, and why:
- It pickles the pruned nn.Module; we record one typed edit per pruned site (`HeadsPruned`,
  `NeuronsPruned`: the kept unit indices) and `restore` replays them on a component built
  from its config with parameters on the meta device, so the artifact is diffusers' config +
  safetensors + a JSON log: no pickle (which runs code on load and ties the file to the code
  version that wrote it), loadable by any slimdiff, exportable like any other model.
- A module that loses every unit: the official `SkipConnection` / `AttentionSkipConnection`
  return the module's *input*, which the block's residual then adds a second time. Ours
  return what the masked model computes there: the mask multiplies the units before the
  output projection, so with every unit masked the output is that projection's bias (zeros
  without one). The pruned model then equals the masked one exactly, and exactly the
  parameters `units.py` counts are removed (`AttentionSkip`, `BiasOnly`, `ZeroWidth`),
  plus, where an attention loses every head, the weights it holds besides projections:
  the per-head_dim q/k RMSNorms of FLUX and SD3.5, shared by the heads, so no unit counts
  them (`select.achieved_sparsity` leaves them out: 256 or 512 a module on FLUX.1).
- The official code also scales `query_dim` and `cross_attention_dim` with the head count;
  those are input widths, which pruning heads does not change, so they stay.

Example:
    >>> groups = unit_groups(arch, pipe.unet)                                 # doctest: +SKIP
    >>> keep = select(groups, magnitude_scores(groups, pipe.unet), 0.2)       # doctest: +SKIP
    >>> edits = prune(arch, pipe.unet, groups, keep, component="unet")         # doctest: +SKIP
    >>> edits[0]                                                               # doctest: +SKIP
    HeadsPruned(op='prune.ecodiff.heads', component='unet', module='...attn1', heads=4, ...)
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence

import torch
from slimdiff.compress.prune.edits import EDITS, HeadsPruned, NeuronsPruned
from slimdiff.compress.prune.units import UnitGroup
from torch import nn

from slimdiff.edits import Edit
from slimdiff.errors import UserError
from slimdiff.models.arch import ArchSpec
from slimdiff.models.families import family_of_denoiser, get_arch
from slimdiff.models.structure import AttentionSite, FFNSite, attention_sites, ffn_sites

__all__ = [
    "EDITS",
    "AttentionSkip",
    "BiasOnly",
    "HeadsPruned",
    "NeuronsPruned",
    "ZeroWidth",
    "prune",
    "restore",
]


# ---------------------------------------------------------------- stand-ins for what is gone


class ZeroWidth(nn.Module):
    """A projection (or FLUX single blocks' attention) with no output units left:
    (..., in_features) -> (..., 0), so the concatenation or projection after it reads
    nothing. `out_features = 0` lets `structure.ffn_sites` report the width as 0."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = 0

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states[..., :0]  # (..., C) -> (..., 0)


class BiasOnly(nn.Module):
    """A Linear with no input columns left: every output is its bias (zeros without one)."""

    def __init__(self, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = 0
        self.out_features = out_features
        # A copy of the projection's bias (meta on a rebuild), trainable as it was.
        grad = bias is not None and bias.requires_grad
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), grad)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        shape = (*hidden_states.shape[:-1], self.out_features)  # (..., in) -> (..., out)
        zeros = hidden_states.new_zeros(shape)
        if self.bias is None:
            return zeros
        # A new tensor, not bias.expand(shape): an expanded view of a parameter breaks
        # in-place ops after it and torch's module tracker (FlopCounterMode, in inspect).
        return zeros + self.bias.to(hidden_states.dtype)


class AttentionSkip(nn.Module):
    """An attention module with no heads left. Its outputs are its output projections'
    biases: `to_out.0` for the image stream and, for joint attention (SD3/FLUX), the
    context stream's `to_add_out` (its raw, zero-width heads where the block has none:
    SD3's last block, which drops the context output). Returns what the module did: one
    tensor, or the (image, context) pair when `joint` and given context states. The
    submodule names keep the state-dict keys (`...attn1.to_out.0.bias`)."""

    def __init__(self, to_out: BiasOnly, to_add_out: BiasOnly | None, joint: bool) -> None:
        super().__init__()
        self.to_out = nn.ModuleList([to_out])
        self.to_add_out = to_add_out
        self.joint = joint

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.to_out[0](hidden_states)  # (B, L, C) -> (B, L, out)
        if not self.joint or encoder_hidden_states is None:
            return out
        if self.to_add_out is None:
            return out, encoder_hidden_states[..., :0]
        return out, self.to_add_out(encoder_hidden_states)


# ---------------------------------------------------------------- prune and restore


def prune(
    arch: ArchSpec,
    denoiser: nn.Module,
    groups: Sequence[UnitGroup],
    keep: Mapping[str, Sequence[int]],
    component: str = "unet",
) -> list[Edit]:
    """Slice `denoiser` in place to the units `keep` names; the edits that replay it.

    `groups` are `units.unit_groups(arch, denoiser)` of the unpruned denoiser, `keep` maps
    a group key to its kept unit indices (sorted; [] removes the module: see
    `AttentionSkip`, `ZeroWidth`, `BiasOnly`). Groups absent from `keep`, or keeping every
    unit, are left alone and get no edit. Edits come in `groups` order, and `restore`
    replays them in that order on the rebuilt component.
    """
    by_key = {g.key: g for g in groups}
    unknown = sorted(set(keep) - set(by_key))
    if unknown:
        raise ValueError(f"keep names groups the denoiser does not have: {unknown[:3]}")
    # Every edit is built (and so validated: sorted, unique, >= 0) before any is replayed,
    # so a bad keep leaves the denoiser as it was; and "keeps every unit" is judged on a
    # checked list, not on its length ([0, 0, 1, 2] of 4 heads is no full keep).
    edits: list[Edit] = []
    for group in groups:
        kept = keep.get(group.key)
        if kept is None:
            continue
        kept = [int(i) for i in kept]
        fields = {"component": component, "module": group.site.name, "keep": kept}
        if group.kind == "heads":
            edit = HeadsPruned(heads=group.count, **fields)
        else:
            edit = NeuronsPruned(hidden=group.count, **fields)
        if kept and kept[-1] >= group.count:
            raise ValueError(f"{group.key}: unit {kept[-1]} out of {group.count}")
        if len(kept) < group.count:
            edits.append(edit)
    for edit in edits:
        _replay(arch, denoiser, edit)
    return edits


def restore(module: nn.Module, edit: Edit) -> nn.Module:
    """Replay one `prune` edit on a denoiser built from its saved config (parameters on the
    meta device: the slices are meta tensors of the kept shapes, so the saved safetensors
    then load with `load_state_dict(strict=True, assign=True)`); returns `module`."""
    config = getattr(module, "config", None)
    family = family_of_denoiser(type(module).__name__, dict(config or {}))
    if family is None:
        raise UserError(
            f"edit {edit.op!r} names component {edit.component!r}, a "
            f"{type(module).__name__} that is no denoiser slimdiff knows; compress again"
        )
    _replay(get_arch(family), module, edit)
    return module


def _replay(arch: ArchSpec, denoiser: nn.Module, edit: Edit) -> None:
    with torch.no_grad():
        if isinstance(edit, HeadsPruned):
            site = _site(arch, denoiser, edit, edit.heads)
            _prune_heads(denoiser, site, edit.keep)
        elif isinstance(edit, NeuronsPruned):
            site = _site(arch, denoiser, edit, edit.hidden)
            _prune_neurons(denoiser, site, edit.keep)
        else:
            raise TypeError(f"not a pruning edit: {edit.op}")


# Sites are resolved on the live module, so each edit sees the widths earlier edits left
# (FLUX single blocks: heads and neurons share proj_out's input columns). Resolving walks
# every module (0.1 s on full-size SDXL, times 210 edits), so the sites are kept per
# denoiser with weak references to the modules each names, and used again only while those
# are still the modules at those names (an edit replaces them; nothing else stays stale).
_SITES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _site(arch: ArchSpec, denoiser: nn.Module, edit: HeadsPruned | NeuronsPruned, units: int):
    kind = "heads" if isinstance(edit, HeadsPruned) else "neurons"
    entry = _SITES.get(denoiser, {}).get((kind, edit.module))
    if entry is None or not _current(denoiser, entry[1]):
        sites = [("heads", s) for s in attention_sites(arch, denoiser)]
        sites += [("neurons", s) for s in ffn_sites(arch, denoiser)]
        _SITES[denoiser] = {(k, s.name): (s, _refs(denoiser, s)) for k, s in sites}
        entry = _SITES[denoiser].get((kind, edit.module))
    found = None if entry is None else entry[0]
    what = "heads" if kind == "heads" else "hidden"
    have = None if found is None else getattr(found, what)
    if have != units:
        state = "has no such module" if found is None else f"has {what}={have}"
        raise UserError(
            f"edit {edit.op!r} on {edit.module!r} expects {what}={units}, but the "
            f"{edit.component} {state}; compress the model again"
        )
    if edit.keep and edit.keep[-1] >= units:
        raise UserError(
            f"edit {edit.op!r} on {edit.module!r} keeps unit {edit.keep[-1]}, but the site "
            f"has {units} {'heads' if kind == 'heads' else 'neurons'} (0 to {units - 1}); "
            "the edit log is corrupt: compress the model again"
        )
    return found


def _site_modules(site: AttentionSite | FFNSite) -> tuple[str, ...]:
    if isinstance(site, AttentionSite):
        return (site.attention, *site.qkv, *site.out, *site.context_qkv, *site.context_out)
    return (site.up, site.down, site.activation)


def _refs(denoiser: nn.Module, site) -> tuple[tuple[str, weakref.ref], ...]:
    return tuple((n, weakref.ref(denoiser.get_submodule(n))) for n in _site_modules(site))


def _current(denoiser: nn.Module, refs) -> bool:
    try:
        return all(denoiser.get_submodule(name) is ref() for name, ref in refs)
    except AttributeError:
        return False


def _head_projections(site: AttentionSite) -> tuple[str, ...]:
    """The projections whose output rows make the heads: both streams of joint attention."""
    return (*site.qkv, *site.context_qkv)


def _prune_heads(denoiser: nn.Module, site: AttentionSite, keep: list[int]) -> None:
    d, inner = site.head_dim, site.heads * site.head_dim
    for name in _head_projections(site):
        if denoiser.get_submodule(name).out_features != inner:
            raise NotImplementedError(f"{name}: fewer key/value heads than query heads (GQA)")
    if not keep:
        _remove_attention(denoiser, site)
        return
    # (heads kept,) -> their head_dim rows each: head h spans rows h*d .. h*d + d - 1
    rows = (torch.tensor(keep)[:, None] * d + torch.arange(d)).flatten()
    for name in _head_projections(site):
        _replace(denoiser, name, _sliced(denoiser.get_submodule(name), rows=rows))
    for name in site.out:
        out = denoiser.get_submodule(name)
        # "first": the heads are the first columns of a fused projection (FLUX single
        # blocks' proj_out: [attention, MLP]); the rest stay.
        cols = rows if site.out_columns == "all" else _cat(rows, _span(inner, out.in_features))
        _replace(denoiser, name, _sliced(out, cols=cols))
    for name in site.context_out:
        _replace(denoiser, name, _sliced(denoiser.get_submodule(name), cols=rows))
    attention = denoiser.get_submodule(site.attention)
    # What diffusers' processors read: Attention (AttnProcessor2_0, JointAttnProcessor2_0,
    # AttnProcessor's head_to_batch_dim) reshapes by `heads`; FluxAttention by its fixed
    # head_dim. head_dim, scale and the per-head_dim q/k norms do not change.
    attention.heads = len(keep)
    for attr in ("inner_dim", "inner_kv_dim"):
        if hasattr(attention, attr):
            setattr(attention, attr, len(keep) * d)
    if hasattr(attention, "sliceable_head_dim"):  # set_attention_slice("auto") halves it
        attention.sliceable_head_dim = len(keep)


def _remove_attention(denoiser: nn.Module, site: AttentionSite) -> None:
    prefix = site.attention + "."
    outside = [n for n in _head_projections(site) if not n.startswith(prefix)]
    if outside:
        raise NotImplementedError(f"{site.name}: {outside[0]} lies outside the attention")
    attention = denoiser.get_submodule(site.attention)
    if site.out_columns == "first":
        # The output projection is shared and outside (FLUX single blocks): the attention
        # gives zero columns and the projection loses the heads' ones.
        _replace(denoiser, site.attention, ZeroWidth(site.heads * site.head_dim))
        for name in site.out:
            out = denoiser.get_submodule(name)
            cols = _span(site.heads * site.head_dim, out.in_features)
            _replace(denoiser, name, _sliced(out, cols=cols))
        return
    rel_out = [n.removeprefix(prefix) for n in site.out]
    rel_context = [n.removeprefix(prefix) for n in site.context_out]
    if rel_out != ["to_out.0"] or rel_context not in ([], ["to_add_out"]):
        raise NotImplementedError(f"{site.name}: output projections {site.out} unexpected")
    if getattr(attention, "residual_connection", False) or (
        getattr(attention, "rescale_output_factor", 1.0) != 1.0
    ):
        raise NotImplementedError(f"{site.attention}: residual or rescaled attention output")
    to_out = denoiser.get_submodule(site.out[0])
    to_add_out = denoiser.get_submodule(site.context_out[0]) if site.context_out else None
    skip = AttentionSkip(
        BiasOnly(to_out.out_features, to_out.bias),
        None if to_add_out is None else BiasOnly(to_add_out.out_features, to_add_out.bias),
        joint=bool(site.context_qkv),
    )
    _replace(denoiser, site.attention, skip)


def _neuron_rows(keep: torch.Tensor, hidden: int, gated: bool) -> torch.Tensor:
    """Up-projection rows of the kept neurons: GEGLU's are [value; gate], neuron i is rows
    i and hidden + i, so both halves are cut alike."""
    return _cat(keep, hidden + keep) if gated else keep


def _prune_neurons(denoiser: nn.Module, site: FFNSite, keep: list[int]) -> None:
    hidden = site.hidden
    up, down = denoiser.get_submodule(site.up), denoiser.get_submodule(site.down)
    # "last": the neurons are the last columns of a fused projection (FLUX single blocks'
    # proj_out: [attention, MLP]); the attention's before them stay.
    first = down.in_features - hidden if site.down_columns == "last" else 0
    if site.down_columns == "all" and down.in_features != hidden:
        raise NotImplementedError(f"{site.down}: {down.in_features} inputs, {hidden} neurons")
    kept = torch.tensor(keep, dtype=torch.long)
    cols = _cat(_span(0, first), first + kept)
    if not keep:
        # Nothing to compute: the module making the activations gives zero columns (GEGLU
        # and GELU hold their up projection; FLUX single blocks' proj_mlp stands alone).
        inside = site.up.startswith(site.activation + ".")
        _replace(denoiser, site.activation if inside else site.up, ZeroWidth(up.in_features))
    else:
        _replace(denoiser, site.up, _sliced(up, rows=_neuron_rows(kept, hidden, site.gated)))
    _replace(denoiser, site.down, _sliced(down, cols=cols))


# ---------------------------------------------------------------- tensors and modules


def _span(start: int, stop: int) -> torch.Tensor:
    return torch.arange(start, stop, dtype=torch.long)


def _cat(*parts: torch.Tensor) -> torch.Tensor:
    return torch.cat([p.to(torch.long) for p in parts])


def _sliced(
    linear: nn.Module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> nn.Module:
    """A new Linear of `linear`'s `rows` (outputs) and `cols` (inputs); a BiasOnly when no
    input column is left. On meta weights the slices are meta tensors of the kept shapes,
    so the same code rebuilds the pruned shapes on load without any weights."""
    if isinstance(linear, BiasOnly):  # no inputs left already; nothing more to cut
        return linear
    weight, bias = linear.weight, linear.bias
    if rows is not None:
        rows = rows.to(weight.device)
        weight = weight.index_select(0, rows)
        bias = None if bias is None else bias.index_select(0, rows)
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    if weight.shape[1] == 0:
        return BiasOnly(weight.shape[0], bias)
    new = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype
    )
    grad = linear.weight.requires_grad
    new.weight = nn.Parameter(weight.clone(), requires_grad=grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.clone(), requires_grad=grad)
    return new


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    old = owner.get_submodule(child)
    owner.register_module(child, module.train(old.training))
