"""EcoDiff pruning (`prune.ecodiff`): learned head and neuron masks over whole trajectories,
then a smaller dense model (arXiv 2412.02852).

Importing this package registers the pass; torch loads only where it runs. `units` (what
is masked) is shared by the mask learning (masks, train) and the hard pruning (slicing).
"""

from slimdiff.compress.prune.config import EcoDiffConfig, RecoverConfig
from slimdiff.compress.prune.ecodiff import EcoDiffPass

__all__ = ["EcoDiffConfig", "EcoDiffPass", "RecoverConfig"]
