"""Layer-level distillation, shared by passes that recover a compressed denoiser.

`config` is pure data (the recipe's `distill:` section and the papers' defaults) and is
what importing this package loads; the trainer (`train.distill`) and the feature hooks
(`features`) import torch and are imported where they run.

    from slimdiff.compress.distill.train import distill
    from slimdiff.compress.distill.features import feature_pairs
"""

from slimdiff.compress.distill.config import (
    BK_SDM,
    KOALA,
    SEGMIND,
    DistillConfig,
    DistillSettings,
    Hooks,
)

__all__ = ["BK_SDM", "KOALA", "SEGMIND", "DistillConfig", "DistillSettings", "Hooks"]
