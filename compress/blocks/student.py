"""Build the student UNet from diffusers' own config and copy the teacher's kept weights.

The student is `UNet2DConditionModel.from_config(config)`, so its saved config.json alone
rebuilds it: plain `from_pretrained` loads the artifact. Weights come from an explicit
student -> teacher module mapping (`module_mapping`), e.g. for BK-SDM-Tiny

    up_blocks.0.resnets.1                      <- up_blocks.1.resnets.2
    down_blocks.2.attentions.0.transformer_blocks.3  <- ...transformer_blocks.3

and every student tensor is a copy of exactly one teacher tensor (checked by shape).
"""

from __future__ import annotations

from typing import Any

import torch
from slimdiff.compress.blocks.plan import BlockPlan, Plan, read_structure

from slimdiff.errors import UserError

__all__ = ["build_student", "module_mapping", "removed_modules", "student_config"]

_MID_TYPE = {"keep": "UNetMidBlock2DCrossAttn", "resnet_only": "UNetMidBlock2D", "none": None}
# Per-stage config lists in down order (truncated when inner stages go); up_block_types is
# in up order.
_PER_STAGE = (
    "block_out_channels",
    "down_block_types",
    "attention_head_dim",
    "num_attention_heads",
    "cross_attention_dim",
    "only_cross_attention",
)


def student_config(teacher_config: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """The teacher's config with the plan's structure: layers, depths, mid-block, stages."""
    cfg = {k: v for k, v in dict(teacher_config).items() if not k.startswith("_")}
    kept, k = len(plan.down), plan.drop_stages
    if k:
        for key in _PER_STAGE:
            if isinstance(cfg.get(key), (list, tuple)):
                cfg[key] = list(cfg[key])[:kept]
        cfg["up_block_types"] = list(cfg["up_block_types"])[k:]
    lpb = plan.layers_per_block
    if lpb != _as_tuple(teacher_config["layers_per_block"], plan.teacher.stages)[:kept]:
        cfg["layers_per_block"] = lpb[0] if len(set(lpb)) == 1 else list(lpb)
    elif k and isinstance(cfg["layers_per_block"], (list, tuple)):
        cfg["layers_per_block"] = list(cfg["layers_per_block"])[:kept]
    cfg["mid_block_type"] = _MID_TYPE[plan.mid]
    depths = teacher_config["transformer_layers_per_block"]
    flat = not isinstance(depths, (list, tuple)) or all(isinstance(d, int) for d in depths)
    if _depths_unchanged(plan) and flat and not cfg.get("reverse_transformer_layers_per_block"):
        # BK-SDM: leave the key as the teacher wrote it (truncated when stages go).
        if isinstance(depths, (list, tuple)):
            cfg["transformer_layers_per_block"] = list(depths)[:kept]
        return cfg
    down, up = _depth_lists(plan)
    flat_depths = _symmetric(plan, down, up)
    if flat_depths is not None:
        cfg["transformer_layers_per_block"] = flat_depths
        cfg["reverse_transformer_layers_per_block"] = None
    else:  # an asymmetric UNet (SSD-1B): nested lists plus the reverse key (diffusers #5400)
        cfg["transformer_layers_per_block"] = [list(d) for d in down]
        cfg["reverse_transformer_layers_per_block"] = [list(u) for u in up]
    return cfg


def _as_tuple(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


def _depths_unchanged(plan: Plan) -> bool:
    t = plan.teacher
    for blocks, teacher_depths in ((plan.down, t.down_depths), (plan.up, t.up_depths)):
        for b in blocks:
            source = tuple(teacher_depths[b.teacher][j] for j in b.layers)
            if b.transformer_blocks and b.depths != source:
                return False
    return plan.mid != "keep" or len(plan.mid_blocks) == t.mid_depth


def _depth_lists(plan: Plan) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
    """Per block, per layer depths as diffusers' config writes them: attention-free blocks
    take 1, except the deepest down block, whose entry feeds the mid-block's depth."""

    def lists(blocks: tuple[BlockPlan, ...], deepest: int | None):
        out = []
        for i, b in enumerate(blocks):
            if b.transformer_blocks:
                out.append(b.depths)
            else:
                fill = len(plan.mid_blocks) if i == deepest and plan.mid_blocks else 1
                out.append((fill,) * len(b.layers))
        return tuple(out)

    return lists(plan.down, len(plan.down) - 1), lists(plan.up, None)


def _symmetric(plan: Plan, down, up) -> list[int] | None:
    """A flat per-block list (SDXL's [1, 2, 10]) when every block is uniform and each up
    block mirrors its down block, else None (nested lists plus the reverse key)."""
    flat = []
    for i, d in enumerate(down):
        mirror = len(down) - 1 - i
        u = up[mirror]
        if len(set(d)) != 1:
            return None
        if plan.up[mirror].transformer_blocks and (len(set(u)) != 1 or u[0] != d[0]):
            return None
        flat.append(d[0])
    return flat


# ----------------------------------------------------------------------------- mapping


def module_mapping(plan: Plan, top_level: list[str]) -> dict[str, str]:
    """Student module name -> teacher module name for every module the student copies.

    `top_level` are the UNet's children outside the blocks (conv_in, time_embedding, ...),
    copied as they are. A more specific entry wins (transformer_blocks inside attentions).
    """
    out = {name: name for name in top_level}

    def block(kind: str, i: int, b: BlockPlan, sampler: str, has_sampler: bool) -> None:
        s, t = f"{kind}.{i}", f"{kind}.{b.teacher}"
        for j, tj in enumerate(b.layers):
            out[f"{s}.resnets.{j}"] = f"{t}.resnets.{tj}"
            if b.transformer_blocks:
                out[f"{s}.attentions.{j}"] = f"{t}.attentions.{tj}"
                for n, tn in enumerate(b.transformer_blocks[j]):
                    out[f"{s}.attentions.{j}.transformer_blocks.{n}"] = (
                        f"{t}.attentions.{tj}.transformer_blocks.{tn}"
                    )
        if has_sampler:
            out[f"{s}.{sampler}"] = f"{t}.{sampler}"

    last = len(plan.down) - 1
    for i, b in enumerate(plan.down):
        block("down_blocks", i, b, "downsamplers", i < last)
    for i, b in enumerate(plan.up):
        block("up_blocks", i, b, "upsamplers", i < last)
    if plan.mid != "none":
        out["mid_block.resnets.0"] = "mid_block.resnets.0"
    if plan.mid == "keep":
        out["mid_block.resnets.1"] = "mid_block.resnets.1"
        if plan.mid_blocks:
            out["mid_block.attentions.0"] = "mid_block.attentions.0"
            for n, tn in enumerate(plan.mid_blocks):
                out[f"mid_block.attentions.0.transformer_blocks.{n}"] = (
                    f"mid_block.attentions.0.transformer_blocks.{tn}"
                )
    return out


def teacher_key(mapping: dict[str, str], key: str) -> str:
    """The teacher state_dict key a student key copies: the longest mapped module prefix."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in mapping:
            return ".".join([mapping[prefix], *parts[cut:]])
    raise KeyError(key)


def removed_modules(teacher: torch.nn.Module, mapping: dict[str, str]) -> list[str]:
    """Teacher modules the student does not copy, outermost first: a removed stage is listed
    once ("down_blocks.3"), a list by its members ("mid_block.attentions.0")."""
    kept = set(mapping.values())
    ancestors = {".".join(v.split(".")[:i]) for v in kept for i in range(1, v.count(".") + 1)}

    def covered(name: str) -> bool:
        parts, hit = name.split("."), False
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            # A kept attention does not keep all its transformer blocks: each is mapped.
            if i >= 2 and parts[i - 2] == "transformer_blocks" and prefix not in kept:
                return False
            hit = hit or prefix in kept
        return hit

    out: list[str] = []

    def visit(prefix: str, module: torch.nn.Module) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if name in ancestors:  # holds kept modules, maybe removed ones too
                visit(name, child)
            elif covered(name):
                continue
            elif isinstance(child, torch.nn.ModuleList):
                visit(name, child)
            else:
                out.append(name)

    visit("", teacher)
    return out


# ----------------------------------------------------------------------------- build


def build_student(teacher: torch.nn.Module, plan: Plan) -> tuple[torch.nn.Module, dict[str, str]]:
    """The student UNet, on the teacher's device and dtype, with the teacher's kept weights.

    Built on the meta device (no random init), then every tensor is assigned a copy of its
    teacher tensor; on a meta teacher nothing is allocated at all.
    """
    from diffusers import UNet2DConditionModel

    config = student_config(teacher.config, plan)
    with torch.device("meta"):
        student = UNet2DConditionModel.from_config(config)
    got = read_structure(student)
    if got != plan.student_structure():  # diffusers disagrees with the plan: a slimdiff bug
        raise RuntimeError(f"student structure {got} differs from the plan {plan}")
    top_level = [n for n, _ in teacher.named_children() if n not in _BLOCKS]
    mapping = module_mapping(plan, top_level)
    source = teacher.state_dict()
    weights = {}
    for key, like in student.state_dict().items():
        tkey = teacher_key(mapping, key)
        value = source[tkey]
        if value.shape != like.shape:
            raise UserError(
                f"blocks.remove: the student's {key.rsplit('.', 1)[0]} {tuple(like.shape)} cannot "
                f"start from the teacher's {tkey.rsplit('.', 1)[0]} {tuple(value.shape)}; keep "
                "the last layer of each up block (its skip input has another width)"
            )
        weights[key] = value.detach().clone()
    student.load_state_dict(weights, strict=True, assign=True)
    student.train(teacher.training)
    student.requires_grad_(any(p.requires_grad for p in teacher.parameters()))
    return student, mapping


_BLOCKS = ("down_blocks", "up_blocks", "mid_block")
