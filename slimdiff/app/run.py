"""`slimdiff run`'s generation: one bundle's call, or the base bundle for the first part of
the schedule and an SDXL refiner for the rest (`--refiner`, runtime/refiner.py
run_ensemble), with a progress bar per stage and a one-line account of the time."""

from __future__ import annotations

from typing import Any

__all__ = ["generate", "timings_line"]

_HINT = "fewer --steps, a smaller --size, or a GPU --backend (ort-cuda, trt)"


def generate(
    pipe: Any,
    refiner: Any,
    prompt: str | list[str],
    call: dict[str, Any],
    start: float | None,
    aesthetic: dict[str, Any],
) -> list[Any]:
    """[result] of `pipe`'s call with `call`'s and `aesthetic`'s keywords; with a
    `refiner` pipeline, [base result, refiner result] of run_ensemble."""
    from slimdiff.progress import StepProgress

    if refiner is None:
        with StepProgress("denoising", hint=_HINT) as bar:
            return [pipe(prompt, on_step=bar, **call, **aesthetic)]
    from slimdiff.runtime.refiner import REFINER_START, run_ensemble

    bars = {name: StepProgress(f"denoising ({name})", hint=_HINT) for name in ("base", "refiner")}

    def on_step(stage: str, done: int, total: int) -> None:
        if stage == "refiner":
            bars["base"].close()  # its "done" line before the refiner's first
        bars[stage](done, total)

    with bars["base"], bars["refiner"]:  # "done" lines only for a run that ended well
        results = run_ensemble(
            pipe,
            refiner,
            prompt,
            refiner_start=REFINER_START if start is None else start,
            on_step=on_step,
            **aesthetic,
            **call,
        )
    return list(results)


def timings_line(results: list[Any]) -> str:
    """Where the time went, per call (base, then refiner)."""
    parts = []
    for result in results:
        t = result.timings_ms
        loads = f", loads {t['load']:.0f}" if "load" in t else ""
        encode = f", vae encode {t['vae_encode']:.0f}" if "vae_encode" in t else ""
        vae = f", vae {t['vae_decode']:.0f}" if "vae_decode" in t else ""
        steps = len(t["denoiser_steps"])
        parts.append(
            f"{t['end_to_end']:.0f} ms: text {t['text_encoders']:.0f}{encode}, "
            f"{steps} step{'' if steps == 1 else 's'}{vae}{loads}"
        )
    return parts[0] if len(parts) == 1 else f"base {parts[0]}; refiner {parts[1]}"
