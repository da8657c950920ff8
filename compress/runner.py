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

from slimdiff.compress.base import PassReport, build_passes

from slimdiff.artifact import save_artifact
from slimdiff.errors import UserError
from slimdiff.models import LoadedModel, load_model
from slimdiff.recipe import Recipe

__all__ = ["compress_model"]

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
    calib = None
    if any(p.needs_calibration for p in passes):
        from slimdiff.calib import Calibration

        calib = Calibration(pipe, model.arch, recipe.calibration, work_dir=work)
    for p in passes:  # what a pass cannot run is refused before the trajectories' work
        p.preflight(pipe, calib if p.needs_calibration else None)
    if calib is not None:
        # The teacher is the model as loaded: its trajectories are recorded (or loaded from
        # the cache) before any pass changes it, whichever pass asks for them first.
        calib.record()
    reports: list[PassReport] = []
    for p in passes:
        log.info("pass %s", p.name)
        start = time.perf_counter()
        report = p.apply(pipe, calib)
        report.seconds = time.perf_counter() - start
        reports.append(report)
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
