"""Distillation settings: the recipe's `distill:` section and the papers' defaults.

Pure data (no torch), so validating a recipe stays light.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import pydantic
from slimdiff.compress.base import PassConfig

from slimdiff.errors import UserError

__all__ = [
    "BK_SDM",
    "KOALA",
    "SEGMIND",
    "DistillConfig",
    "DistillSettings",
    "Hooks",
    "check_settings",
]

# Where feature losses are taken (compress/distill/features.py):
#   block      each down_blocks.i and up_blocks.i output (BK-SDM)
#   sub_block  every ResNet and Transformer2DModel output, and the mid-block (SSD-1B, Vega)
#   self_attn  every kept transformer block's self-attention (attn1) output (KOALA)
Hooks = Literal["block", "sub_block", "self_attn"]


@dataclass(frozen=True)
class DistillSettings:
    """Everything the trainer needs, resolved: the recipe's keys over a paper's defaults.

    The papers' learning rates (1e-5 to 5e-5) are for 50k-500k iterations at batch 128-256;
    the recipes write those schedules out for GPUs. `batch` 4 and `checkpoint_every` 100
    are CPU-sized defaults. At tiny/toy scale (hundreds of iterations on a CPU) use lr
    5e-5 and batch 4: measured on toy:shapes and tiny:sdxl, 1e-5 barely moves in 300
    iterations, 3e-4 overshoots (the output loss rises) and 1e-3 diverges
    (recipes/toy-shapes-ssd.yaml, tests/unit/compress/test_distill.py).
    """

    steps: int = 0
    lr: float = 1e-5
    batch: int = 4
    accumulate: int = 1
    out_weight: float = 1.0
    feat_weight: float = 1.0
    hooks: Hooks = "block"
    checkpoint_every: int = 100
    max_grad_norm: float | None = 1.0
    seed: int = 0
    # Exponential moving average of the student's weights (diffusers' EMAModel, with its
    # (1 + n) / (10 + n) warm-up), copied into the student at the end; 0: none.
    ema_decay: float = 0.0
    source: str = ""  # whose defaults these are, for the report


# The papers' loss weights, feature positions and learning rates (full size, batch 128-256).
# The task loss (MSE against the true noise) needs training images; data-free distillation
# on teacher trajectories has none, so its weight is 0 here even where the paper used 1.
BK_SDM = DistillSettings(
    lr=5e-5,  # constant, AdamW, batch 256 (64 x 4 accumulation), 50k iterations
    out_weight=1.0,
    feat_weight=1.0,
    hooks="block",
    # scripts/kd_train.sh passes --use_ema: EMAModel(decay 0.9999) over the student, and
    # kd_train_text_to_image.py saves the EMA weights (ema_unet.copy_to) as the result
    ema_decay=0.9999,
    source="BK-SDM (arXiv 2305.15798): out 1, feat 1 at block outputs, lr 5e-5, EMA 0.9999",
)
SEGMIND = DistillSettings(
    lr=1e-5,  # batch 32 x 4 accumulation, 251k steps at 1024 px (SSD-1B)
    out_weight=0.5,
    feat_weight=0.5,
    hooks="sub_block",
    source="SSD-1B/Vega (arXiv 2401.02677): out 0.5, feat 0.5 at every ResNet and "
    "transformer output, lr 1e-5",
)  # no EMA: segmind/distill-sd's distill_training.py offers --use_ema, off by default
# KOALA released no training code (youngwanLEE/sdxl-koala is inference only). The paper's
# finding is that feature distillation at self-attention outputs helps most; which layers
# exactly is not published, so every kept transformer block's attn1 is used. Weights as
# BK-SDM, whose objective the paper builds on; lr 1e-5 (from the paper, unverified).
KOALA = DistillSettings(
    lr=1e-5,
    out_weight=1.0,
    feat_weight=1.0,
    hooks="self_attn",
    source="KOALA (arXiv 2312.04005): feature KD at self-attention outputs (no code released)",
)


class DistillConfig(PassConfig):
    """The recipe's `distill:` section; a key left out takes the preset's paper default.

    Example (YAML, inside a blocks.remove entry):

        distill:
          steps: 300          # 0: no distillation (the student as initialised)
          lr: 5.0e-5
          batch: 4            # (prompt, step) pairs per iteration, each a CFG batch
          hooks: sub_block    # block | sub_block | self_attn
          checkpoint_every: 50
          ema_decay: 0.9999   # average the student's weights (BK-SDM's default); 0: off
    """

    steps: int = pydantic.Field(0, ge=0)
    lr: float | None = pydantic.Field(None, gt=0)
    batch: int | None = pydantic.Field(None, ge=1)
    # Gradient accumulation: the batch runs in this many chunks (the papers' batches of
    # 128-256 do not fit one GPU at 1024 px); results equal one big batch up to rounding.
    accumulate: int = pydantic.Field(1, ge=1)
    out_weight: float | None = pydantic.Field(None, ge=0)
    feat_weight: float | None = pydantic.Field(None, ge=0)
    task_weight: float = pydantic.Field(0.0, ge=0)
    hooks: Hooks | None = None
    checkpoint_every: int | None = pydantic.Field(None, ge=1)
    max_grad_norm: float | None = pydantic.Field(1.0, gt=0)  # None: no clipping
    seed: int = pydantic.Field(0, ge=0)  # draws the (prompt, step) pairs of each iteration
    ema_decay: float | None = pydantic.Field(None, ge=0, lt=1)  # 0: no EMA; None: preset's
    # Checkpoints go here instead of the calibration work folder (see compress/runner.py).
    work_dir: str | None = None

    @pydantic.field_validator("task_weight")
    @classmethod
    def _no_task_loss_without_images(cls, weight: float) -> float:
        if weight > 0:
            raise ValueError(
                "task_weight needs training images and their true noise; distillation here is "
                "data-free (teacher trajectories, which have no true noise): set task_weight: 0"
            )
        return weight

    def resolve(self, defaults: DistillSettings) -> DistillSettings:
        """These keys over `defaults` (a paper's)."""
        given = {
            k: getattr(self, k)
            for k in (
                "lr",
                "batch",
                "out_weight",
                "feat_weight",
                "hooks",
                "checkpoint_every",
                "ema_decay",
            )
            if getattr(self, k) is not None
        }
        return replace(
            defaults,
            steps=self.steps,
            accumulate=self.accumulate,
            max_grad_norm=self.max_grad_norm,
            seed=self.seed,
            **given,
        )


def check_settings(settings: DistillSettings) -> None:
    """UserError for settings a run cannot take (checked before any trajectory is recorded)."""
    if settings.accumulate > settings.batch:
        raise UserError(
            f"distill.accumulate ({settings.accumulate}) splits a batch of {settings.batch} "
            "pairs; it can be at most the batch"
        )
