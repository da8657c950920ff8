"""Apply a recipe's passes to a model and write the compress artifact.

Passes that calibrate keep their work in a work folder (`<out>.work` beside the artifact;
`slimdiff compress --out OUT` uses OUT/work):

    work/trajectories/<key>/   the teacher's trajectories (Calibration.record), recorded
                               before the first pass and reused by reruns with the same
                               model and calibration; delete it to free disk
    work/checkpoints/<pass-key>/  resumable training state (blocks.remove's distillation);
                               a killed run resumes from it, and it is deleted once the
                               artifact is written
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from slimdiff.compress.base import Pass, PassReport, Stage, build_passes

from slimdiff.artifact import save_artifact
from slimdiff.errors import UserError
from slimdiff.models import LoadedModel, load_model
from slimdiff.recipe import Recipe

__all__ = ["check_passes", "compress_model", "dropped_components"]

log = logging.getLogger(__name__)


def compress_model(
    model: LoadedModel,
    recipe: Recipe,
    out: str | Path,
    extra_meta: dict | None = None,
    work_dir: str | Path | None = None,
) -> LoadedModel:
    """Run `recipe.passes` on `model` in order, save the artifact to `out`, reload it.

    `work_dir` (default `<out>.work`) holds calibration caches and pass checkpoints.

    Example:
        >>> recipe = load_recipe("tiny-sdxl-fp32")
        >>> art = compress_model(load_model("tiny:sdxl"), recipe, "out/a")  # doctest: +SKIP
    """
    pipe = model.require_pipeline("compress")
    passes = build_passes(recipe)
    out = Path(out)
    work = Path(work_dir) if work_dir is not None else out.with_name(f"{out.name}.work")
    # Components passes (text.drop) first: the teacher is the pipeline as it is deployed.
    first = [p for p in passes if p.stage == Stage.COMPONENTS]
    rest = [p for p in passes if p.stage != Stage.COMPONENTS]
    for p in first:
        p.preflight(pipe, None)
    reports = [_apply(p, pipe, None) for p in first]
    calib = _preflight(model, pipe, rest, recipe, work)
    if calib is not None:
        # The teacher is the model as loaded (less what components passes removed): its
        # trajectories are recorded (or loaded from the cache) before any other pass
        # changes it, whichever pass asks for them first.
        calib.record()
    reports += [_apply(p, pipe, calib) for p in rest]
    save_artifact(
        pipe, out, source=model.source, recipe=recipe, reports=reports, extra_meta=extra_meta
    )
    # The artifact is complete: a rerun reuses it, so the checkpoints have served.
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    compressed = load_model(str(out))
    if compressed.arch is not model.arch:  # one ArchSpec object per family
        raise UserError(
            f"{out}: the artifact reloads as {compressed.arch.family}, expected {model.arch.family}"
        )
    return compressed


def _preflight(model: LoadedModel, pipe, rest: list[Pass], recipe: Recipe, work: Path | None):
    """The calibration the passes after the components ones need (None: none does), after
    their preflights: what a pass cannot run is refused before the trajectories' work."""
    calib = None
    if any(p.needs_calibration for p in rest):
        from slimdiff.calib import Calibration

        calib = Calibration(pipe, model.arch, recipe.calibration, work_dir=work)
    for p in rest:
        p.preflight(pipe, calib if p.needs_calibration else None)
    return calib


def check_passes(model: LoadedModel, recipe: Recipe) -> None:
    """Every pass's preflight on `model` (loaded lazily will do: configs and shapes, no
    weights), in compress_model's order, nothing applied or recorded: what `compress`
    would refuse before its slow work, for `compress --dry-run`. (Components passes are
    not applied first, so the later checks see the pipeline as loaded.)"""
    pipe = model.require_pipeline("compress")
    passes = build_passes(recipe)
    for p in passes:
        if p.stage == Stage.COMPONENTS:
            p.preflight(pipe, None)
    _preflight(model, pipe, [p for p in passes if p.stage != Stage.COMPONENTS], recipe, None)


def _apply(p: Pass, pipe, calib) -> PassReport:
    log.info("pass %s", p.name)
    start = time.perf_counter()
    report = p.apply(pipe, calib)
    report.seconds = time.perf_counter() - start
    return report


def dropped_components(recipe: Recipe) -> tuple[str, ...]:
    """The pipeline components the recipe's passes remove whole (text.drop): loading the
    model for it may skip them."""
    return tuple(name for p in build_passes(recipe) for name in p.dropped_components())
