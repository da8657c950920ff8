"""`slimdiff run BUNDLE --refiner REFINER`: the base bundle denoises the first part of the
schedule, the SDXL refiner the rest (runtime/refiner.py run_ensemble), one progress bar
per stage."""

from __future__ import annotations

from typing import Any

__all__ = ["run_refined"]


def run_refined(
    base: Any,
    refiner: Any,
    prompt: str | list[str],
    call: dict[str, Any],
    start: float | None,
    aesthetic: dict[str, Any],
    hint: str,
) -> list[Any]:
    """[base result, refiner result] of `run_ensemble` with `call`'s keywords."""
    from slimdiff.progress import StepProgress
    from slimdiff.runtime.refiner import REFINER_START, run_ensemble

    bars = {name: StepProgress(f"denoising ({name})", hint=hint) for name in ("base", "refiner")}

    def on_step(stage: str, done: int, total: int) -> None:
        if stage == "refiner":
            bars["base"].close()  # its "done" line before the refiner's first
        bars[stage](done, total)

    try:
        results = run_ensemble(
            base,
            refiner,
            prompt,
            refiner_start=REFINER_START if start is None else start,
            on_step=on_step,
            **aesthetic,
            **call,
        )
    finally:
        for bar in bars.values():
            bar.close()
    return list(results)
