"""Checks of a run's arguments that need no bundle state: the prompts, the step count, the
guidance, the seed and given latents (runtime/pipeline.py calls them first). Each raises
UserError with the fix."""

from __future__ import annotations

from typing import Any

import numpy as np

from slimdiff.errors import UserError
from slimdiff.limits import MAX_GUIDANCE, MAX_SEED, MAX_STEPS

__all__ = ["check_prompts", "check_step_count", "check_values"]


def check_step_count(steps: Any, default: int) -> int:
    """`steps` (None: `default`, the bundle's) as an int; UserError for anything but a
    whole number (the range is checked with the size)."""
    if steps is None:
        return int(default)
    whole = isinstance(steps, (int, np.integer)) or (
        isinstance(steps, (float, np.floating)) and float(steps).is_integer()
    )
    if isinstance(steps, bool) or not whole:
        raise UserError(f"steps {steps!r}: use a whole number from 1 to {MAX_STEPS}")
    return int(steps)


def check_prompts(prompt: Any, negative_prompt: Any) -> tuple[list[str], list[str | None]]:
    """(prompts, one negative per prompt); UserError for anything but a string or a
    non-empty list of strings, or a list of negatives of another length."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise UserError(f"prompt must be a string or a non-empty list of strings, not {prompt!r}")
    if not all(isinstance(p, str) for p in prompts):
        kinds = sorted({type(p).__name__ for p in prompts if not isinstance(p, str)})
        raise UserError(f"prompts must be strings, not {', '.join(kinds)}")
    if negative_prompt is None or isinstance(negative_prompt, str):
        return list(prompts), [negative_prompt] * len(prompts)
    if not isinstance(negative_prompt, (list, tuple)) or len(negative_prompt) != len(prompts):
        raise UserError(
            f"negative_prompt must be one string, or a list of one per prompt ({len(prompts)})"
        )
    if not all(n is None or isinstance(n, str) for n in negative_prompt):
        raise UserError("negative prompts must be strings (or None)")
    return list(prompts), list(negative_prompt)


def check_values(guidance: float, seed: int, latents: np.ndarray | None) -> None:
    if not (np.isfinite(guidance) and 0 <= guidance <= MAX_GUIDANCE):
        raise UserError(f"guidance {guidance}: use a finite value from 0 to {MAX_GUIDANCE:g}")
    if (
        isinstance(seed, bool)
        or not isinstance(seed, (int, np.integer))
        or not 0 <= seed <= MAX_SEED
    ):
        raise UserError(f"seed {seed!r}: use an integer from 0 to {MAX_SEED}")
    if latents is not None:
        array = np.asarray(latents)
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise UserError(f"latents hold {array.dtype}, not numbers")
        if not np.isfinite(array).all():
            raise UserError("latents hold NaN or infinite values")
