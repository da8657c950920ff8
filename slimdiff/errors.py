"""Errors that reach users: one line that names the problem and the fix.

The CLI turns any `UserError` into that line on stderr and exit code 2; everything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """Bad input from the user (recipe, model folder, bundle, argument): exit code 2.

    Example:
        raise UserError(f"{path}: no model_index.json; pass a diffusers pipeline folder")
    """

    exit_code = 2
