"""Recipe -> artifact -> bundle(s): the one flow `compress` and `bench` share.

Outputs are cached by content: OUT/artifact is reused when its slimdiff.json records the
same compress hash (model + calibration + passes), OUT/bundle when its manifest records
the same export hash, so re-running a bench only redoes what changed. OUT/work holds what
compression caches (calibration trajectories) and checkpoints (distillation) on the way:
a killed `slimdiff compress` resumes from it when run again (see compress/runner.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from slimdiff.errors import UserError
from slimdiff.recipe import Recipe

__all__ = ["FlowResult", "compress_and_export", "compress_hash", "export_hash"]

log = logging.getLogger(__name__)


@dataclass
class FlowResult:
    artifact: Path
    bundles: dict[str, Path] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)  # which steps came from the cache


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def compress_hash(recipe: Recipe) -> str:
    data = recipe.model_dump(mode="json", by_alias=True)
    return _hash({k: data[k] for k in ("model", "calibration", "passes")})


def export_hash(recipe: Recipe, target: str) -> str:
    return _hash(
        {
            "compress": compress_hash(recipe),
            "target": target,
            **recipe.export.model_dump(mode="json"),
        }
    )


def _cached(path: Path, meta_file: str, key: str, value: str) -> bool:
    try:
        meta = json.loads((path / meta_file).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    node = meta.get("source", meta) if meta_file == "manifest.json" else meta
    return node.get(key) == value


def compress_and_export(recipe: Recipe, out: str | Path) -> FlowResult:
    """Compress `recipe.model` with the recipe's passes, then export each target.

    Example:
        >>> compress_and_export(load_recipe("tiny-sdxl-fp32"), "out/tiny")  # doctest: +SKIP
    """
    from slimdiff.compress.runner import compress_model
    from slimdiff.models import load_model

    out = Path(out)
    result = FlowResult(artifact=out / "artifact")
    chash = compress_hash(recipe)
    if _cached(result.artifact, "slimdiff.json", "compress_hash", chash):
        log.info("reusing %s", result.artifact)
        result.reused.append("compress")
        compressed = load_model(str(result.artifact))
    else:
        compressed = compress_model(
            load_model(recipe.model),
            recipe,
            result.artifact,
            extra_meta={"compress_hash": chash},
            work_dir=out / "work",  # calibration caches and checkpoints (compress/runner.py)
        )
    for target in recipe.export.targets:
        if target != "onnx":
            raise UserError(f"export target {target!r} is not available in this version; use onnx")
        bundle = out / "bundle" if len(recipe.export.targets) == 1 else out / f"bundle-{target}"
        ehash = export_hash(recipe, target)
        if _cached(bundle, "manifest.json", "export_hash", ehash):
            result.reused.append(f"export:{target}")
        else:
            from slimdiff.export import export_bundle

            export_bundle(
                compressed,
                bundle,
                target=target,
                precision=recipe.export.precision,
                vae_precision=recipe.export.vae_precision,
                optimize=recipe.export.optimize,
                source={
                    "model": recipe.model,
                    "recipe": recipe.name,
                    "recipe_hash": recipe.content_hash(),
                    "export_hash": ehash,
                },
            )
        result.bundles[target] = bundle
    return result
