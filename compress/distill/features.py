"""Feature pairs for layer-level distillation, and the hooks that capture them.

Pairs come from the student -> teacher module mapping of blocks.remove
(compress/blocks/student.py): a student module is compared with the teacher module it was
initialised from, so a removed module has no pair. Three levels, after the papers (BK-SDM
arXiv 2305.15798, SSD-1B/Vega arXiv 2401.02677, KOALA arXiv 2312.04005):

- "block" (BK-SDM): each student down_blocks.i / up_blocks.i output against its teacher
  block's. Where the student's block lost its downsampler (BK-SDM-Tiny's down_blocks.2),
  the teacher's output is taken before its downsampler, at its last layer (BK-SDM hooks
  that layer's `proj_out`; we take the transformer's output, after its residual, so the
  pair compares the same quantity the student block returns).
- "sub_block" (SSD-1B, Vega; Segmind's `cast_hook(level="sub_block")`): every kept ResNet
  and Transformer2DModel in the down and up blocks, and the teacher's whole mid-block
  against the student's, whatever its type (Segmind's `middle_truncate`: SDXL's
  ResNet-transformer-ResNet against SSD-1B's single ResNet).
- "self_attn" (KOALA): the self-attention (attn1) output of every kept transformer block.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch

__all__ = ["capture", "feature_pairs"]

_BLOCK = re.compile(r"(down|up)_blocks\.\d+$")
_SUB_BLOCK = re.compile(r"(down|up)_blocks\.\d+\.(resnets|attentions)\.\d+$")
_TRANSFORMER_BLOCK = re.compile(r".*\.transformer_blocks\.\d+$")


def feature_pairs(
    mapping: dict[str, str], level: str, student: torch.nn.Module, teacher: torch.nn.Module
) -> list[tuple[str, str]]:
    """(student module, teacher module) names whose outputs are compared, in student order."""
    names = [n for n, _ in student.named_modules()]
    if level == "block":
        blocks = [s for s in names if _BLOCK.match(s)]
        pairs = [(s, _teacher_block(s, mapping, student, teacher)) for s in blocks]
    elif level == "sub_block":
        pairs = [(s, mapping[s]) for s in names if _SUB_BLOCK.match(s)]
        if student.mid_block is not None and teacher.mid_block is not None:
            pairs.append(("mid_block", "mid_block"))
    elif level == "self_attn":
        pairs = [
            (f"{s}.attn1", f"{mapping[s]}.attn1")
            for s in names
            if _TRANSFORMER_BLOCK.match(s) and s in mapping
        ]
    else:
        raise ValueError(f"unknown feature level {level!r}; use block, sub_block or self_attn")
    return pairs


def _teacher_block(
    name: str, mapping: dict[str, str], student: torch.nn.Module, teacher: torch.nn.Module
) -> str:
    # The block a student block copies: the parent of what its first ResNet copies.
    t = mapping[f"{name}.resnets.0"].rsplit(".", 2)[0]
    s_block, t_block = student.get_submodule(name), teacher.get_submodule(t)
    if getattr(s_block, "downsamplers", None) is None and getattr(t_block, "downsamplers", None):
        attentions = getattr(t_block, "attentions", None)
        kind, layers = ("attentions", attentions) if attentions else ("resnets", t_block.resnets)
        return f"{t}.{kind}.{len(layers) - 1}"
    return t


def _output(value) -> torch.Tensor:
    """The hidden states a module returns. Down blocks and Transformer2DModel (called with
    return_dict=False) return tuples whose first item is the features (a down block's
    second is its skip tensors, a tuple, left out). Joint DiT blocks return both streams
    (FLUX: (text, image)), and SD3's last block None for the text it drops: every top-level
    tensor counts, each flattened per sample and concatenated, so the MSE weighs every
    element once."""
    if isinstance(value, tuple):
        tensors = [v for v in value if isinstance(v, torch.Tensor)]
        if len(tensors) == 1:
            return tensors[0]
        return torch.cat([t.flatten(1) for t in tensors], dim=1)  # (B, ...) -> (B, N)
    return getattr(value, "sample", value)


@contextmanager
def capture(module: torch.nn.Module, names: list[str]):
    """Record the outputs of `module`'s submodules `names` while in the block.

    Example:
        with capture(unet, ["down_blocks.0", "up_blocks.1"]) as feats:
            unet(*args, **kwargs)
        feats["up_blocks.1"].shape    # (B, C, H, W)
    """
    feats: dict[str, torch.Tensor] = {}

    def hook(name):
        def store(_module, _args, output):
            feats[name] = _output(output)

        return store

    handles = [module.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        yield feats
    finally:
        for h in handles:
            h.remove()
