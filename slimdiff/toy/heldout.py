"""The fixed held-out prompt set: scenes `ShapesDataset` never draws for training."""

from __future__ import annotations

from functools import cache

from slimdiff.toy.scenes import Scene, parse_prompt

__all__ = ["HELDOUT_PROMPTS", "heldout_prompts", "is_heldout"]

# One position held out for each of the 24 colour-shape pairs (every pair is still seen at
# the other four positions), and 24 two-object scenes drawn once with numpy seed 2026.
HELDOUT_PROMPTS: dict[str, tuple[str, ...]] = {
    "single": (
        "a red circle on the left",
        "an orange circle on the right",
        "a yellow circle at the top",
        "a green circle at the bottom",
        "a blue circle in the centre",
        "a purple circle on the left",
        "a red square on the right",
        "an orange square at the top",
        "a yellow square at the bottom",
        "a green square in the centre",
        "a blue square on the left",
        "a purple square on the right",
        "a red triangle at the top",
        "an orange triangle at the bottom",
        "a yellow triangle in the centre",
        "a green triangle on the left",
        "a blue triangle on the right",
        "a purple triangle at the top",
        "a red cross at the bottom",
        "an orange cross in the centre",
        "a yellow cross on the left",
        "a green cross on the right",
        "a blue cross at the top",
        "a purple cross at the bottom",
    ),
    "two": (
        "a green square on the right and a red circle on the left",
        "an orange triangle at the bottom and a blue cross at the top",
        "a green square on the right and a blue circle on the left",
        "a blue triangle at the top and an orange cross at the bottom",
        "a green square on the left and a blue square on the right",
        "a red cross at the bottom and an orange triangle at the top",
        "an orange circle on the right and a green square on the left",
        "a red square at the bottom and a yellow triangle at the top",
        "a green circle on the right and an orange cross on the left",
        "a blue circle at the top and a green square at the bottom",
        "a green square on the left and a purple square on the right",
        "a blue square at the bottom and a yellow square at the top",
        "a blue circle on the right and a red triangle on the left",
        "a green circle at the top and a yellow triangle at the bottom",
        "a green square on the left and a yellow square on the right",
        "a purple circle at the bottom and a yellow triangle at the top",
        "a blue circle on the left and a yellow circle on the right",
        "a blue triangle at the top and a green square at the bottom",
        "a purple cross on the right and a red square on the left",
        "a red triangle at the bottom and a blue square at the top",
        "a yellow cross on the left and a green triangle on the right",
        "a blue square at the top and a purple circle at the bottom",
        "a red square on the left and an orange cross on the right",
        "a red circle at the top and an orange circle at the bottom",
    ),
}


def heldout_prompts(kind: str = "all") -> list[str]:
    """The held-out prompts: "single", "two" (objects) or "all"."""
    if kind == "all":
        return [*HELDOUT_PROMPTS["single"], *HELDOUT_PROMPTS["two"]]
    return list(HELDOUT_PROMPTS[kind])


def _key(scene: Scene) -> frozenset:
    # Size is not part of a held-out prompt, and "A and B" is the same scene as "B and A".
    return frozenset((o.shape, o.colour, o.position) for o in scene)


@cache
def _heldout_keys() -> frozenset:
    return frozenset(_key(parse_prompt(p)) for p in heldout_prompts())


def is_heldout(scene: Scene) -> bool:
    """True when `scene` is what a held-out prompt asks for (any size, either order)."""
    return _key(scene) in _heldout_keys()
