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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from slimdiff.edits import Edit, register_edit, unregister_edit
from slimdiff.passes import PassConfig, PassSchema, Stage, register_schema, unregister_schema

__all__ = [
    "Pass",
    "PassConfig",
    "PassReport",
    "Stage",
    "build_passes",
    "checkpoint_root",
    "get_pass",
    "register_pass",
    "registered_passes",
    "unregister_pass",
]


@dataclass
class PassReport:
    """What a pass did: numbers for report.json and the replayable edits for slimdiff.json."""

    name: str
    summary: dict[str, Any] = field(default_factory=dict)
    # Edits the artifact loader replays on each component built from its config, in order
    # (slimdiff/edits.py); `in_config` ones are records of what the config already says.
    edits: list[Edit] = field(default_factory=list)
    seconds: float = 0.0


class Pass(abc.ABC):
    """One compression step. Subclasses set `name`, `stage`, `Config` and implement apply."""

    name: ClassVar[str]
    stage: ClassVar[Stage]
    Config: ClassVar[type[PassConfig]] = PassConfig
    # Read on instances: a pass whose need depends on its config overrides it with a
    # property (blocks.remove needs calibration only when it distills).
    needs_calibration: bool = False
    # The Edit types this pass records; register_pass registers them with `restore`.
    edits: ClassVar[tuple[type[Edit], ...]] = ()
    # True for a pass that defines the model rather than compresses it (lora.fuse): bench
    # applies it to its uncompressed reference too.
    applies_to_reference: ClassVar[bool] = False

    def __init__(self, config: PassConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def dropped_components(self) -> tuple[str, ...]:
        """Pipeline components this pass removes whole (text.drop): the loader may skip
        them. Default: none."""
        return ()

    def preflight(self, pipe: Any, calib: Any | None) -> None:
        """Refuse (UserError) what `apply` could not run, before the runner does any slow
        work (the teacher's trajectories); `calib` when needs_calibration. Default: nothing."""
        return None

    @abc.abstractmethod
    def apply(self, pipe: Any, calib: Any | None) -> PassReport:
        """Transform `pipe` (a diffusers pipeline) in place; `calib` when needs_calibration."""

    @classmethod
    def restore(cls, module: Any, edit: Edit) -> Any:
        """Replay one of this pass's edits on `module`, a component built from its saved
        config whose weights are not loaded yet (meta tensors); return the module to go on
        with (None: the same). Passes whose edits are all `in_config` need none."""
        raise NotImplementedError(f"{cls.__qualname__} records edits but has no restore")


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: add `cls` to the registry under `cls.name`; refuses duplicates."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or "." not in name:
        raise TypeError(f"{cls.__qualname__}.name must be a dotted string like 'blocks.remove'")
    if name in _REGISTRY:
        raise ValueError(f"pass {name!r} is already registered by {_REGISTRY[name].__qualname__}")
    replays = [e for e in cls.edits if not e.in_config]
    if replays and cls.restore.__func__ is Pass.restore.__func__:
        raise TypeError(f"{cls.__qualname__} records {replays[0].__qualname__}: define restore")
    _REGISTRY[name] = cls
    # The recipe and the artifact loader (core) validate and replay without importing compress.
    register_schema(PassSchema(name, cls.stage, cls.Config))
    for edit in cls.edits:
        register_edit(edit, None if edit.in_config else cls.restore)
    return cls


def unregister_pass(name: str) -> None:
    """Remove a pass (tests register throwaway passes)."""
    cls = _REGISTRY.pop(name, None)
    unregister_schema(name)
    for edit in getattr(cls, "edits", ()):
        unregister_edit(edit)


def checkpoint_root(work_dir: str | None, calib: Any) -> Path | None:
    """Where a pass keeps resumable checkpoints: its config's `work_dir`, else the
    calibration's work folder's checkpoints/ (the runner removes it once the artifact is
    saved); None when there is neither (no checkpoints)."""
    if work_dir:
        return Path(work_dir)
    if calib.work_dir is not None:
        return calib.work_dir / "checkpoints"
    return None


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as `name`; KeyError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none yet"
        raise KeyError(f"unknown pass {name!r}; known passes: {known}") from None


def registered_passes() -> dict[str, type[Pass]]:
    return dict(_REGISTRY)


def build_passes(recipe: Any) -> list[Pass]:
    """The recipe's passes as configured Pass objects, in order (entries are already
    validated into their typed configs by the Recipe)."""
    return [get_pass(entry.name)(entry.config) for entry in recipe.passes]
