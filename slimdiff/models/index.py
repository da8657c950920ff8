"""A pipeline folder as model_index.json describes it: which entries are components
(and which of those are null, never used, or not taken by the pipeline class), whether
their folders are there and which weights variant they hold, and the check that every
weight of the loaded components came from the files. Read by every route that loads a
folder (slimdiff/models/loading.py, lazy.py, single_file.py, slimdiff/artifact.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slimdiff.errors import UserError
from slimdiff.models.families import arch_of_class, text_to_image_class

__all__ = [
    "UNUSED_COMPONENTS",
    "folder_variant",
    "foreign_components",
    "is_part",
    "left_out",
    "null_components",
    "read_json",
    "refuse_missing",
    "refuse_missing_folders",
    "unused_components",
]


def is_part(entry: Any) -> bool:
    # model_index.json components are [library, class]; null for an absent optional part.
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None


def folder_variant(path: Path, parts: list[Path]) -> str | None:
    """The variant from_pretrained must be told to load a folder whose components hold
    only that variant's weights (a download of `*.fp16.*` files), as lazy loading reads
    them; None where every component has plain weights. UserError for components of
    different variants (several in one component: weights.weight_files, which the load
    runs first, refuses them), and for a variant-only component beside one holding plain
    and variant weights: diffusers refuses that folder without a variant and, told it,
    loads the variant in both, while lazy loading would read the plain ones."""
    from slimdiff.models.weights import held_weights

    only: dict[str, set[str]] = {}  # component: its variants, where it holds no plain weights
    both: dict[str, set[str]] = {}  # component: its variants, beside plain weights
    for part in parts:
        if part.is_dir():
            plain, found = held_weights(part)
            if found:
                (both if plain else only)[part.name] = found
    found = set().union(*only.values())
    if len(found) > 1:
        raise UserError(
            f"{path}: its components hold only variant weights, of different variants "
            f"({', '.join(sorted(found))}); keep one variant's files in every component"
        )
    variant = next(iter(found), None)
    mixed = [name for name, held in both.items() if variant in held]
    if mixed:
        raise UserError(
            f"{path}: {_names(list(only))} only {variant} weights, while {_names(mixed)} "
            f"plain and {variant} ones, so which to load is not known (diffusers "
            f"refuses such a folder without a variant); keep plain weights in every component, "
            f"or only the {variant} files (remove {mixed[0]}'s plain ones)"
        )
    return variant


def _names(parts: list[str]) -> str:
    return f"{', '.join(parts)} {'hold' if len(parts) > 1 else 'holds'}"


def refuse_missing_folders(path: Path, index: dict[str, Any], absent: dict) -> None:
    """UserError naming a component model_index.json lists whose folder is not there:
    diffusers would take the missing subfolder for a hub repo and retry the network.
    Entries the pipeline does not take are not looked for (diffusers ignores them)."""
    foreign = foreign_components(index)
    for name, entry in index.items():
        if name.startswith("_") or name in absent or name in UNUSED_COMPONENTS or name in foreign:
            continue
        if not is_part(entry):
            continue
        if not (path / name).is_dir():
            arch = arch_of_class(text_to_image_class(index.get("_class_name", ""), index))
            optional = any(t.name == name and t.optional for t in arch.text_encoders)
            fix = f", or set {name} to [null, null] to run without it" if optional else ""
            raise UserError(
                f"{path / name}: could not build {name} ({entry[1]}): model_index.json lists "
                f"it, but there is no such folder; copy the complete pipeline folder{fix}"
            )


# Pipeline components no bundle runs, never loaded: SD1.x's NSFW safety checker and the
# image encoders of IP-Adapters (with their processors). Repos list them in model_index.json
# (runwayml's SD1.5: a 1.2 GB checker) and downloads often leave their folders out.
UNUSED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


def unused_components(index: dict[str, Any]) -> dict[str, None]:
    """{name: None} for the UNUSED_COMPONENTS a model_index.json dict lists."""
    return {name: None for name in UNUSED_COMPONENTS if is_part(index.get(name))}


def foreign_components(index: dict[str, Any]) -> dict[str, None]:
    """{name: None} for the components a model_index.json dict lists that its pipeline
    class does not take (an SDXL repo's "watermarker" entry): diffusers ignores them."""
    import inspect

    import diffusers

    cls = getattr(diffusers, text_to_image_class(index.get("_class_name", ""), index))
    accepted = inspect.signature(cls.__init__).parameters
    return {k: None for k, v in index.items() if is_part(v) and k not in accepted}


def left_out(index: dict[str, Any]) -> dict[str, None]:
    """{name: None} for every component from_pretrained must be given None for: those
    model_index.json lists as null, and the unused ones it lists."""
    return {**null_components(index), **unused_components(index)}


def null_components(index: dict[str, Any]) -> dict[str, None]:
    """{name: None} for the components a model_index.json dict lists as [null, null]:
    diffusers' save_pretrained writes that for a component set to None (SD3 without T5),
    and its from_pretrained refuses the folder unless they are passed as None again."""
    return {
        k: None
        for k, v in index.items()
        if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and not is_part(v)
    }


def refuse_missing(components: dict[str, Any], where: Any) -> None:
    """UserError when a weight the model needs was not in its files: diffusers then leaves
    the parameter on the meta device with a warning, and any use of it fails much later."""
    for name, module in components.items():
        named = getattr(module, "named_parameters", None)
        if named is None:
            continue
        missing = [key for key, p in named() if p.device.type == "meta"]
        if missing:
            raise UserError(
                f"{where}: {name} lacks {len(missing)} of its weights (first: {missing[0]}); "
                "the files are incomplete or use other names: save the model again with "
                "save_pretrained"
            )


def read_json(path: Path) -> dict:
    """A model folder's JSON file, an object (model_index.json, config.json); UserError
    for anything else."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: unreadable JSON ({err}); re-save the model") from None
    if not isinstance(value, dict):
        raise UserError(
            f"{path}: holds a JSON {type(value).__name__}, not an object; re-save the model "
            "with save_pretrained"
        )
    return value
