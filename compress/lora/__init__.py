"""`lora.fuse`: merge LoRA files into the model's weights (compress/lora/fuse.py)."""

from slimdiff.compress.lora.fuse import FuseLoraPass

__all__ = ["FuseLoraPass"]
