"""The toy world behind `toy:shapes`: a procedural captioned dataset of coloured shapes.

    >>> from slimdiff.toy import ShapesDataset
    >>> image, text = ShapesDataset(seed=0)[0]
    >>> image.shape
    (64, 64, 3)

Held-out prompts (never generated for training) measure prompt following: see `heldout`.
"""

from slimdiff.toy.dataset import ShapesDataset
from slimdiff.toy.heldout import HELDOUT_PROMPTS, heldout_prompts, is_heldout
from slimdiff.toy.render import render, shape_mask
from slimdiff.toy.scenes import (
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    caption,
    parse_prompt,
    sample_scene,
)

__all__ = [
    "COLOURS",
    "HELDOUT_PROMPTS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "Obj",
    "Scene",
    "ShapesDataset",
    "caption",
    "heldout_prompts",
    "is_heldout",
    "parse_prompt",
    "render",
    "sample_scene",
    "shape_mask",
]
