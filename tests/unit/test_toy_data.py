"""The toy dataset: determinism, the caption grammar, and the held-out split."""

from __future__ import annotations

import numpy as np
import pytest

from slimdiff.toy import (
    COLOURS,
    HELDOUT_PROMPTS,
    SHAPES,
    Obj,
    ShapesDataset,
    caption,
    heldout_prompts,
    is_heldout,
    parse_prompt,
    render,
    shape_mask,
)


def test_items_are_deterministic_by_seed_and_index():
    a, b, c = ShapesDataset(seed=3), ShapesDataset(seed=3), ShapesDataset(seed=4)
    image, text = a[17]
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    again, text_again = b[17]
    assert text == text_again and np.array_equal(image, again)
    assert not np.array_equal(image, c[17][0]) or text != c[17][1]
    assert not np.array_equal(image, a[18][0])


def test_index_out_of_range():
    with pytest.raises(IndexError):
        ShapesDataset(length=5)[5]


def test_captions_round_trip_through_the_parser():
    data = ShapesDataset(seed=0)
    for i in range(300):
        scene, _ = data.scene(i)
        assert parse_prompt(caption(scene, with_size=True)) == scene
        parsed = parse_prompt(caption(scene))
        assert [(o.shape, o.colour, o.position) for o in parsed] == [
            (o.shape, o.colour, o.position) for o in scene
        ]


def test_grammar_examples():
    scene = (Obj("circle", "red", "left"), Obj("square", "blue", "right"))
    assert caption(scene) == "a red circle on the left and a blue square on the right"
    assert caption((Obj("cross", "orange", "centre", "small"),), with_size=True) == (
        "a small orange cross in the centre"
    )
    assert caption((Obj("cross", "orange", "top"),)) == "an orange cross at the top"
    assert parse_prompt("A green triangle at the top.") == (Obj("triangle", "green", "top"),)
    assert parse_prompt("a blue square in the center")[0].position == "centre"


@pytest.mark.parametrize(
    "bad",
    [
        "a photo of a cat",
        "a pink circle on the left",  # colour outside the palette
        "a red star on the left",  # shape outside the set
        "a red circle somewhere",
        "a red circle on the left and a blue square on the right and a green cross at the top",
    ],
)
def test_parser_rejects_prompts_outside_the_grammar(bad):
    with pytest.raises(ValueError):
        parse_prompt(bad)


def test_two_object_scenes_use_distinct_colours_and_opposite_sides():
    data = ShapesDataset(seed=1, two_prob=1.0)
    for i in range(200):
        first, second = data.scene(i)[0]
        assert first.colour != second.colour
        assert {first.position, second.position} in ({"left", "right"}, {"top", "bottom"})


def test_heldout_set_is_fixed_and_never_drawn_for_training():
    assert len(HELDOUT_PROMPTS["single"]) == 24 and len(HELDOUT_PROMPTS["two"]) == 24
    assert len(set(heldout_prompts())) == 48
    # Every colour-shape pair is held out at exactly one position for single objects.
    pairs = {(o.colour, o.shape) for p in heldout_prompts("single") for o in parse_prompt(p)}
    assert len(pairs) == len(COLOURS) * len(SHAPES)
    for p in heldout_prompts():
        assert is_heldout(parse_prompt(p))
        assert is_heldout(parse_prompt(p)[::-1])  # either order is the same scene
    data = ShapesDataset(seed=0)
    assert not any(is_heldout(data.scene(i)[0]) for i in range(5000))
    assert (
        sum(
            is_heldout(ShapesDataset(seed=0, include_heldout=True).scene(i)[0]) for i in range(5000)
        )
        > 0
    )


def test_render_places_the_shape_and_keeps_the_background_pale():
    rng = np.random.default_rng(0)
    image = render((Obj("square", "blue", "left", "large"),), rng)
    rgb = image.astype(int)
    saturated = (rgb.max(-1) - rgb.min(-1)) > 100
    ys, xs = np.nonzero(saturated)
    assert 300 < saturated.sum() < 700  # a ~23 px square
    assert xs.mean() < 24 and 24 < ys.mean() < 40  # on the left, vertically centred
    corners = np.concatenate([rgb[:6, -6:], rgb[-6:, -6:]]).reshape(-1, 3)
    assert corners.min() > 170 and (corners.max(-1) - corners.min(-1)).max() < 40  # pale, grey


def test_shape_masks_have_the_expected_areas():
    side, extent = 64, 32.0
    areas = {s: shape_mask(s, 32, 32, extent, side).sum() for s in SHAPES}
    assert areas["circle"] == pytest.approx(np.pi * 16**2, rel=0.02)
    assert areas["square"] == pytest.approx((32 * 0.88) ** 2, rel=0.02)
    assert areas["triangle"] == pytest.approx(32 * 32 / 2, rel=0.03)
    assert areas["cross"] == pytest.approx(2 * 32 * 32 / 3 - (32 / 3) ** 2, rel=0.03)
    with pytest.raises(ValueError):
        shape_mask("star", 32, 32, extent, side)
