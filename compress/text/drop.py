"""`text.drop`: remove text encoders the family's pipeline runs without (SD3's T5).

    - pass: text.drop
      encoders: [text_encoder_3]     # the default

The bundle then has no graph for them; the runtime feeds zeros in their place, as diffusers'
StableDiffusion3Pipeline does with `text_encoder_3=None` (slimdiff/models/text_encoders.py).
A components pass: it runs before calibration records the teacher, so the passes after it
(distillation, EcoDiff, QuEST) learn from the pipeline as it will be deployed, and
`slimdiff compress` does not load the encoders at all. No edit is recorded: the artifact's
model_index.json says [null, null] for them, which slimdiff's loaders read.
"""

from __future__ import annotations

from typing import Annotated, Any

import pydantic
from slimdiff.compress.base import Pass, PassConfig, PassReport, Stage, register_pass

from slimdiff.models.families import arch_of_pipeline
from slimdiff.models.text_encoders import check_droppable, drop_text_encoders

__all__ = ["DropTextPass"]

EncoderName = Annotated[str, pydantic.Field(pattern=r"^text_encoder(_[0-9])?$")]


class DropTextConfig(PassConfig):
    encoders: Annotated[tuple[EncoderName, ...], pydantic.Field(min_length=1, max_length=3)] = (
        "text_encoder_3",
    )


@register_pass
class DropTextPass(Pass):
    """Drop text encoders (and their tokenizers) from the pipeline.

    Example:
        >>> report = DropTextPass().apply(load_model("tiny:sd3").pipe, None)  # doctest: +SKIP
        >>> report.summary["dropped"]                                        # doctest: +SKIP
        ['text_encoder_3']
    """

    name = "text.drop"
    stage = Stage.COMPONENTS
    Config = DropTextConfig

    def dropped_components(self) -> tuple[str, ...]:
        return tuple(self.config.encoders)

    def preflight(self, pipe: Any, calib: Any | None) -> None:
        check_droppable(_arch(pipe), self.config.encoders)

    def apply(self, pipe: Any, calib: Any | None) -> PassReport:
        removed = drop_text_encoders(pipe, _arch(pipe), self.config.encoders)
        return PassReport(
            self.name,
            summary={
                "dropped": list(removed),
                # 0 for an encoder the loader already skipped (slimdiff compress does)
                "params_removed": sum(removed.values()),
            },
        )


def _arch(pipe: Any):
    return arch_of_pipeline(pipe)
