"""runtime/denoise_loop.py: guidance as diffusers mixes it, a denoiser output of the wrong
shape or type refused in one line, and the loop's bookkeeping (steps, progress, blend)."""

from __future__ import annotations

import numpy as np
import pytest
from slimdiff.runtime.denoise_loop import Guidance, Kept, denoise, rescale_guided
from slimdiff.runtime.manifest import DENOISER_OUTPUT, BundleError


class _Fixed:
    """A denoiser that returns `outputs` in turn (the last one from then on)."""

    def __init__(self, *outputs: np.ndarray) -> None:
        self.outputs = list(outputs)
        self.feeds: list[dict] = []

    def run(self, feeds):
        self.feeds.append(feeds)
        out = self.outputs.pop(0) if len(self.outputs) > 1 else self.outputs[0]
        return {DENOISER_OUTPUT: out}


class _Euler:
    """The scheduler interface the loop uses, with x - 0.5 * pred as its step."""

    stochastic = False

    def __init__(self, n: int) -> None:
        self.timesteps = np.linspace(999, 0, n)

    def scale_model_input(self, x, i):
        return x * np.float32(2)

    def step(self, pred, i, x):
        return x - np.float32(0.5) * pred

    def add_noise(self, clean, noise, i):
        return clean + np.float32(i) * noise


def test_cfg_mixes_the_halves_and_rescale_follows_diffusers():
    x = np.zeros((1, 4, 2, 2), np.float32)
    uncond = np.full((1, 4, 2, 2), 1.0, np.float32)
    text = np.arange(16, dtype=np.float32).reshape(1, 4, 2, 2)
    guided = Guidance(cfg=True, scale=3.0)
    got = guided.predict(_Fixed(np.concatenate([uncond, text])), {}, x)
    np.testing.assert_allclose(got, uncond + 3 * (text - uncond))
    rescaled = Guidance(cfg=True, scale=3.0, rescale=0.7)
    got = rescaled.predict(_Fixed(np.concatenate([uncond, text])), {}, x)
    mixed = uncond + 3 * (text - uncond)
    factor = text.std(ddof=1) / mixed.std(ddof=1)  # diffusers' rescale_noise_cfg, per image
    np.testing.assert_allclose(got, 0.7 * mixed * factor + 0.3 * mixed, rtol=1e-6)
    np.testing.assert_allclose(rescale_guided(mixed, text, np.float32(0)), mixed)


def test_true_cfg_runs_the_negative_prompt_a_second_time():
    x = np.zeros((1, 16, 8), np.float32)  # FLUX's packed latents
    pos, neg = np.full(x.shape, 2.0, np.float32), np.full(x.shape, 0.5, np.float32)
    denoiser = _Fixed(pos, neg)
    guided = Guidance(cfg=False, scale=3.5, true_cfg=4.0, negative={"prompt": np.ones(1)})
    np.testing.assert_allclose(guided.predict(denoiser, {"prompt": np.zeros(1)}, x), 6.5)
    assert [f["prompt"][0] for f in denoiser.feeds] == [0.0, 1.0]


@pytest.mark.parametrize(
    ("out", "what"),
    [
        (np.zeros((2, 4, 2, 3), np.float32), r"float32 of shape \(2, 4, 2, 3\)"),
        (np.zeros((1, 4, 2, 2), np.float32), r"of shape \(1, 4, 2, 2\), not .* \(2, 4, 2, 2\)"),
        (np.zeros((2, 4, 2, 2), np.int64), "int64"),
    ],
)
def test_a_denoiser_output_of_another_shape_or_type_is_refused(out, what):
    x = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(BundleError, match=f"denoiser's output is .*{what}.*export the bundle"):
        Guidance(cfg=True, scale=5.0).predict(_Fixed(out), {}, x)


def test_the_loop_runs_its_steps_reports_progress_and_puts_kept_latents_back():
    x = np.ones((1, 1, 2, 2), np.float32)
    pred = np.full(x.shape, 0.25, np.float32)
    mask = np.array([[[[1, 0], [0, 0]]]], np.float32)  # 1: repainted
    clean, noise = np.full(x.shape, 7.0, np.float32), np.ones(x.shape, np.float32)
    inputs: dict[int, np.ndarray] = {}
    progress: list[tuple[int, int]] = []

    def feeds(i, model_input):
        inputs[i] = model_input
        return {}

    final, ms = denoise(
        _Fixed(pred),
        _Euler(5),
        x,
        range(2, 5),
        feeds,
        Guidance(cfg=False, scale=1.0),
        seed=0,
        extra=np.full((1, 1, 2, 2), 9.0, np.float32),
        kept=Kept(mask, clean, noise),
        on_step=lambda done, total: progress.append((done, total)),
    )
    assert list(inputs) == [2, 3, 4] and len(ms) == 3 and progress == [(1, 3), (2, 3), (3, 3)]
    # the scaled latents, then `extra` on the channels; at step 3 the kept part is the clean
    # latents noised to it: 7 + 3 * 1
    np.testing.assert_array_equal(inputs[2], [[[[2, 2], [2, 2]], [[9, 9], [9, 9]]]])
    np.testing.assert_array_equal(inputs[3][0, 0], [[1.75, 20], [20, 20]])
    assert final[0, 0, 0, 0] == pytest.approx(1 - 3 * 0.125)  # repainted: three steps
    np.testing.assert_array_equal(final[0, 0].ravel()[1:], 7.0)  # kept: the clean image
