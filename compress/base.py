"""Pass, PassConfig and the pass registry.

A pass transforms one component of a diffusers pipeline in place and reports what it did.
Its configuration is data (a frozen pydantic model that rejects unknown keys), so a recipe
can be validated and printed without running anything. Registration is explicit:

    @register_pass
    class RemoveBlocksPass(Pass):
        name = "blocks.remove"
        stage = Stage.STRUCTURAL

        class Config(PassConfig):
            preset: str | None = None

        def apply(self, pipe, calib):
            ...
            return PassReport(self.name, summary={"params_removed": n})

Built-in passes are imported by the explicit list in `slimdiff.compress.__init__`.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pydantic

__all__ = [
    "Pass",
    "PassConfig",
    "PassReport",
    "Stage",
    "get_pass",
    "register_pass",
    "registered_passes",
    "unregister_pass",
]


class Stage(enum.IntEnum):
    """Where a pass may stand in a recipe: stages must not decrease."""

    STRUCTURAL = 0  # block removal
    PRUNING = 1  # structured pruning (EcoDiff)
    QUANTIZATION = 2  # low-bit quantization (QuEST)


class PassConfig(pydantic.BaseModel):
    """Base of every pass's config: data only, immutable, strict about keys."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


@dataclass
class PassReport:
    """What a pass did: numbers for report.json and the replayable edits for slimdiff.json."""

    name: str
    summary: dict[str, Any] = field(default_factory=dict)
    # Edits the artifact loader replays on a freshly built base model, in order. Each is
    # {"op": str, ...}; passes whose result diffusers' config can express record none.
    edits: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


class Pass(abc.ABC):
    """One compression step. Subclasses set `name`, `stage`, `Config` and implement apply."""

    name: ClassVar[str]
    stage: ClassVar[Stage]
    Config: ClassVar[type[PassConfig]] = PassConfig
    # Read on instances: a pass whose need depends on its config overrides it with a
    # property (blocks.remove needs calibration only when it distills).
    needs_calibration: bool = False

    def __init__(self, config: PassConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()

    @abc.abstractmethod
    def apply(self, pipe: Any, calib: Any | None) -> PassReport:
        """Transform `pipe` (a diffusers pipeline) in place; `calib` when needs_calibration."""


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: add `cls` to the registry under `cls.name`; refuses duplicates."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or "." not in name:
        raise TypeError(f"{cls.__qualname__}.name must be a dotted string like 'blocks.remove'")
    if name in _REGISTRY:
        raise ValueError(f"pass {name!r} is already registered by {_REGISTRY[name].__qualname__}")
    _REGISTRY[name] = cls
    return cls


def unregister_pass(name: str) -> None:
    """Remove a pass (tests register throwaway passes)."""
    _REGISTRY.pop(name, None)


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as `name`; KeyError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none yet"
        raise KeyError(f"unknown pass {name!r}; known passes: {known}") from None


def registered_passes() -> dict[str, type[Pass]]:
    return dict(_REGISTRY)
