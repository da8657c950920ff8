"""`slimdiff convert`: a single-file checkpoint (slimdiff/models/single_file.py) written as a
diffusers folder, checked as every command checks a model it loads, then swapped in whole."""

from __future__ import annotations

from pathlib import Path

__all__ = ["convert_file"]


def convert_file(checkpoint: Path, config: str, out: Path, allow_pickle: bool) -> str:
    """Convert `checkpoint` with `config` (a diffusers folder or hub id of its architecture)
    into the folder `out`; the line `slimdiff convert` prints."""
    from slimdiff.app.args import check_output_dir
    from slimdiff.fsutil import atomic_dir, check_replaceable
    from slimdiff.models.loading import wrap_pipeline
    from slimdiff.models.saving import save_pipeline
    from slimdiff.models.single_file import load_single_file

    check_output_dir(out, replaced=True)
    check_replaceable(out, "diffusers")  # never over a user's folder: before the load
    pipe = load_single_file(checkpoint, config=config, allow_pickle=allow_pickle)
    # what every command checks when it loads the folder, before anything is written
    loaded = wrap_pipeline(pipe, str(checkpoint))
    family = loaded.arch.family + (" refiner" if loaded.arch.kind.aesthetic_score else "")
    with atomic_dir(out, marker="diffusers") as tmp:
        save_pipeline(pipe, tmp)  # keys the checkpoint's config left out stay out
    return f"{out}: {family} ({type(pipe).__name__}) from {checkpoint}"
