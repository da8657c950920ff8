"""Typed, replayable edits: what a pass did to a component that its config cannot say.

A pass that changes a model beyond what diffusers' config describes (per-layer head counts
after pruning, quantizers) records one `Edit` per change in the artifact's slimdiff.json,
and registers how to `restore` it: on load, slimdiff builds the component from its saved
config without allocating weights, replays the edits on it, then assigns the saved weights
(slimdiff/artifact.py). One pydantic model per op, each naming its component:

    class HeadsPruned(Edit):
        op: Literal["prune.ecodiff.heads"] = "prune.ecodiff.heads"
        module: str
        keep: list[int]

    @register_pass
    class EcoDiffPass(Pass):
        edits = (HeadsPruned,)

        @classmethod
        def restore(cls, module, edit):   # module: the component, weights not loaded
            ...                           # slice the projections named by the edit

An edit whose `in_config` is true is a record only: the saved config already builds the
result (blocks.remove), so nothing is replayed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import pydantic

from slimdiff.errors import UserError
from slimdiff.passes import load_plugins

__all__ = ["Edit", "Restore", "parse_edit", "register_edit", "restore", "unregister_edit"]


class Edit(pydantic.BaseModel):
    """One recorded change to one pipeline component (`component`: "unet", ...)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    op: str
    component: str
    in_config: ClassVar[bool] = False


# (component module, edit) -> the module to continue with (the same one, edited in place,
# or a replacement); None means "the same one".
Restore = Callable[[Any, Edit], Any]
_EDITS: dict[str, tuple[type[Edit], Restore | None]] = {}


def _op_of(model: type[Edit]) -> str:
    default = model.model_fields["op"].default
    if not isinstance(default, str) or not default:
        raise TypeError(f"{model.__qualname__}.op needs a default: the op's name")
    return default


def register_edit(model: type[Edit], restore: Restore | None) -> None:
    """Register an edit type and how to replay it (None only for `in_config` records)."""
    op = _op_of(model)
    if restore is None and not model.in_config:
        raise TypeError(f"edit {op!r} changes what the config cannot say: give a restore")
    known = _EDITS.get(op)
    if known is not None and known[0] is not model:
        raise ValueError(f"edit op {op!r} is already registered by {known[0].__qualname__}")
    _EDITS[op] = (model, restore)


def unregister_edit(model: type[Edit]) -> None:
    _EDITS.pop(_op_of(model), None)


def parse_edit(data: Any, where: str) -> Edit:
    """The typed edit of one slimdiff.json entry; UserError naming `where` otherwise."""
    if not isinstance(data, dict) or not isinstance(data.get("op"), str):
        raise UserError(f"{where}: an edit is a mapping with an `op`; compress the model again")
    entry = _EDITS.get(data["op"])
    if entry is None:  # the passes that own edit types register them as they are imported
        load_plugins()
        entry = _EDITS.get(data["op"])
    if entry is None:
        known = ", ".join(sorted(_EDITS)) or "none"
        raise UserError(
            f"{where}: edit {data['op']!r} is not one this slimdiff can replay (known: {known}); "
            "upgrade slimdiff, or compress the model again with this version"
        )
    try:
        return entry[0].model_validate(data)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise UserError(
            f"{where}: edit {data['op']!r} is malformed (field '{loc}': {first['msg']}); "
            "compress the model again"
        ) from None


def restore(module: Any, edit: Edit) -> Any:
    """Replay `edit` on `module` (weights not loaded yet); the module to continue with."""
    fn = _EDITS[edit.op][1]
    if fn is None:
        return module
    out = fn(module, edit)
    return module if out is None else out
