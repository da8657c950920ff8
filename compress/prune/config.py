"""`prune.ecodiff`'s recipe keys: pure data (no torch), so validating a recipe stays light.

Example (YAML, a recipe's pass entry):

    - pass: prune.ecodiff
      sparsity: 0.2          # fraction of the maskable parameters (heads, FFN neurons) to remove
      scope: global          # global: heads, then neurons, ranked over the model; local: per module
      method: ecodiff        # ecodiff (learned masks) | magnitude (weight norms: the baseline)
      iterations: 100        # optimizer steps of mask learning
      lr: 0.1                # head masks (and FFN masks unless ffn_lr is given)
      beta: 0.5              # weight of the sparsity penalty
      penalty: l1            # l1 | l1_bounded (EcoDiff's FLUX setting)
      mask: hard_concrete    # hard_concrete | sigmoid
      checkpointing: true    # time-step gradient checkpointing (memory flat in the steps)
      checkpoint_every: 10   # a resumable checkpoint every this many iterations
      recover:               # optional: layer-level distillation after slicing
        steps: 500
"""

from __future__ import annotations

from typing import Literal

import pydantic
from slimdiff.compress.base import PassConfig

__all__ = ["EcoDiffConfig", "RecoverConfig"]


class RecoverConfig(PassConfig):
    """EcoDiff's optional retraining, as slimdiff's layer-level distillation
    (compress/distill): the pruned denoiser learns the original's output and its block
    outputs (`ArchSpec.blocks`) on the teacher's calibration trajectories. The paper
    retrains with LoRA or full finetuning on images; this is the data-free equivalent."""

    steps: int = pydantic.Field(200, ge=1)
    lr: float = pydantic.Field(1e-4, gt=0)
    batch: int = pydantic.Field(4, ge=1)  # (prompt, step) pairs per iteration
    accumulate: int = pydantic.Field(1, ge=1)
    out_weight: float = pydantic.Field(1.0, ge=0)
    feat_weight: float = pydantic.Field(1.0, ge=0)
    checkpoint_every: int = pydantic.Field(50, ge=1)
    max_grad_norm: float | None = pydantic.Field(1.0, gt=0)
    seed: int = pydantic.Field(0, ge=0)


class EcoDiffConfig(PassConfig):
    """The pass's keys; the defaults are EcoDiff's SDXL settings (configs/sdxl.yaml)."""

    sparsity: float = pydantic.Field(0.2, ge=0.0, le=0.95)
    scope: Literal["global", "local"] = "global"
    method: Literal["ecodiff", "magnitude"] = "ecodiff"
    # Optimizer steps; each accumulates `prompts_per_iteration` trajectories (the paper:
    # batch 1, accumulate_grad_batches 4). Its SDXL run: 4 epochs of 100 prompts.
    iterations: int = pydantic.Field(100, ge=0)
    prompts_per_iteration: int = pydantic.Field(4, ge=1)
    lr: float = pydantic.Field(0.1, gt=0)  # the head masks'; the neurons' too unless ffn_lr
    ffn_lr: float | None = pydantic.Field(None, gt=0)  # FLUX's configs: heads 0.5, FFN 0.1
    beta: float = pydantic.Field(0.5, ge=0)
    # l1: ||λ||_1 / width per layer (EcoDiff's `reg: 1`); l1_bounded: of sigmoid(0.4 λ + 1)
    # instead of λ (its FLUX configs' `lambda_reg: true`).
    penalty: Literal["l1", "l1_bounded"] = "l1"
    mask: Literal["hard_concrete", "sigmoid"] = "hard_concrete"
    # None: the family's (ArchSpec.mask_init_logit, from EcoDiff's configs).
    init_logit: float | None = None
    checkpointing: bool = True
    checkpoint_every: int = pydantic.Field(10, ge=1)
    seed: int = pydantic.Field(0, ge=0)
    recover: RecoverConfig | None = None
    # Checkpoints go here instead of the calibration work folder (see compress/runner.py).
    work_dir: str | None = None
