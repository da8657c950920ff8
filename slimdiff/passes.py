"""What the core knows of compression passes: their names, stages and config schemas.

A recipe is data: its `passes:` entries are validated into each pass's typed config right
in the Recipe model (slimdiff/recipe.py), so a `Recipe(...)` built in Python gets the checks
`slimdiff validate` gives. The core must not import the layer that implements the passes
(slimdiff.compress imports the core), so passes register their schema here, and the
packages that provide passes are found through the `slimdiff.passes` entry-point group
(pyproject.toml lists slimdiff.compress; a third-party package adds its own):

    [project.entry-points."slimdiff.passes"]
    builtin = "slimdiff.compress"

`slimdiff.compress.register_pass` fills this registry as it registers a pass class.
"""

from __future__ import annotations

import enum
import importlib
import logging
import typing
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pydantic

from slimdiff.errors import UserError

__all__ = [
    "PassConfig",
    "PassSchema",
    "Stage",
    "StrictRecord",
    "get_schema",
    "load_plugins",
    "register_schema",
    "registered_schemas",
    "unregister_schema",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "slimdiff.passes"


class Stage(enum.IntEnum):
    """Where a pass may stand in a recipe: stages must not decrease."""

    # Whole pipeline components and weights (text.drop: SD3 without T5; lora.fuse). Applied
    # before calibration records the teacher, so the passes after it learn from the
    # pipeline as deployed.
    COMPONENTS = 0
    STRUCTURAL = 1  # block removal
    PRUNING = 2  # structured pruning (EcoDiff)
    QUANTIZATION = 3  # low-bit quantization (QuEST)


def _takes_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    return any(_takes_bool(arg) for arg in typing.get_args(annotation))


class StrictRecord(pydantic.BaseModel):
    """Recipe data: immutable, unknown keys refused, no infinities or NaN in a number, and
    no yes/no value where a number or text goes (YAML's `true` would be read as 1)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @pydantic.field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: pydantic.ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and not _takes_bool(field.annotation):
            raise ValueError(
                f"{str(value).lower()} is a yes/no value, which this key does not take"
            )
        return value


class PassConfig(StrictRecord):
    """Base of every pass's config: data only, immutable, strict about keys."""

    def input_files(self) -> tuple[str, ...]:
        """Files the pass reads besides the model (lora.fuse's LoRAs): their contents, not
        their paths, go into the compress cache key. Default: none."""
        return ()


@dataclass(frozen=True)
class PassSchema:
    """A pass as a recipe sees it: its dotted name, stage and config class."""

    name: str
    stage: Stage
    config: type[PassConfig]


_SCHEMAS: dict[str, PassSchema] = {}
_plugins_loaded = False


def register_schema(schema: PassSchema) -> None:
    """Add a pass's schema; a second pass of the same name is refused."""
    if schema.name in _SCHEMAS and _SCHEMAS[schema.name] != schema:
        raise ValueError(f"pass {schema.name!r} is already registered")
    _SCHEMAS[schema.name] = schema


def unregister_schema(name: str) -> None:
    _SCHEMAS.pop(name, None)


def load_plugins() -> None:
    """Import every package of the `slimdiff.passes` entry-point group, once (their passes
    register their schemas and edit types as they are imported)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            importlib.import_module(ep.value)
        except ImportError as err:  # a broken plugin must not hide the built-in passes
            log.warning("pass plugin %s (%s) failed to import: %s", ep.name, ep.value, err)


def get_schema(name: str) -> PassSchema:
    """The schema of pass `name`; UserError listing the known passes otherwise."""
    if name not in _SCHEMAS:
        load_plugins()
    try:
        return _SCHEMAS[name]
    except KeyError:
        known = ", ".join(sorted(_SCHEMAS)) or (
            "none (no package registers passes: install slimdiff with `pip install -e .`)"
        )
        raise UserError(f"unknown pass {name!r}; known passes: {known}") from None


def registered_schemas() -> dict[str, PassSchema]:
    load_plugins()
    return dict(_SCHEMAS)
