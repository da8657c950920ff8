"""Block removal (`blocks.remove`): BK-SDM, SSD-1B, Segmind-Vega and KOALA students.

Importing this package registers the pass. Torch and diffusers load only when it runs.
"""

from slimdiff.compress.blocks.presets import PRESETS, Preset
from slimdiff.compress.blocks.remove import RemoveBlocksConfig, RemoveBlocksPass

__all__ = ["PRESETS", "Preset", "RemoveBlocksConfig", "RemoveBlocksPass"]
