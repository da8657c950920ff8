"""EcoDiff's masks: open gates change nothing, a closed gate removes exactly its unit's
columns on every family (FLUX single blocks' fused proj_out included), draws are seeded,
the penalty is the official `reg: 1`, hooks always come off."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from slimdiff.compress.prune.masks import (
    GAMMA,
    TEMPERATURE,
    ZETA,
    Masks,
    apply_masks,
    hard_concrete,
)
from slimdiff.compress.prune.units import UnitGroup

from slimdiff.errors import UserError
from slimdiff.models import load_model
from slimdiff.models.inputs import Sizes, denoiser_inputs, denoiser_kwargs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = ["sd15", "sdxl", "sd3", "flux"]


@pytest.fixture(scope="module")
def tiny():
    cache = {}

    def get(family):
        if family not in cache:
            model = load_model(f"tiny:{family}")
            den = model.denoiser.eval().requires_grad_(False)
            feeds = denoiser_inputs(model.arch, den, Sizes(2, 8, 8, 8))
            kwargs = denoiser_kwargs(model.arch.present_inputs(den.config), feeds)
            cache[family] = (model.arch, den, kwargs)
        return cache[family]

    return get


def _run(den, kwargs) -> torch.Tensor:
    with torch.no_grad():
        return den(**kwargs, return_dict=False)[0]


def _hooks(den) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in den.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_open_gates_leave_the_denoiser_output_bit_identical(tiny, family):
    arch, den, kwargs = tiny(family)
    base = _run(den, kwargs)
    masks = Masks.for_denoiser(arch, den, init_logit=20.0)  # saturated: every gate exactly 1
    gates = masks.sample(0, 0)
    assert all(torch.equal(g, torch.ones_like(g)) for g in gates.values())
    with apply_masks(den, masks.groups, lambda: gates):
        out = _run(den, kwargs)
    assert torch.equal(out, base)


def _probe_groups(groups: list[UnitGroup]) -> list[UnitGroup]:
    """The first group of every layout: plain heads, heads with a context output, heads
    first in a fused projection, plain neurons, neurons last in a fused projection."""
    seen, out = set(), []
    for g in groups:
        site = g.site
        if g.kind == "heads":
            layout = ("heads", site.out_columns, bool(site.context_out))
        else:
            layout = ("neurons", site.down_columns)
        if layout not in seen:
            seen.add(layout)
            out.append(g)
    return out


def _zero_columns(den, group: UnitGroup, unit: int) -> None:
    """Remove `unit` the independent way: zero its input columns of the output projections."""
    site = group.site
    with torch.no_grad():
        if group.kind == "heads":
            d = group.width
            for name in (*site.out, *site.context_out):
                den.get_submodule(name).weight[:, unit * d : (unit + 1) * d] = 0
        else:
            down = den.get_submodule(site.down)
            offset = down.in_features - group.count if site.down_columns == "last" else 0
            down.weight[:, offset + unit] = 0


@pytest.mark.parametrize("family", FAMILIES)
def test_a_closed_gate_equals_zeroing_its_units_projection_columns(tiny, family):
    arch, den, kwargs = tiny(family)
    masks = Masks.for_denoiser(arch, den)
    probes = _probe_groups(list(masks.groups))
    layouts = {
        (g.kind, getattr(g.site, "out_columns", None), getattr(g.site, "down_columns", None))
        for g in probes
    }
    if family == "flux":  # the fused single-block projection, from both sides
        assert ("heads", "first", None) in layouts and ("neurons", None, "last") in layouts
    base = _run(den, kwargs)
    for group in probes:
        unit = 1
        gate = torch.ones(group.count)
        gate[unit] = 0.0
        with apply_masks(den, masks.groups, lambda gate=gate, key=group.key: {key: gate}):
            masked = _run(den, kwargs)
        reference = copy.deepcopy(den)
        _zero_columns(reference, group, unit)
        want = _run(reference, kwargs)
        torch.testing.assert_close(masked, want, rtol=1e-6, atol=1e-6, msg=group.key)
        assert (masked - base).abs().max() > 1e-5, f"{group.key}: closing a unit changed nothing"


def test_gates_multiply_in_the_model_dtype_and_gradients_reach_the_logits(tiny):
    arch, den, kwargs = tiny("sd15")
    masks = Masks.for_denoiser(arch, den, init_logit=0.5)
    half = copy.deepcopy(den).to(torch.bfloat16)
    low = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in kwargs.items()}
    seen = []
    probe = half.get_submodule(masks.groups[0].site.out[0])
    with apply_masks(half, masks.groups, lambda: masks.sample(0, 0)):
        # registered after the mask's hook: sees the masked input
        handle = probe.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
        out = half(**low, return_dict=False)[0]
        handle.remove()
    assert out.dtype == torch.bfloat16 and seen == [torch.bfloat16]
    out.float().square().mean().backward()
    grads = [lam.grad for _, lam in masks.named_logits()]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert sum(bool(g.abs().sum() > 0) for g in grads) > len(grads) // 2


def test_hooks_come_off_whatever_happens_and_unknown_keys_are_refused(tiny):
    arch, den, kwargs = tiny("sd3")
    masks = Masks.for_denoiser(arch, den)
    before = _hooks(den)
    unknown = {"attn:nowhere": torch.ones(2)}
    with (
        pytest.raises(KeyError, match="not hooked"),
        apply_masks(den, masks.groups, lambda: unknown),
    ):
        _run(den, kwargs)
    assert _hooks(den) == before
    with pytest.raises(ZeroDivisionError), apply_masks(den, masks.groups, lambda: {}):
        assert _hooks(den) > before
        _ = 1 / 0
    assert _hooks(den) == before


def test_sampling_is_seeded_by_iteration_step_and_group(tiny):
    arch, den, _ = tiny("sdxl")
    masks = Masks.for_denoiser(arch, den, init_logit=0.0, seed=7)
    a, again = masks.sample(3, 2), masks.sample(3, 2)
    assert list(a) == masks.keys
    assert all(torch.equal(a[k], again[k]) for k in a)
    for other in (masks.sample(3, 1), masks.sample(4, 2)):
        assert all(not torch.equal(a[k], other[k]) for k in a if a[k].numel() >= 4)
    reseeded = Masks.for_denoiser(arch, den, init_logit=0.0, seed=8).sample(3, 2)
    assert not torch.equal(torch.cat(list(a.values())), torch.cat(list(reseeded.values())))
    key = masks.keys[-1]  # neurons: enough draws for the statistics
    g = a[key]
    assert g.min() >= 0 and g.max() <= 1 and (g == 0).any() and (g == 1).any()
    # At λ = 0 the stretched gate is symmetric around 1/2: P(gate = 0) = P(gate = 1).
    assert abs(float((g == 0).float().mean() - (g == 1).float().mean())) < 0.15
    sig = Masks.for_denoiser(arch, den, init_logit=0.3, mask_type="sigmoid")
    assert torch.equal(sig.sample(0, 0)[key], sig.sample(5, 9)[key])
    assert torch.allclose(sig.sample(0, 0)[key], torch.sigmoid(torch.tensor(0.3)))
    with pytest.raises(UserError, match="hard_concrete"):
        Masks.for_denoiser(arch, den, mask_type="binary")


def test_eval_masks_are_the_hard_concrete_median():
    lam = torch.tensor([-10.0, -1.0, 0.0, 0.7, 10.0])
    masks = Masks([_group("ffn:x", 5)], init_logit=0.0)
    with torch.no_grad():
        masks.logit("ffn:x").copy_(lam)
    got = masks.eval_masks()["ffn:x"]
    want = (torch.sigmoid(lam / TEMPERATURE) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got[0] == 0 and got[-1] == 1 and got[2] == 0.5  # saturated ends are exact
    assert torch.all(got[1:] >= got[:-1])  # monotone in λ: ranking by it ranks by λ
    # the median: half the draws fall below it
    draws = hard_concrete(torch.full((20000,), 0.7), torch.rand(20000))
    assert abs(float((draws < got[3]).float().mean()) - 0.5) < 0.02


def _group(key: str, count: int) -> UnitGroup:
    kind = "heads" if key.startswith("attn:") else "neurons"
    return UnitGroup(key, kind, site=None, count=count, params_per_unit=1, width=1)


def test_penalty_is_the_official_l1_of_the_logits_per_width_averaged_per_kind():
    groups = [_group("attn:a", 2), _group("attn:b", 4), _group("ffn:c", 3)]
    masks = Masks(groups, init_logit=0.0)
    values = {"attn:a": [1.0, -2.0], "attn:b": [3.0] * 4, "ffn:c": [0.5, -0.5, 1.0]}
    with torch.no_grad():
        for key, v in values.items():
            masks.logit(key).copy_(torch.tensor(v))
    penalty = masks.penalty()
    # attention: mean(3/2, 12/4) = 2.25; FFN: 2/3; the kinds added
    assert math.isclose(penalty.item(), 2.25 + 2 / 3, rel_tol=1e-6)
    penalty.backward()
    torch.testing.assert_close(masks.logit("attn:a").grad, torch.tensor([1.0, -1.0]) / 2 / 2)
    torch.testing.assert_close(masks.logit("ffn:c").grad, torch.tensor([1.0, -1.0, 1.0]) / 3)
    # FLUX's `lambda_reg`: the same averages of sigmoid(0.4 λ + 1), which saturates.
    sig = {k: torch.sigmoid(0.4 * torch.tensor(v) + 1.0) for k, v in values.items()}
    attn = (sig["attn:a"].sum() / 2 + sig["attn:b"].sum() / 4) / 2
    assert math.isclose(
        masks.penalty(bounded=True).item(), attn + sig["ffn:c"].sum() / 3, rel_tol=1e-6
    )
