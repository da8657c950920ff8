"""JSON read as strictly as slimdiff writes it, and validation errors as JSON field paths.

`loads` takes bytes (what was hashed is what is parsed) and accepts only UTF-8 without a
byte-order mark, no NUL, no duplicate keys (parsers disagree on which one wins), no
NaN/Infinity or numbers that overflow to them, and nesting no deeper than asked (a
100000-deep document raises StrictJSONError, not RecursionError). `describe` turns a
pydantic ValidationError on such a document into one line naming the field.

Standard library and pydantic only: the torch-free runtime imports it.

Example:
    >>> loads(b'{"a": [1, 2.5]}', max_depth=4)
    {'a': [1, 2.5]}
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pydantic

__all__ = ["StrictJSONError", "describe", "kind", "loads"]


class StrictJSONError(ValueError):
    """Bytes that are not strict JSON; the message says why, without the file's name."""


def loads(data: bytes, max_depth: int, infinities: bool = False) -> Any:
    """Parse `data`; raise StrictJSONError saying what is wrong with it.

    `infinities`: also take `Infinity` and `-Infinity`, which Python's json module writes
    for float infinities (diffusers' save_config: DPM-Solver's lambda_min_clipped = -inf);
    NaN stays refused.
    """
    if data[:3] == b"\xef\xbb\xbf" or data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise StrictJSONError("not UTF-8 JSON (it starts with a byte-order mark)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise StrictJSONError(f"not UTF-8 JSON (byte {err.start} is not valid UTF-8)") from None
    if "\x00" in text:
        raise StrictJSONError("not UTF-8 JSON (it holds NUL bytes: UTF-16?)")
    try:
        value = json.loads(
            text,
            object_pairs_hook=_no_duplicate_keys,
            parse_constant=_infinity if infinities else _no_constant,
            parse_float=_finite_float,
        )
    except RecursionError:
        raise StrictJSONError("JSON nested too deeply") from None
    except json.JSONDecodeError as err:
        raise StrictJSONError(
            f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
        ) from None
    except ValueError as err:  # the hooks below, or an integer too long to convert
        raise StrictJSONError(f"not valid JSON ({err})") from None
    if _depth(value, max_depth) > max_depth:
        raise StrictJSONError(f"JSON nested deeper than {max_depth} levels")
    return value


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _infinity(name: str) -> float:
    if name == "NaN":
        return _no_constant(name)
    return float(name)  # "Infinity", "-Infinity"


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _depth(value: Any, limit: int) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            if depth > limit:
                break
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return deepest


def kind(value: Any) -> str:
    """The JSON type name of a parsed value: "object", "array", "string", ..."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def describe(err: pydantic.ValidationError, document: Any) -> str:
    """The first error as `field 'a.b.c': message (got X)`, plus how many more there are.

    A model validator may name a sub-field itself ("inputs.sample: ..."); it is appended.
    """
    first = err.errors(include_url=False)[0]
    loc = _field(first["loc"], document)
    msg = first["msg"].removeprefix("Value error, ")
    inner = re.match(r"([\w.]+): ", msg)
    if inner:
        loc, msg = ".".join(filter(None, (loc, inner.group(1)))), msg[inner.end() :]
    got = first.get("input")
    shown = ""
    if first["type"] not in ("missing", "value_error") and not isinstance(got, (dict, list)):
        shown = f" (got {json.dumps(got)[:60]})"
    more = err.error_count() - 1
    tail = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    return f"{f'field {loc!r}: ' if loc else ''}{msg}{shown}{tail}"


def _field(loc: tuple[int | str, ...], document: Any) -> str:
    """pydantic's error location as a path in the document: parts that are not its keys or
    indices (union member tags such as "constrained-int") are dropped."""
    parts, node = [], document
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            if i + 1 < len(loc) and loc[i + 1] == "[key]":
                return ".".join([*parts, f"[{part!r}] (a key)"]).replace(".[", "[")
            parts.append(str(part) if re.fullmatch(r"\w+", str(part)) else f"[{part!r}]")
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            parts.append(str(part))
            node = node[part]
        elif isinstance(node, (dict, list)):
            parts.append(str(part))  # a missing key, or an index past the end
            break
        else:
            break
    return ".".join(parts).replace(".[", "[")
