"""What survives block removal: a plan over the teacher's stages, layers and transformer blocks.

A diffusers UNet2DConditionModel is a stack of stages. Each down block has `layers` pairs of
(ResNet, transformer) — a "layer" — and a downsampler; each up block has one layer more
(its last layer takes the skip connection of the previous stage); the mid-block is
ResNet–transformer–ResNet. A transformer (`attentions.j`) holds `depth` BasicTransformerBlocks.

A `Plan` says, for every block of the student, which teacher block, layers and transformer
blocks it is initialised from. It is derived from `Settings` (a preset resolved against the
teacher, or the pass's generic keys) and checked against what diffusers' config can
express, so the student can be built by `UNet2DConditionModel(**config)`:

- stages go only from the inside out, down and up together (BK-SDM-Tiny);
- an up block has exactly one layer more than its down block (diffusers builds it so);
- a ResNet and its transformer go together (diffusers' cross-attention blocks pair them);
- the mid-block's depth is the deepest down block's first-layer depth (diffusers passes it
  `transformer_layers_per_block[-1]`).

Pure Python on a `Structure` read from the modules: no torch needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from fractions import Fraction
from typing import Literal

from slimdiff.errors import UserError

__all__ = [
    "BlockPlan",
    "MidMode",
    "Plan",
    "Settings",
    "Structure",
    "make_plan",
    "pick_layers",
    "read_structure",
]

MidMode = Literal["keep", "resnet_only", "none"]
Depth = int | Fraction  # absolute, or relative to the teacher's depth (presets)
_MID_RANK = {"none": 0, "resnet_only": 1, "keep": 2}
_MID_TYPES = {"UNetMidBlock2DCrossAttn": "keep", "UNetMidBlock2D": "resnet_only"}


@dataclass(frozen=True)
class Structure:
    """Layer counts and transformer depths of a UNet, read from its modules.

    depths[i][j] is the depth of block i's layer j, 0 where the block has no transformers.
    """

    down_depths: tuple[tuple[int, ...], ...]
    up_depths: tuple[tuple[int, ...], ...]
    mid: MidMode
    mid_depth: int  # 0 without a transformer

    @property
    def stages(self) -> int:
        return len(self.down_depths)


def read_structure(unet) -> Structure:
    """The Structure of a diffusers UNet2DConditionModel (works on the meta device)."""

    def depths(block) -> tuple[int, ...]:
        attentions = getattr(block, "attentions", None)
        if not attentions:
            return (0,) * len(block.resnets)
        return tuple(len(a.transformer_blocks) for a in attentions)

    mid_block = unet.mid_block
    if mid_block is None:
        mid, mid_depth = "none", 0
    else:
        kind = type(mid_block).__name__
        if kind not in _MID_TYPES:
            raise UserError(
                f"blocks.remove does not know mid-block {kind}; it handles "
                f"{', '.join(_MID_TYPES)} or none"
            )
        mid = _MID_TYPES[kind]
        attentions = getattr(mid_block, "attentions", None) or ()
        mid_depth = len(attentions[0].transformer_blocks) if attentions else 0
    return Structure(
        down_depths=tuple(depths(b) for b in unet.down_blocks),
        up_depths=tuple(depths(b) for b in unet.up_blocks),
        mid=mid,
        mid_depth=mid_depth,
    )


@dataclass(frozen=True)
class Settings:
    """The student in absolute terms: what a preset resolves to, or the generic keys.

    `layers_per_block` and the depth lists index the student's blocks (after stages are
    removed), in diffusers' order; a depth entry is an int (every layer of the block) or a
    list per layer, and is ignored for blocks without transformers, as in diffusers. A
    Fraction (presets only) is relative to the depth of the teacher layer the student
    layer starts from: rounded half up, at least 1.
    """

    drop: tuple[str, ...] = ()
    drop_stages: int = 0
    layers_per_block: int | tuple[int, ...] | None = None
    down_depths: tuple[Depth | tuple[Depth, ...], ...] | None = None
    up_depths: tuple[Depth | tuple[Depth, ...], ...] | None = None
    mid: MidMode | None = None
    keep: Literal["first", "even"] = "first"


@dataclass(frozen=True)
class BlockPlan:
    """One student block: its teacher block, and per student layer the teacher layer and
    the teacher transformer blocks kept (empty where the block has no transformers)."""

    teacher: int
    layers: tuple[int, ...]
    transformer_blocks: tuple[tuple[int, ...], ...]

    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(len(t) for t in self.transformer_blocks)


@dataclass(frozen=True)
class Plan:
    teacher: Structure
    down: tuple[BlockPlan, ...]
    up: tuple[BlockPlan, ...]
    mid: MidMode
    mid_blocks: tuple[int, ...] = field(default=())  # teacher transformer blocks of the mid

    @property
    def drop_stages(self) -> int:
        return self.teacher.stages - len(self.down)

    @property
    def layers_per_block(self) -> tuple[int, ...]:
        return tuple(len(b.layers) for b in self.down)

    def student_structure(self) -> Structure:
        def depths(b: BlockPlan) -> tuple[int, ...]:
            return tuple(len(t) for t in b.transformer_blocks) or (0,) * len(b.layers)

        return Structure(
            down_depths=tuple(depths(b) for b in self.down),
            up_depths=tuple(depths(b) for b in self.up),
            mid=self.mid,
            mid_depth=len(self.mid_blocks),
        )


def pick_layers(total: int, n: int, keep: str) -> tuple[int, ...]:
    """Which `n` of `total` transformer blocks survive a depth cut.

    "first" keeps blocks 0..n-1: the published configs (SSD-1B, Vega, KOALA) give the
    depths but not which blocks were copied, and the prefix is the one choice under which
    the kept blocks see exactly the inputs they saw in the teacher. "even" spreads them
    over the depth, first and last included (4 of 10: 0, 3, 6, 9), as layer-dropping
    students in the DistilBERT line do.
    """
    if n >= total:
        return tuple(range(total))
    if keep == "first" or n == 1:
        return tuple(range(n))
    return tuple(math.floor(i * (total - 1) / (n - 1) + 0.5) for i in range(n))


# ----------------------------------------------------------------------------- drop globs


def _segments_match(name: str, glob: str) -> bool:
    """fnmatch per dotted segment: "*" stays within one segment, so "down_blocks.*.resnets.1"
    never reaches into a transformer's blocks."""
    parts, pattern = name.split("."), glob.split(".")
    return len(parts) == len(pattern) and all(
        fnmatchcase(p, g) for p, g in zip(parts, pattern, strict=True)
    )


def _units(teacher: Structure) -> list[str]:
    """Teacher module names `drop` can name."""
    out = []
    for kind, blocks in (("down_blocks", teacher.down_depths), ("up_blocks", teacher.up_depths)):
        for i, depths in enumerate(blocks):
            out.append(f"{kind}.{i}")
            for j, depth in enumerate(depths):
                out.append(f"{kind}.{i}.resnets.{j}")
                if depth:
                    out.append(f"{kind}.{i}.attentions.{j}")
                    out += [
                        f"{kind}.{i}.attentions.{j}.transformer_blocks.{k}" for k in range(depth)
                    ]
    if teacher.mid != "none":
        out.append("mid_block")
    if teacher.mid == "keep":
        out += ["mid_block.attentions.0", "mid_block.resnets.1"]
        out += [f"mid_block.attentions.0.transformer_blocks.{k}" for k in range(teacher.mid_depth)]
    return out


def _dropped(teacher: Structure, globs: tuple[str, ...]) -> set[str]:
    units = _units(teacher)
    out: set[str] = set()
    for glob in globs:
        hit = {u for u in units if _segments_match(u, glob)}
        if not hit:
            raise UserError(
                f"blocks.remove: drop {glob!r} matches no removable module of this UNet; name "
                "stages, layers or transformer blocks, e.g. 'down_blocks.3', "
                "'down_blocks.*.resnets.1', 'up_blocks.0.attentions.2.transformer_blocks.9' "
                "('*' matches within one dotted name)"
            )
        out |= hit
    return out


# ----------------------------------------------------------------------------- the plan


def make_plan(teacher: Structure, s: Settings) -> Plan:
    """The Plan for `s` on `teacher`; UserError for what diffusers' config cannot express."""
    dropped = _dropped(teacher, s.drop)
    n = teacher.stages
    k = max(s.drop_stages, _stages_from_drop(teacher, dropped))
    if k >= n:
        raise UserError(f"blocks.remove: cannot remove all {n} stages of the UNet")
    kept = n - k
    for key in ("down_depths", "up_depths"):
        table = getattr(s, key)
        if table is not None and len(table) != kept:
            raise UserError(
                f"blocks.remove: {key} has {len(table)} entries but the student has {kept} "
                f"blocks (the teacher has {n}, {k} removed); give one per block"
            )

    lpb = _layers_per_block(teacher, s, dropped, kept)
    down = tuple(
        _block_plan(
            "down_blocks", i, i, teacher.down_depths[i], lpb[i], dropped, s, "down_depths", i
        )
        for i in range(kept)
    )
    up = tuple(
        _block_plan(
            "up_blocks",
            i,
            i + k,
            teacher.up_depths[i + k],
            lpb[kept - 1 - i] + 1,
            dropped,
            s,
            "up_depths",
            i,
        )
        for i in range(kept)
    )
    mid = _mid_mode(teacher, s, dropped)
    mid_blocks: tuple[int, ...] = ()
    if mid == "keep":
        mid_blocks = _mid_blocks(teacher, s, dropped, down[-1])
    return Plan(teacher=teacher, down=down, up=up, mid=mid, mid_blocks=mid_blocks)


def _stages_from_drop(teacher: Structure, dropped: set[str]) -> int:
    n = teacher.stages
    down = sorted(i for i in range(n) if f"down_blocks.{i}" in dropped)
    up = sorted(i for i in range(n) if f"up_blocks.{i}" in dropped)
    k = len(down)
    if down != list(range(n - k, n)) or up != list(range(k)):
        raise UserError(
            "blocks.remove: only the innermost stages can be removed, down and up together "
            f"(down_blocks.{n - 1} with up_blocks.0, as BK-SDM-Tiny does); drop names "
            f"down {down or 'none'} and up {up or 'none'}"
        )
    return k


def _layers_per_block(
    teacher: Structure, s: Settings, dropped: set[str], kept: int
) -> tuple[int, ...]:
    want = s.layers_per_block
    if isinstance(want, int):
        want = (want,) * kept
    if want is not None and len(want) != kept:
        raise UserError(
            f"blocks.remove: layers_per_block has {len(want)} entries, the student has {kept} "
            "down blocks; give one per block or a single number"
        )
    out = []
    for i in range(kept):
        total = len(teacher.down_depths[i])
        by_drop = total - sum(f"down_blocks.{i}.resnets.{j}" in dropped for j in range(total))
        n = by_drop if want is None else want[i]
        if want is not None and by_drop != total and by_drop != n:
            raise UserError(
                f"blocks.remove: drop leaves down_blocks.{i} {by_drop} layers but "
                f"layers_per_block asks for {n}; make them agree or give one of the two"
            )
        if not 1 <= n <= total:
            raise UserError(
                f"blocks.remove: down_blocks.{i} can keep 1 to {total} layers (the teacher's "
                f"count), not {n}"
            )
        out.append(n)
    return tuple(out)


def _block_plan(
    kind: str,
    student: int,
    teacher_index: int,
    depths: tuple[int, ...],
    n_layers: int,
    dropped: set[str],
    s: Settings,
    depth_key: str,
    depth_index: int,
) -> BlockPlan:
    name = f"{kind}.{teacher_index}"
    total = len(depths)
    if n_layers > total:
        raise UserError(
            f"blocks.remove: {kind}.{student} needs {n_layers} layers (diffusers gives an up "
            f"block one more than its down block) but the teacher's {name} has {total}"
        )
    has_attention = any(depths)
    for j in range(total):
        resnet, attention = f"{name}.resnets.{j}" in dropped, f"{name}.attentions.{j}" in dropped
        if has_attention and resnet != attention:
            gone, kept = ("resnets", "attentions") if resnet else ("attentions", "resnets")
            raise UserError(
                f"blocks.remove: drop removes {name}.{gone}.{j} but keeps {name}.{kept}.{j}; "
                "diffusers pairs every ResNet with a transformer, so drop both "
                f"(e.g. '{name}.*.{j}')"
            )
    named = [j for j in range(total) if f"{name}.resnets.{j}" not in dropped]
    if len(named) == n_layers:
        layers = tuple(named)
    elif len(named) == total:
        # Nothing named: drop trailing layers of a down block; in an up block keep the
        # last (its skip input comes from the previous stage, so its shapes differ) and
        # drop from the middle, as BK-SDM does.
        layers = tuple(range(n_layers))
        if kind == "up_blocks" and n_layers < total:
            layers = (*range(n_layers - 1), total - 1)
    else:
        raise UserError(
            f"blocks.remove: drop leaves {name} {len(named)} layers, but the student's "
            f"{kind}.{student} has {n_layers} (diffusers gives an up block one layer more than "
            "its down block); drop as many layers in the matching down and up blocks"
        )
    blocks: tuple[tuple[int, ...], ...] = ()
    if has_attention:
        wanted = _wanted_depths(s, depth_key, depth_index, len(layers), kind, student)
        blocks = tuple(
            _transformer_blocks(f"{name}.attentions.{t}", depths[t], wanted[j], dropped, s.keep)
            for j, t in enumerate(layers)
        )
    return BlockPlan(teacher=teacher_index, layers=layers, transformer_blocks=blocks)


def _wanted_depths(
    s: Settings, key: str, index: int, n_layers: int, kind: str, student: int
) -> tuple[Depth | None, ...]:
    table = getattr(s, key)
    if table is None:
        return (None,) * n_layers
    entry = table[index]
    if not isinstance(entry, tuple):
        return (entry,) * n_layers
    if len(entry) != n_layers:
        raise UserError(
            f"blocks.remove: {key}[{index}] lists {len(entry)} depths but the student's "
            f"{kind}.{student} has {n_layers} layers; give one per layer"
        )
    return tuple(entry)


def _transformer_blocks(
    name: str, total: int, wanted: Depth | None, dropped: set[str], keep: str
) -> tuple[int, ...]:
    if isinstance(wanted, Fraction):
        wanted = max(1, math.floor(wanted * total + Fraction(1, 2)))
    named = tuple(k for k in range(total) if f"{name}.transformer_blocks.{k}" not in dropped)
    n = len(named) if wanted is None else wanted
    if wanted is not None and len(named) not in (total, n):
        raise UserError(
            f"blocks.remove: drop leaves {name} {len(named)} transformer blocks but the depths "
            f"ask for {n}; make them agree or give one of the two"
        )
    if not 1 <= n <= total:
        raise UserError(
            f"blocks.remove: {name} can keep 1 to {total} transformer blocks (the teacher's "
            f"depth), not {n}; depths can only shrink"
        )
    return named if len(named) == n else pick_layers(total, n, keep)


def _mid_mode(teacher: Structure, s: Settings, dropped: set[str]) -> MidMode:
    by_drop: MidMode = teacher.mid
    if "mid_block" in dropped:
        by_drop = "none"
    else:
        attention = "mid_block.attentions.0" in dropped
        resnet = "mid_block.resnets.1" in dropped
        if attention != resnet:
            raise UserError(
                "blocks.remove: diffusers' mid-block without attention (UNetMidBlock2D) has one "
                "ResNet; drop mid_block.attentions.0 and mid_block.resnets.1 together, or set "
                "mid: resnet_only"
            )
        if attention:
            by_drop = "resnet_only"
    mode = s.mid if s.mid is not None else by_drop
    if s.mid is not None and by_drop != teacher.mid and by_drop != s.mid:
        raise UserError(f"blocks.remove: drop makes the mid-block {by_drop} but mid says {s.mid}")
    if _MID_RANK[mode] > _MID_RANK[teacher.mid]:
        raise UserError(
            f"blocks.remove: mid: {mode} needs a mid-block the teacher does not have "
            f"(its mid-block is {teacher.mid}); use mid: {teacher.mid} or less"
        )
    return mode


def _mid_blocks(
    teacher: Structure, s: Settings, dropped: set[str], deepest: BlockPlan
) -> tuple[int, ...]:
    if teacher.mid_depth == 0:
        return ()
    name = "mid_block.attentions.0"
    named = tuple(
        k for k in range(teacher.mid_depth) if f"{name}.transformer_blocks.{k}" not in dropped
    )
    if not deepest.depths:
        # The deepest down block has no transformers (SD1.x): its config entry only feeds
        # the mid-block, so the mid depth is free.
        return named
    # diffusers builds the mid transformer with transformer_layers_per_block[-1], i.e. the
    # deepest down block's first-layer depth (KOALA-1B: 10 -> 6 there and in the mid).
    n = deepest.depths[0]
    if len(named) not in (teacher.mid_depth, n):
        raise UserError(
            f"blocks.remove: drop leaves {name} {len(named)} transformer blocks, but diffusers "
            f"gives the mid-block the depth of the deepest down block's first layer ({n})"
        )
    if n > teacher.mid_depth:
        raise UserError(
            f"blocks.remove: the mid-block would need depth {n} (diffusers takes the deepest "
            f"down block's), more than the teacher's {teacher.mid_depth}; cut that depth or "
            "set mid: resnet_only"
        )
    return named if len(named) == n else pick_layers(teacher.mid_depth, n, s.keep)
