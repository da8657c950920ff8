"""The ArchSpecs' structure declarations resolve on every family's real diffusers modules.

Passes (EcoDiff's head and FFN masks, QuEST's time layers) select modules only through
these declarations, so a glob that stops matching diffusers' names must fail here.
"""

from __future__ import annotations

import pytest
from torch import nn

from slimdiff.models import FAMILIES, load_model
from slimdiff.models.arch import glob_match, matches
from slimdiff.models.structure import attention_sites, ffn_sites, modules_in

FAMILY_LIST = list(FAMILIES)


@pytest.fixture(scope="module")
def tiny():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = load_model(f"tiny:{family}", device="meta")
        return cache[family]

    return get


def _count(denoiser: nn.Module, class_name: str) -> int:
    return sum(type(m).__name__ == class_name for m in denoiser.modules())


def test_globs_match_part_by_part():
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    assert glob_match(name, "**.transformer_blocks.*.attn1")
    assert not glob_match(name + ".to_q", "**.transformer_blocks.*.attn1")
    assert glob_match("down_blocks.3", "down_blocks.*")
    assert not glob_match("down_blocks.3.resnets.0", "down_blocks.*")
    assert matches("time_embedding.linear_1", ("time_embedding",))
    assert not matches("time_embedding_x", ("time_embedding",))


@pytest.mark.parametrize("family", FAMILY_LIST)
def test_attention_sites_cover_every_attention_block(tiny, family):
    model = tiny(family)
    arch, den = model.arch, model.denoiser
    sites = attention_sites(arch, den)
    expected = {
        "sd15": 2 * _count(den, "BasicTransformerBlock"),
        "sdxl": 2 * _count(den, "BasicTransformerBlock"),
        "sd3": _count(den, "JointTransformerBlock"),
        "flux": _count(den, "FluxTransformerBlock") + _count(den, "FluxSingleTransformerBlock"),
    }[family]
    assert len(sites) == expected > 0
    for site in sites:
        attn = den.get_submodule(site.attention)
        assert site.heads == attn.heads and site.heads * site.head_dim == attn.inner_dim
        assert len(site.qkv) == 3
        for q in site.qkv + site.context_qkv:
            assert den.get_submodule(q).out_features == site.heads * site.head_dim
        out_in = [den.get_submodule(o).in_features for o in site.out + site.context_out]
        if site.out_columns == "all":
            assert out_in and all(n == site.heads * site.head_dim for n in out_in)
        else:  # FLUX single blocks: proj_out takes [attention, MLP hidden]
            assert out_in[0] > site.heads * site.head_dim
    if family in ("sd3", "flux"):  # joint attention: the text stream shares the heads
        assert any(len(s.context_qkv) == 3 and s.context_out for s in sites)


@pytest.mark.parametrize("family", FAMILY_LIST)
def test_ffn_sites_cover_every_feed_forward(tiny, family):
    model = tiny(family)
    arch, den = model.arch, model.denoiser
    sites = ffn_sites(arch, den)
    blocks = {
        "sd15": _count(den, "BasicTransformerBlock"),
        "sdxl": _count(den, "BasicTransformerBlock"),
        # image and context FFN per joint block; SD3's last block has no context FFN
        "sd3": 2 * _count(den, "JointTransformerBlock") - 1,
        "flux": 2 * _count(den, "FluxTransformerBlock") + _count(den, "FluxSingleTransformerBlock"),
    }[family]
    assert len(sites) == blocks > 0
    for site in sites:
        up, down = den.get_submodule(site.up), den.get_submodule(site.down)
        assert up.out_features == site.hidden * (2 if site.gated else 1)
        if site.down_columns == "all":
            assert down.in_features == site.hidden
        else:
            assert down.in_features > site.hidden
        den.get_submodule(site.activation)  # the mask point exists
    assert all(s.gated for s in sites) == (family in ("sd15", "sdxl"))


@pytest.mark.parametrize("family", FAMILY_LIST)
@pytest.mark.parametrize(
    "field",
    [
        "never_touch",
        "time_embedders",
        "time_projections",
        "io_layers",
        "never_quantize",
        "weight_only",
    ],
)
def test_every_declared_layer_glob_selects_modules(tiny, family, field):
    model = tiny(family)
    for glob in getattr(model.arch, field):
        assert modules_in(model.denoiser, (glob,)), f"{family}.{field}: {glob} matches nothing"


@pytest.mark.parametrize("family", FAMILY_LIST)
def test_time_layers_are_split_from_never_touch(tiny, family):
    arch, den = tiny(family).arch, tiny(family).denoiser
    time_layers = set(modules_in(den, arch.time_layers))
    assert time_layers and not time_layers & set(modules_in(den, arch.never_touch))
    # What structural passes freeze is never_touch plus the global time embedders only.
    assert set(modules_in(den, arch.frozen)) >= set(modules_in(den, arch.time_embedders))
    assert not set(modules_in(den, arch.frozen)) & set(modules_in(den, arch.time_projections))
