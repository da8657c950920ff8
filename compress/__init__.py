"""Compression passes and the runner that applies a recipe's passes to a pipeline.

Built-in passes are imported here, explicitly, so they register themselves once:
dropping text encoders (`text.drop`), fusing LoRAs (`lora.fuse`), swapping the VAE
(`vae.replace`), block removal (`blocks.remove`), EcoDiff pruning (`prune.ecodiff`) and
QuEST quantization (`quant.quest`) land in their own subpackages.
"""

# Built-in passes, imported once so they register (keep this list explicit).
from slimdiff.compress import (
    blocks,  # noqa: F401  (blocks.remove)
    lora,  # noqa: F401  (lora.fuse)
    prune,  # noqa: F401  (prune.ecodiff)
    quant,  # noqa: F401  (quant.quest)
    text,  # noqa: F401  (text.drop)
    vae,  # noqa: F401  (vae.replace)
)
from slimdiff.compress.base import (
    Pass,
    PassConfig,
    PassReport,
    Stage,
    build_passes,
    get_pass,
    register_pass,
    registered_passes,
    unregister_pass,
)

__all__ = [
    "Pass",
    "PassConfig",
    "PassReport",
    "Stage",
    "build_passes",
    "get_pass",
    "register_pass",
    "registered_passes",
    "unregister_pass",
]
