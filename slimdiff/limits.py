"""The bounds of generation settings, one place for the recipe schema, the CLI and the runtime.

Standard library only (the torch-free runtime reads them). Seeds are what numpy's and
torch's generators both take; sides are pixels.
"""

from __future__ import annotations

__all__ = [
    "MAX_CONDITIONING_SIDE",
    "MAX_CONTROLNETS",
    "MAX_CONTROL_SCALE",
    "MAX_GUIDANCE",
    "MAX_IMAGES",
    "MAX_SEED",
    "MAX_SIDE",
    "MAX_STEPS",
    "MIN_SIDE",
]

MAX_STEPS = 1000
MIN_SIDE = 8
MAX_SIDE = 8192
# SDXL's size conditioning (original and target sizes, crop offsets): sizes the UNet is
# told about, not drawn, so larger than MAX_SIDE (camera originals)
MAX_CONDITIONING_SIDE = 16384
MAX_GUIDANCE = 100.0
MAX_CONTROLNETS = 4  # per bundle: each adds about 40% to a step (docs/BENCHMARKS.md)
MAX_CONTROL_SCALE = 10.0  # a ControlNet's conditioning scale (diffusers' default: 1)
MAX_SEED = 2**32 - 1
MAX_IMAGES = 64  # per call: one batch through the denoiser
