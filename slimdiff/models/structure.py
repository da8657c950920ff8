"""The ArchSpec's structure declarations resolved against a real denoiser.

Passes that mask or slice heads and FFN neurons (EcoDiff) and those that choose layers by
role (QuEST's time layers) read the declarations through these functions, so they work on
every family the ArchSpecs describe, and a declaration that no longer matches diffusers'
module names fails in tests/unit/test_structure.py rather than silently selecting nothing.

Example:
    >>> sites = attention_sites(get_arch("sdxl"), pipe.unet)          # doctest: +SKIP
    >>> sites[0].name, sites[0].heads, sites[0].qkv                      # doctest: +SKIP
    ('down_blocks.1.attentions.0.transformer_blocks.0.attn1', 2, ('...to_q', ...))
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from slimdiff.models.arch import ArchSpec, glob_match, matches

__all__ = [
    "AttentionSite",
    "FFNSite",
    "attention_sites",
    "ffn_sites",
    "find_modules",
    "modules_in",
]


@dataclass(frozen=True)
class AttentionSite:
    """One attention module's heads and the projections (full module names) they span."""

    name: str  # the module AttentionSpec.glob matched
    attention: str  # the diffusers Attention module (has `heads`)
    heads: int
    head_dim: int
    qkv: tuple[str, ...]  # output rows grouped by head
    out: tuple[str, ...]  # input columns grouped by head
    context_qkv: tuple[str, ...]
    context_out: tuple[str, ...]
    out_columns: str  # "all" | "first" (fused output projection)


@dataclass(frozen=True)
class FFNSite:
    """One feed-forward block's hidden neurons and the projections they span."""

    name: str
    up: str  # output rows grouped by neuron ([value; gate] halves when gated)
    down: str  # input columns grouped by neuron
    activation: str
    hidden: int
    gated: bool
    down_columns: str  # "all" | "last"


def find_modules(root: nn.Module, glob: str) -> Iterator[tuple[str, nn.Module]]:
    """Submodules whose full name matches `glob` (arch.glob_match), in module order."""
    for name, module in root.named_modules():
        if name and glob_match(name, glob):
            yield name, module


def modules_in(root: nn.Module, globs: tuple[str, ...]) -> list[str]:
    """Names of the modules with parameters that `globs` cover (see arch.matches)."""
    return [
        name
        for name, module in root.named_modules()
        if name and matches(name, globs) and any(True for _ in module.parameters(recurse=False))
    ]


def _present(root: nn.Module, site: str, names: tuple[str, ...]) -> tuple[str, ...]:
    found = []
    for rel in names:
        full = f"{site}.{rel}" if rel else site
        try:
            root.get_submodule(full)
        except AttributeError:
            continue  # optional projection (SD3's last block has no context output)
        found.append(full)
    return tuple(found)


def attention_sites(arch: ArchSpec, denoiser: nn.Module) -> list[AttentionSite]:
    """Every attention module `arch.attention` declares, resolved on `denoiser`."""
    sites = []
    for spec in arch.attention:
        for name, _ in find_modules(denoiser, spec.glob):
            attn_name = f"{name}.{spec.module}" if spec.module else name
            attention = denoiser.get_submodule(attn_name)
            qkv = _present(denoiser, name, spec.qkv)
            if not qkv:
                continue
            inner = denoiser.get_submodule(qkv[0]).out_features
            heads = int(attention.heads)
            sites.append(
                AttentionSite(
                    name=name,
                    attention=attn_name,
                    heads=heads,
                    head_dim=inner // heads,
                    qkv=qkv,
                    out=_present(denoiser, name, spec.out),
                    context_qkv=_present(denoiser, name, spec.context_qkv),
                    context_out=_present(denoiser, name, spec.context_out),
                    out_columns=spec.out_columns,
                )
            )
    return sites


def ffn_sites(arch: ArchSpec, denoiser: nn.Module) -> list[FFNSite]:
    """Every feed-forward block `arch.ffn` declares, resolved on `denoiser`."""
    sites = []
    for spec in arch.ffn:
        for name, module in find_modules(denoiser, spec.glob):
            if module is None:
                continue
            up = _present(denoiser, name, (spec.up,))
            down = _present(denoiser, name, (spec.down,))
            if not (up and down):
                continue
            width = denoiser.get_submodule(up[0]).out_features
            sites.append(
                FFNSite(
                    name=name,
                    up=up[0],
                    down=down[0],
                    activation=f"{name}.{spec.activation}",
                    hidden=width // 2 if spec.gated else width,
                    gated=spec.gated,
                    down_columns=spec.down_columns,
                )
            )
    return sites
