"""`prune.ecodiff`'s typed edits: which heads and neurons each pruned site keeps.

Pure data (pydantic, no torch), so registering the pass and validating a recipe stay
light; `slicing.restore` replays them on a component rebuilt from its saved config.
"""

from __future__ import annotations

from typing import Literal

import pydantic

from slimdiff.edits import Edit

__all__ = ["EDITS", "HeadsPruned", "NeuronsPruned"]


class _UnitsKept(Edit):
    module: str  # the site's name (AttentionSite.name / FFNSite.name)
    keep: list[int]  # kept unit indices, sorted, out of the site's units before the edit

    @pydantic.model_validator(mode="after")
    def _sorted_unique(self):
        if any(b <= a for a, b in zip(self.keep, self.keep[1:], strict=False)):
            raise ValueError("keep must be sorted, without repeats")
        if self.keep and self.keep[0] < 0:
            raise ValueError("keep holds unit indices, >= 0")
        return self


class HeadsPruned(_UnitsKept):
    """The attention at `module` keeps heads `keep` of its `heads`."""

    op: Literal["prune.ecodiff.heads"] = "prune.ecodiff.heads"
    heads: int


class NeuronsPruned(_UnitsKept):
    """The feed-forward block at `module` keeps hidden neurons `keep` of its `hidden`."""

    op: Literal["prune.ecodiff.neurons"] = "prune.ecodiff.neurons"
    hidden: int


EDITS = (HeadsPruned, NeuronsPruned)
