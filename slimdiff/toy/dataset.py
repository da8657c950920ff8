"""`ShapesDataset`: captioned toy images, deterministic by (seed, index), made on the fly."""

from __future__ import annotations

import numpy as np

from slimdiff.toy.heldout import is_heldout
from slimdiff.toy.render import render
from slimdiff.toy.scenes import Scene, caption, sample_scene

__all__ = ["ShapesDataset"]


class ShapesDataset:
    """Item `i` is (uint8 image (side, side, 3), caption); the same for the same seed.

    Held-out scenes (see `slimdiff.toy.heldout`) are never produced unless
    `include_heldout=True`, so the held-out prompts measure generalisation. Captions name
    the object size with probability `size_word_prob`.
    """

    def __init__(
        self,
        seed: int = 0,
        length: int = 1_000_000,
        side: int = 64,
        two_prob: float = 0.5,
        size_word_prob: float = 0.5,
        include_heldout: bool = False,
    ):
        self.seed, self.length, self.side = seed, length, side
        self.two_prob, self.size_word_prob = two_prob, size_word_prob
        self.include_heldout = include_heldout

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> tuple[Scene, np.random.Generator]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        while True:
            scene = sample_scene(rng, self.two_prob)
            if self.include_heldout or not is_heldout(scene):
                return scene, rng

    def __getitem__(self, index: int) -> tuple[np.ndarray, str]:
        scene, rng = self.scene(index)
        text = caption(scene, with_size=bool(rng.random() < self.size_word_prob))
        return render(scene, rng, self.side), text
