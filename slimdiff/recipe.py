"""Recipes: one YAML file names the model, the passes, the export and the bench settings.

Example (YAML):

    version: 1
    description: SDXL, no compression, fp16 ONNX
    model: tiny:sdxl
    passes: []                       # e.g. - pass: blocks.remove
    export: {targets: [onnx], precision: fp16}
    bench: {steps: 8, repeat: 3}

Every section rejects unknown keys; each pass entry is validated against its own pass's
Config. Errors name the file, the pass index and the field.
"""

from __future__ import annotations

import hashlib
import json
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml

from slimdiff.errors import UserError

__all__ = [
    "BenchSpec",
    "CalibrationSpec",
    "ExportSpec",
    "Recipe",
    "builtin_recipes",
    "load_recipe",
    "parse_size",
]


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


def parse_size(value: str | list[int] | tuple[int, int] | None) -> tuple[int, int] | None:
    """(height, width) from "WxH" text or a [height, width] list."""
    if value is None:
        return None
    if isinstance(value, str):
        w, sep, h = value.lower().partition("x")
        if not sep or not (w.strip().isdigit() and h.strip().isdigit()):
            raise UserError(f"size {value!r} is not WIDTHxHEIGHT; use e.g. 1024x1024")
        return int(h), int(w)
    h, w = value
    return int(h), int(w)


class CalibrationSpec(_Strict):
    """Prompts and sampling settings that passes needing calibration run the model with."""

    prompts: str | list[str] = "builtin"  # "builtin", a text file (one per line) or a list
    num_prompts: int = pydantic.Field(16, ge=1)
    steps: int = pydantic.Field(20, ge=1)
    guidance: float | None = None  # None: the family's default
    seed: int = 0
    size: tuple[int, int] | None = None  # (height, width); None: the family's default


class ExportSpec(_Strict):
    targets: list[Literal["onnx", "tensorrt", "aoti"]] = ["onnx"]
    precision: Literal["fp32", "fp16"] = "fp32"
    vae_precision: Literal["fp32", "fp16"] | None = None  # None: fp32 where the VAE needs it
    optimize: bool = True  # onnxruntime transformer-optimizer fusions


class BenchSpec(_Strict):
    prompts: list[str] | None = None  # None: the built-in bench prompts
    steps: int = pydantic.Field(8, ge=1)
    size: tuple[int, int] | None = None
    guidance: float | None = None
    seed: int = 0
    repeat: int = pydantic.Field(3, ge=1)
    warmup: int = pydantic.Field(1, ge=0)
    backend: str = "ort-cpu"
    # Prompt following, judged automatically on a held-out prompt set (toy:shapes only, so
    # far): `accuracy_images` seeds per prompt, through the runtime and the uncompressed
    # torch model.
    accuracy: Literal["toy-shapes"] | None = None
    accuracy_images: int = pydantic.Field(4, ge=1)


class PassEntry(pydantic.BaseModel):
    """`- pass: NAME` plus that pass's own keys (validated by the pass's Config)."""

    model_config = pydantic.ConfigDict(extra="allow", frozen=True, populate_by_name=True)
    pass_: str = pydantic.Field(alias="pass")

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Recipe(_Strict):
    version: Literal[1] = 1
    name: str = ""  # defaults to the file stem
    description: str = ""
    model: str
    calibration: CalibrationSpec = CalibrationSpec()
    passes: list[PassEntry] = []
    export: ExportSpec = ExportSpec()
    bench: BenchSpec = BenchSpec()

    def resolved_passes(self) -> list:
        """The passes as configured Pass objects (each entry validated by its Config)."""
        from slimdiff.compress import get_pass

        out = []
        for entry in self.passes:
            cls = get_pass(entry.pass_)
            out.append(cls(cls.Config.model_validate(entry.options())))
        return out

    def content_hash(self) -> str:
        """SHA-256 of the normalised recipe (names the compress cache)."""
        blob = json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True), sort_keys=False)


def builtin_recipes() -> dict[str, Path]:
    """Built-in recipe name -> file, from the recipes shipped in the package."""
    root = files("slimdiff.recipes")
    return {
        Path(str(p)).stem: Path(str(p))
        for p in sorted(root.iterdir(), key=lambda p: p.name)
        if p.name.endswith(".yaml")
    }


def load_recipe(ref: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> Recipe:
    """Load a recipe file or built-in name, apply `--set key=value` overrides, validate."""
    path = Path(ref)
    if not path.is_file():
        builtin = builtin_recipes()
        if str(ref) in builtin:
            path = builtin[str(ref)]
        else:
            raise UserError(
                f"recipe {str(ref)!r} not found: pass a YAML file or a built-in name "
                "(`slimdiff recipes` lists them)"
            )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a YAML mapping with at least `version` and `model`")
    for item in overrides:
        _apply_override(data, item, path)
    data.setdefault("name", path.stem)
    return validate_recipe(data, str(path))


def validate_recipe(data: dict[str, Any], origin: str = "<recipe>") -> Recipe:
    """Validate a recipe dict: schema, each pass's config, and the pass order."""
    try:
        recipe = Recipe.model_validate(data)
    except pydantic.ValidationError as err:
        raise UserError(f"{origin}: {_first_error(err)}") from None
    _check_passes(recipe, origin)
    return recipe


def _check_passes(recipe: Recipe, origin: str) -> None:
    from slimdiff.compress import get_pass

    last = None
    for i, entry in enumerate(recipe.passes):
        where = f"{origin}: passes[{i}] ({entry.pass_})"
        try:
            cls = get_pass(entry.pass_)
        except KeyError as err:
            raise UserError(f"{where}: {err.args[0]}") from None
        try:
            cls.Config.model_validate(entry.options())
        except pydantic.ValidationError as err:
            raise UserError(f"{where}: {_first_error(err)}") from None
        if last is not None and cls.stage < last.stage:
            raise UserError(
                f"{where}: a {cls.stage.name.lower()} pass cannot follow {last.name} "
                f"({last.stage.name.lower()}); order passes structural -> pruning -> quantization"
            )
        last = cls


def _first_error(err: pydantic.ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        msg = "unknown key; remove it or check the spelling (`slimdiff validate` lists errors)"
    extra = f" ({len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"field '{loc}': {msg}{extra}"


def _apply_override(data: dict[str, Any], item: str, path: Path) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise UserError(f"--set {item!r}: use --set key=value, e.g. --set bench.steps=4")
    value = yaml.safe_load(raw) if raw else ""
    node: Any = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = _list_item(node, part, item) if isinstance(node, list) else node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise UserError(f"--set {item!r}: {part!r} in {path} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, item)] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, item: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise UserError(f"--set {item!r}: {part!r} is not an index of a {len(node)}-item list")
    return int(part)


def _list_item(node: list, part: str, item: str) -> Any:
    return node[_list_index(node, part, item)]
