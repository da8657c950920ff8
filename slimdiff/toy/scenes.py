"""The toy world: scenes of one or two coloured shapes, and the caption grammar.

A scene is a tuple of objects (shape, colour, position, size). Captions follow one small
grammar ("a red circle on the left and a blue square on the right"), and `parse_prompt`
inverts it, so the judge knows what each prompt asks for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

__all__ = [
    "COLOURS",
    "PAIRS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "Obj",
    "Scene",
    "caption",
    "parse_prompt",
    "sample_scene",
]

SHAPES = ("circle", "square", "triangle", "cross")
# RGB; far apart in hue so a colour segmentation separates them, all saturated, while
# backgrounds are pale and grey-ish.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (235, 215, 25),
    "green": (35, 165, 55),
    "blue": (35, 80, 225),
    "purple": (140, 50, 200),
}
# Object centres as fractions of the image side (x, y).
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "centre": (0.5, 0.5),
}
# Object extent as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.25, "large": 0.4}
# Two-object scenes put the objects at opposite sides.
PAIRS = (("left", "right"), ("top", "bottom"))

_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
_PHRASE_TO_POS = {v: k for k, v in _PHRASE.items()} | {"in the center": "centre"}


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    position: str
    size: str = "large"

    def phrase(self, with_size: bool = False) -> str:
        words = f"{self.size} {self.colour}" if with_size else self.colour
        article = "an" if words[0] in "aeiou" else "a"
        return f"{article} {words} {self.shape} {_PHRASE[self.position]}"


Scene = tuple[Obj, ...]


def caption(scene: Scene, with_size: bool = False) -> str:
    """The grammar's caption of `scene`, e.g. "a red circle on the left and a blue ..."."""
    return " and ".join(obj.phrase(with_size) for obj in scene)


_OBJ_RE = re.compile(
    r"^an? (?:(?P<size>small|large) )?(?P<colour>\w+) (?P<shape>\w+) (?P<where>.+)$"
)


def parse_prompt(prompt: str) -> Scene:
    """Invert `caption`: the objects a prompt asks for (size left as "large" when unsaid).

    Raises ValueError for prompts outside the grammar.
    """
    objs = []
    for part in prompt.strip().lower().rstrip(".").split(" and "):
        m = _OBJ_RE.match(part.strip())
        if not m or m["colour"] not in COLOURS or m["shape"] not in SHAPES:
            raise ValueError(f"not a toy:shapes prompt: {prompt!r}")
        where = _PHRASE_TO_POS.get(m["where"])
        if where is None:
            raise ValueError(f"unknown position {m['where']!r} in {prompt!r}")
        objs.append(Obj(m["shape"], m["colour"], where, m["size"] or "large"))
    if not 1 <= len(objs) <= 2:
        raise ValueError(f"toy:shapes prompts name one or two objects: {prompt!r}")
    return tuple(objs)


def sample_scene(rng: np.random.Generator, two_prob: float = 0.5) -> Scene:
    """A random scene: one object anywhere, or two at opposite sides (distinct colours)."""

    def obj(position: str, exclude_colour: str | None = None) -> Obj:
        colours = [c for c in COLOURS if c != exclude_colour]
        return Obj(
            SHAPES[rng.integers(len(SHAPES))],
            colours[rng.integers(len(colours))],
            position,
            tuple(SIZES)[rng.integers(len(SIZES))],
        )

    if rng.random() >= two_prob:
        return (obj(tuple(POSITIONS)[rng.integers(len(POSITIONS))]),)
    pair = PAIRS[rng.integers(len(PAIRS))]
    if rng.random() < 0.5:
        pair = pair[::-1]
    first = obj(pair[0])
    return (first, obj(pair[1], exclude_colour=first.colour))
