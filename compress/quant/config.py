"""`quant.quest`'s recipe keys: pure data (no torch), so validating a recipe stays light.

Example (YAML, a recipe's pass entry):

    - pass: quant.quest
      weights: int8            # int8 | int4: per output channel, symmetric
      activations: int8        # int8 | int4 | none: per tensor, learnable step sizes
      method: quest            # quest (selective finetuning) | minmax (plain PTQ)
      timestep_groups: 4       # activation step sizes per group of denoising steps
      init: mse                # mse | percentile | minmax: how activation ranges start
      keep_fp: ["**.attn2.to_k"]   # module globs left in float
      io_activations: none     # none | int8: the first/last layers' inputs (weights: 8 bit)
      lowrank: 0               # SVDQuant's low-rank branch rank for linear weights (0 = off)
      finetune:
        time_layers: true      # QuEST's time-embedding stage
        sensitive: 8           # then the 8 layers measured most sensitive to low bits
        epochs: 4
"""

from __future__ import annotations

from typing import Literal

import pydantic
from slimdiff.compress.base import PassConfig

__all__ = ["FinetuneConfig", "QuestConfig"]


class FinetuneConfig(PassConfig):
    """QuEST's selective finetuning (`qdiff/post_layer_recon_sd.py`), scaled to the model.

    Two stages against the full-precision denoiser on the calibration trajectories, each
    minimising MSE at the trained layers' outputs plus MSE at the denoiser's output:
    1. the time-embedding layers (ArchSpec.time_layers): weights, biases and their
       activation step sizes, lr `lr_time` (the paper: 1e-5 for both);
    2. the `sensitive` layers whose quantization alone moves the output most (measured,
       ranked in report.json), plus every activation step size but stage 1's: weights
       at `lr_weights` (1e-5), step sizes at `lr_scales` (1e-4).
    The paper trains for 200-400 epochs over 2 samples a timestep (stage 1) and 20 epochs
    over 64 (stage 2) on SD1.4; an epoch here is one pass over every calibration
    (prompt, step) pair, `batch` pairs a step.
    """

    time_layers: bool = True
    sensitive: int = pydantic.Field(8, ge=0)
    epochs_time: int = pydantic.Field(2, ge=0)
    epochs: int = pydantic.Field(4, ge=0)
    lr_time: float = pydantic.Field(1e-5, gt=0)
    lr_weights: float = pydantic.Field(1e-5, gt=0)
    lr_scales: float = pydantic.Field(1e-4, gt=0)
    batch: int = pydantic.Field(4, ge=1)
    out_weight: float = pydantic.Field(1.0, ge=0)
    layer_weight: float = pydantic.Field(1.0, ge=0)
    checkpoint_every: int = pydantic.Field(25, ge=1)  # optimizer steps
    seed: int = pydantic.Field(0, ge=0)


class QuestConfig(PassConfig):
    """The pass's keys; the defaults are QuEST's W8A8 SD settings where they carry over."""

    weights: Literal["int8", "int4"] = "int8"
    activations: Literal["int8", "int4", "none"] = "int8"
    method: Literal["quest", "minmax"] = "quest"
    # Activation step sizes per group of denoising steps (QuEST: one per calibration
    # timestep, `TimewiseUniformQuantizer`); 1 = one scale for every step.
    timestep_groups: int = pydantic.Field(1, ge=1, le=64)
    # How activation ranges start: mse (QuEST: the percentile clip among 0.999, 0.9999,
    # 0.99999 and the full range with the least quantization MSE), percentile (0.9999), or
    # minmax (the observed range; what `method: minmax` always uses).
    init: Literal["mse", "percentile", "minmax"] = "mse"
    # Calibration samples for ranges and sensitivity: (prompt, step) pairs, all by default.
    calib_pairs: int | None = pydantic.Field(None, ge=1)
    keep_fp: tuple[str, ...] = ()
    # The first and last layers (ArchSpec.io_layers) keep 8-bit weights (QuEST); their inputs
    # are quantized to 8 bits only with `int8`. Default none: no backend runs them as
    # integer kernels (the last one's output is the model's, the first one's feeds float
    # ops: ORT's QLinearConv needs a quantized output, and ModelOpt leaves both in float),
    # so quantizing their inputs costs accuracy and buys nothing (measured on random:sd15
    # W8A8: 4.13% -> 2.77% output error with them float, docs/BENCHMARKS.md).
    io_activations: Literal["int8", "none"] = "none"
    # SVDQuant's rank-r branch for linear weights (smoothing then SVD, kept in float); 0: off.
    lowrank: int = pydantic.Field(0, ge=0, le=1024)
    smooth_alpha: float = pydantic.Field(0.5, ge=0, le=1)  # SVDQuant's migration strength
    finetune: FinetuneConfig = FinetuneConfig()
    # Checkpoints go here instead of the calibration work folder (see compress/runner.py).
    work_dir: str | None = None

    @property
    def range_init(self) -> str:
        """`init`, except for the minmax baseline, which is observed ranges by definition."""
        return "minmax" if self.method == "minmax" else self.init
