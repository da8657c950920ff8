"""The toy:shapes judge: right on real renders, wrong on noise and on mismatched scenes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from slimdiff.metrics import Detection, Verdict, detect, judge, prompt_accuracy
from slimdiff.metrics.shapes import WEIGHTS, colour_labels
from slimdiff.toy import (
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Obj,
    heldout_prompts,
    parse_prompt,
    shape_mask,
)
from slimdiff.toy import render as render_scene

OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "centre": "left"}


def _render(scene: tuple[Obj, ...], rng: np.random.Generator) -> np.ndarray:
    return render_scene(scene, rng, 64)


def _heldout_scenes(seed: int, per_prompt: int = 4):
    """(prompt, scene with random sizes, rng) for every held-out prompt, per_prompt times."""
    rng = np.random.default_rng(seed)
    for prompt in heldout_prompts():
        for _ in range(per_prompt):
            sizes = rng.choice(list(SIZES), size=2)
            scene = tuple(
                Obj(o.shape, o.colour, o.position, str(z))
                for o, z in zip(parse_prompt(prompt), sizes, strict=False)
            )
            yield prompt, scene, rng


def _score(pairs) -> dict:
    prompts, images = zip(*pairs, strict=True)
    return prompt_accuracy(list(images), list(prompts))


def test_weights_ship_small_next_to_the_code():
    assert WEIGHTS.is_file()
    assert WEIGHTS.stat().st_size < 100_000


def test_classifier_on_fresh_renders_of_every_shape_colour_position_size():
    rng = np.random.default_rng(987_654)  # not a training seed
    right = total = 0
    for shape in SHAPES:
        for colour in COLOURS:
            for position in POSITIONS:
                for size in SIZES:
                    found = detect(_render((Obj(shape, colour, position, size),), rng))
                    total += 1
                    right += len(found) == 1 and found[0].shape == shape
    assert total == 240
    assert right / total >= 0.98


def test_judge_scores_real_renders_of_heldout_prompts():
    score = _score((p, _render(scene, rng)) for p, scene, rng in _heldout_scenes(seed=11))
    assert score["n"] == 192 and score["n_single"] == 96 and score["n_two"] == 96
    assert score["all"] >= 0.98
    assert score["single"] >= 0.98 and score["two"] >= 0.98


def test_pure_noise_scores_nothing():
    rng = np.random.default_rng(5)
    prompts = heldout_prompts()
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in prompts]
    assert prompt_accuracy(images, prompts)["all"] <= 0.05


def _swap_colour(obj: Obj, rng: np.random.Generator, taken: set[str]) -> Obj:
    others = [c for c in COLOURS if c != obj.colour and c not in taken]
    return Obj(obj.shape, str(rng.choice(others)), obj.position, obj.size)


def _swap_shape(obj: Obj, rng: np.random.Generator) -> Obj:
    others = [s for s in SHAPES if s != obj.shape]
    return Obj(str(rng.choice(others)), obj.colour, obj.position, obj.size)


def _move(obj: Obj) -> Obj:
    return Obj(obj.shape, obj.colour, OPPOSITE[obj.position], obj.size)


def test_wrong_colour_shape_or_position_scores_nothing():
    wrong_colour, wrong_shape, wrong_position = [], [], []
    for prompt, scene, rng in _heldout_scenes(seed=12, per_prompt=1):
        colours = {o.colour for o in scene}
        wrong_colour.append(
            (prompt, _render(tuple(_swap_colour(o, rng, colours) for o in scene), rng))
        )
        wrong_shape.append((prompt, _render(tuple(_swap_shape(o, rng) for o in scene), rng)))
        wrong_position.append((prompt, _render(tuple(_move(o) for o in scene), rng)))
    for pairs in (wrong_colour, wrong_shape, wrong_position):
        assert _score(pairs)["all"] <= 0.05


def test_one_wrong_object_of_two_fails_the_prompt():
    rng = np.random.default_rng(13)
    prompt = "a red circle on the left and a blue square on the right"
    scene = (Obj("circle", "red", "left"), Obj("triangle", "blue", "right"))
    verdict = judge(_render(scene, rng), prompt)
    assert verdict.count_ok and not verdict.correct
    assert verdict.matched == (True, False)


def test_blank_background_has_the_wrong_count():
    rng = np.random.default_rng(14)
    verdict = judge(_render((), rng), "a red circle on the left")
    assert isinstance(verdict, Verdict)
    assert verdict.detections == () and not verdict.count_ok and not verdict.correct
    assert verdict.matched == (False,)


def test_extra_object_fails_the_count():
    rng = np.random.default_rng(15)
    scene = (Obj("circle", "red", "left"), Obj("square", "blue", "right"))
    verdict = judge(_render(scene, rng), "a red circle on the left")
    assert verdict.matched == (True,) and not verdict.count_ok and not verdict.correct


def test_detect_reports_colour_shape_position_of_a_known_render():
    rng = np.random.default_rng(16)
    scene = (Obj("triangle", "yellow", "top", "large"), Obj("cross", "purple", "bottom", "small"))
    found = sorted(detect(_render(scene, rng)), key=lambda d: d.centroid[1])
    assert all(isinstance(d, Detection) for d in found)
    assert [(d.colour, d.shape, d.position) for d in found] == [
        ("yellow", "triangle", "top"),
        ("purple", "cross", "bottom"),
    ]
    (tx, ty), (cx, cy) = found[0].centroid, found[1].centroid
    assert abs(tx - 0.5) < 0.08 and abs(ty - 0.25) < 0.08
    assert abs(cx - 0.5) < 0.08 and abs(cy - 0.75) < 0.08
    assert found[0].area > found[1].area > 25  # large triangle vs small cross


def test_touching_objects_of_two_colours_are_two_objects():
    rng = np.random.default_rng(19)
    image = render_scene((), rng, 64).astype(np.float32)  # background only
    for shape, colour, cx in (("circle", "red", 20), ("square", "orange", 45)):
        alpha = shape_mask(shape, cx, 32, 30, 64)[..., None]
        image = image * (1 - alpha) + np.asarray(COLOURS[colour], np.float32) * alpha
    image = np.rint(image).astype(np.uint8)
    assert ndimage.label(colour_labels(image) >= 0)[1] == 1  # one blob of colour
    found = sorted((d.colour, d.shape, d.position) for d in detect(image))
    assert found == [("orange", "square", "right"), ("red", "circle", "left")]


def test_detect_works_at_other_sizes():
    rng = np.random.default_rng(17)
    scene = (Obj("square", "green", "left", "small"), Obj("circle", "orange", "right", "large"))
    for side in (32, 128):
        found = detect(render_scene(scene, rng, side))
        assert sorted((d.colour, d.shape, d.position) for d in found) == [
            ("green", "square", "left"),
            ("orange", "circle", "right"),
        ]


def test_prompt_accuracy_splits_by_object_count():
    rng = np.random.default_rng(18)
    single = "a red circle on the left"
    two = "a blue square at the top and a green cross at the bottom"
    good_single = _render(parse_prompt(single), rng)
    good_two = _render(parse_prompt(two), rng)
    blank = _render((), rng)

    score = prompt_accuracy([good_single, blank, good_single], [single, single, single])
    assert score == {
        "all": pytest.approx(2 / 3),
        "single": pytest.approx(2 / 3),
        "two": None,
        "n": 3,
        "n_single": 3,
        "n_two": 0,
    }
    score = prompt_accuracy([good_two, blank], [two, two])
    assert score["single"] is None and score["two"] == 0.5 and score["n_two"] == 2
    score = prompt_accuracy([good_single, good_two, blank], [single, two, two])
    assert score["all"] == pytest.approx(2 / 3) and score["single"] == 1.0 and score["two"] == 0.5
    assert prompt_accuracy([], [])["all"] is None


def test_bad_inputs_raise():
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError):
        judge(image, "a red dog on the left")
    with pytest.raises(ValueError):
        judge(image, "three red circles")
    with pytest.raises(ValueError):
        prompt_accuracy([image], [])
    with pytest.raises(ValueError):
        detect(np.zeros((64, 64), np.uint8))
