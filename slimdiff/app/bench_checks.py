"""What `slimdiff bench` checks of each recipe before any model loads: a guidance rescale
the pipeline cannot take, a size off the model's latent grid, and prompt accuracy asked
of a model that is not toy:shapes."""

from __future__ import annotations

from pathlib import Path

from slimdiff.errors import UserError
from slimdiff.recipe import Recipe

__all__ = ["check_accuracy_model", "check_before_loading"]


def check_before_loading(recipe: Recipe) -> None:
    """UserError for what `recipe` asks that bench would only find out after heavy work."""
    from slimdiff.app.flow import check_input_files

    check_input_files(recipe)  # its LoRAs and calibration prompts, before the reference
    _check_rescale(recipe)
    check_accuracy_model(recipe)
    _check_size(recipe)


def _check_rescale(recipe: Recipe) -> None:
    # Where the model's pipeline class can be read without loading it (built-ins, folders);
    # a hub id, or a class the load will refuse, is checked once loaded (_bench_one).
    from slimdiff.denoise import check_guidance_rescale
    from slimdiff.models.loading import pipeline_class_of

    rescale = recipe.bench.guidance_rescale
    name = pipeline_class_of(recipe.model) if rescale > 0 else None
    if name is not None:
        import diffusers

        if hasattr(diffusers, name):
            check_guidance_rescale(getattr(diffusers, name), rescale, "bench.guidance_rescale")


def _check_size(recipe: Recipe) -> None:
    """bench.size against the model's latent grid, from its configs (a lazy load reads no
    weight); a hub id or a single file is checked once loaded (_bench_one), still before
    the reference is drawn: diffusers would silently draw another size."""
    from slimdiff.inspect import check_size
    from slimdiff.models import load_model
    from slimdiff.models.loading import lazy_loadable

    if recipe.bench.size is None or not lazy_loadable(recipe.model):
        return  # the model's default size is on its grid
    check_size(load_model(recipe.model, weights="lazy"), tuple(recipe.bench.size), "bench.size")


def check_accuracy_model(recipe: Recipe) -> None:
    """UserError when `bench.accuracy: toy-shapes` is set for a model that is not toy:shapes
    nor derived from it: the judge looks for the toy's coloured shapes, which any other
    model scores 0% on, telling nothing."""
    if recipe.bench.accuracy is None or _derived_from_toy(recipe.model):
        return
    raise UserError(
        f"recipe {recipe.name}: bench.accuracy: toy-shapes judges toy:shapes images (coloured "
        f"shapes), and {recipe.model} is not toy:shapes nor compressed from it; remove "
        "bench.accuracy, or bench toy:shapes"
    )


def _derived_from_toy(model: str) -> bool:
    """toy:shapes, a copy of its pipeline folder (saved or retrained: its UNet's
    architecture), or a compress artifact whose source chain leads to one of those."""
    from slimdiff.models.hub import local_path
    from slimdiff.models.toy import parse_toy, toy_folder

    seen: set[str] = set()
    while model not in seen:
        seen.add(model)
        if model.startswith("toy:"):
            return parse_toy(model) == "shapes"
        folder = local_path(model)
        meta = _json_object(folder / "slimdiff.json")
        if meta is None:  # not an artifact: the toy's UNet, or another model
            unet = _json_object(folder / "unet" / "config.json")
            return unet is not None and _toy_architecture(unet, toy_folder())
        source = meta.get("source")
        if not isinstance(source, str):
            return False
        model = source
    return False


# The UNet config keys that make the toy's architecture (what the judge's images need).
_TOY_UNET_KEYS = (
    "_class_name",
    "block_out_channels",
    "down_block_types",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "sample_size",
)


def _toy_architecture(unet: dict, toy: Path) -> bool:
    ours = _json_object(toy / "unet" / "config.json") or {}
    return all(unet.get(k) == ours.get(k) for k in _TOY_UNET_KEYS)


def _json_object(path: Path) -> dict | None:
    """The JSON object in `path` (models.index.read_json), None where there is none."""
    from slimdiff.models.index import read_json

    try:
        return read_json(path)
    except UserError:
        return None
