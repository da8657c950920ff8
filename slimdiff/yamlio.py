"""Read user YAML (recipe files, `--set` values): bad input is one `UserError` line.

Whatever the bytes, the reader returns plain Python data or raises `UserError` whose
message names the file (or the `--set` item), the place, the problem and the fix, on one
line. Nothing escapes as a traceback and nothing hangs or blows up memory:

- files: regular files only (a FIFO or device is refused before it is opened), at most
  `MAX_BYTES`; binary content (NUL bytes), UTF-16/32 and other non-UTF-8 encodings are
  named; a UTF-8 BOM is fine.
- parsing: yaml's pure-Python SafeLoader with limits enforced while the document is
  composed, so a `[[[[...` or an alias bomb is refused at the first node past the limit:
  nesting (`MAX_DEPTH`, aliases included), values after alias expansion (`MAX_NODES`),
  number length (`MAX_NUMBER_CHARS`). One document per file.
- values: null, bool, int, float, str, list and dict only. Unquoted dates stay text and
  the tags that build other types (`!!binary`, `!!set`, `!!omap`, `!!pairs`,
  `!!timestamp`, any `!!python/...`) are refused: nothing in a recipe needs them, and they
  produce values that validation and hashing downstream cannot handle.

Example:

    data = read_yaml_file(Path("my-recipe.yaml"))      # what="recipe" names it in messages
    parse_yaml_value("[1, 2]", where="--set bench.prompts=[1, 2]")      # -> [1, 2]
    parse_yaml_value("tiny:sdxl", where="--set model=tiny:sdxl")        # -> "tiny:sdxl"
    parse_yaml_value("[1", where="--set bench.steps=[1")
    # UserError: --set bench.steps=[1: not valid YAML (expected ',' or ']', but got
    # '<stream end>' at column 3); quote strings, e.g. --set "model='dir #2'"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.events import AliasEvent, MappingStartEvent, SequenceStartEvent

from slimdiff.errors import UserError
from slimdiff.textfile import printable, read_text_file, shorten

__all__ = [
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_NODES",
    "MAX_NUMBER_CHARS",
    "check_depth",
    "parse_yaml_value",
    "read_yaml_file",
]

# A recipe is a few KiB, nested 3-4 levels, a few hundred values. The limits sit far above
# that and far below what hurts: yaml's composer recurses two frames per level (plain
# safe_load died at 500 levels) and json/pydantic downstream recurse too; pure-Python
# parsing costs ~20-50 us a value, so 20,000 values bound a hostile 1 MiB file to ~2 s.
MAX_BYTES = 1 << 20  # 1 MiB
MAX_DEPTH = 64
MAX_NODES = 20_000  # values after alias expansion: a billion-laughs bomb passes it early
# Python refuses int(str) past 4300 digits, and base-60 ints ("1:2:3") cost quadratic time.
MAX_NUMBER_CHARS = 100

_SET_HINT = "quote strings, e.g. --set \"model='dir #2'\""
_FALLBACK_HINT = "check this line and the one above it (YAML errors often start earlier)"
# (fragment of yaml's problem or context, hint); first match wins. {what}: "recipe".
_HINTS = (
    ("'\\t'", "indent with spaces, not tabs"),
    ("quoted scalar", "close the quote (or quote the value with the other quote character)"),
    ("unknown escape", "in double quotes write a backslash as \\\\, or use single quotes"),
    ("undefined alias", "define the anchor (&name) before its alias (*name), or quote the value"),
    (
        "constructor for the tag",
        "remove the tag: a {what} holds plain text, numbers, true/false, lists and mappings",
    ),
    ("unhashable key", "a mapping key is text or a number, not a list or mapping"),
    (
        "mapping values are not allowed",
        "quote a value that contains ': ', or fix the indentation of this key",
    ),
    (
        "could not find expected ':'",
        "put ':' after the key, or indent/quote a value that spans lines",
    ),
    ("expected ',' or ']'", "close the '[' (or quote the value if it is text)"),
    ("expected ',' or '}'", "close the '{{' (or quote the value if it is text)"),
    ("<block end>", "line up the keys of one mapping (or the '-' of one list) in one column"),
    ("expected key", "line up the keys of one mapping in one column"),
    ("'-' indicator", "line up the '-' of one list in one column"),
    ("that cannot start any token", "quote a value that starts with @, ` or %"),
    ("merging", "'<<' merges a mapping (or a list of mappings) into this one"),
    ("cannot read", "fix the value, or quote it to keep it as text"),
)


# --- the loader --------------------------------------------------------------------------


class _LimitError(yaml.MarkedYAMLError):
    """A limit hit while composing; `hint` is the fix (may name {what})."""

    def __init__(self, problem: str, mark: yaml.Mark | None, hint: str) -> None:
        super().__init__(problem=problem, problem_mark=mark)
        self.hint = hint


class _Loader(yaml.SafeLoader):
    """SafeLoader that counts while it composes: depth, expanded values, number length.

    Aliases are not copied by yaml (the node is shared), but everything downstream that
    walks the value (pydantic, json, our own dump) expands them; so each alias counts the
    size and height of the node it names, which is what a billion-laughs bomb inflates.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._depth = 0  # collections open around the node being composed
        self._expanded = 0  # values composed so far, aliases expanded
        self._aliases = 0
        self._heights: list[int] = []  # per open collection: tallest child so far
        self._anchor_stats: dict[str, tuple[int, int]] = {}  # anchor -> (size, height)
        self._open_anchors: set[str] = set()

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(AliasEvent):
            return self._compose_alias(parent, index)
        event = self.peek_event()
        anchor = event.anchor
        collection = isinstance(event, (SequenceStartEvent, MappingStartEvent))
        start = self._expanded
        self._count(1, event.start_mark)
        if collection:
            self._depth += 1
            self._check_depth(self._depth, event.start_mark)
            self._heights.append(0)
        if anchor is not None:
            self._open_anchors.add(anchor)
        node = super().compose_node(parent, index)
        height = self._heights.pop() + 1 if collection else 0
        if collection:
            self._depth -= 1
        if self._heights:
            self._heights[-1] = max(self._heights[-1], height)
        if anchor is not None:
            self._open_anchors.discard(anchor)
            self._anchor_stats[anchor] = (self._expanded - start, height)
        return node

    def _compose_alias(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if event.anchor in self._open_anchors:
            raise _LimitError(
                f"alias *{event.anchor} is used inside the node it names (a cycle)",
                event.start_mark,
                "point the alias at a node defined before, outside this one",
            )
        stats = self._anchor_stats.get(event.anchor)
        if stats is not None:  # an undefined alias is yaml's own error, below
            size, height = stats
            self._aliases += 1
            self._count(size, event.start_mark)
            self._check_depth(self._depth + height, event.start_mark)
            if self._heights:
                self._heights[-1] = max(self._heights[-1], height)
        return super().compose_node(parent, index)

    def _count(self, n: int, mark: yaml.Mark) -> None:
        self._expanded += n
        if self._expanded > MAX_NODES:
            via = f" through {self._aliases} aliases (*name)" if self._aliases else ""
            raise _LimitError(
                f"more than {MAX_NODES:,} values{via}",
                mark,
                "a {what} holds a few hundred; repeat fewer aliases"
                if self._aliases
                else "a {what} holds a few hundred; move long data to its own file",
            )

    def _check_depth(self, depth: int, mark: yaml.Mark) -> None:
        if depth > MAX_DEPTH:
            raise _LimitError(
                f"nested more than {MAX_DEPTH} levels deep",
                mark,
                "a {what} nests a few levels: look for unclosed '[' or '{{' "
                "(or aliases that nest into each other)",
            )

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        # yaml keeps the last of two equal keys without a word: a recipe's second
        # `export:` would silently undo the first
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], yaml.Mark] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                    continue
                if not key_node.tag.endswith(":str"):
                    # YAML 1.1 reads `on:`, `no:`, `1:` or `null:` as a bool, int or None;
                    # every key of a {what} is a name, so the typed key is a mistake
                    kind = key_node.tag.rsplit(":", 1)[-1]
                    raise _LimitError(
                        f"key {shorten(key_node.value)!r} is read by YAML as !!{kind}, "
                        "not as a name",
                        key_node.start_mark,
                        f"quote it ('{shorten(key_node.value)}':) if it is meant as a key",
                    )
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise _LimitError(
                        f"key {shorten(key_node.value)!r} appears twice in one mapping (first "
                        f"on line {seen[key].line + 1})",
                        key_node.start_mark,
                        "keep one of them: YAML would silently take the last",
                    )
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        # A scalar that matches a resolver's pattern can still fail its conversion
        # (`0b_`, `!!int ""`, `!!bool maybe`): yaml lets ValueError/IndexError/KeyError out.
        try:
            return super().construct_object(node, deep=deep)
        except (ArithmeticError, LookupError, TypeError, ValueError) as err:
            tag = node.tag.rsplit(":", 1)[-1]
            value = shorten(str(node.value)) if isinstance(node, yaml.ScalarNode) else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {value!r} as !!{tag} ({err})", node.start_mark
            ) from None

    def construct_number(self, node: Any) -> Any:
        value = self.construct_scalar(node)
        if len(value) > MAX_NUMBER_CHARS:
            raise _LimitError(
                f"a {len(value):,}-character number (the limit is {MAX_NUMBER_CHARS})",
                node.start_mark,
                "no {what} setting needs that many digits: check for a paste error, or "
                "quote it to keep it as text",
            )
        if node.tag.endswith(":int"):
            return self.construct_yaml_int(node)
        return self.construct_yaml_float(node)

    def construct_str_checked(self, node: Any) -> str:
        value = self.construct_scalar(node)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            # Only a "\uDC80"-style escape in double quotes gets here: the text is UTF-8.
            raise _LimitError(
                f"the string has a lone surrogate \\u{ord(value[err.start]):04x} "
                "(half of a UTF-16 pair)",
                node.start_mark,
                "write the character itself, or escape it whole, e.g. \\U0001F415",
            ) from None
        return value


def _plain_loader_tables() -> None:
    """Restrict _Loader to JSON-shaped values (see the module docstring)."""
    dropped = {"timestamp", "value"}  # unquoted 2024-01-01 and `=` stay text
    _Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag.rsplit(":", 1)[-1] not in dropped]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    _Loader.yaml_constructors = {
        tag: fn
        for tag, fn in yaml.SafeLoader.yaml_constructors.items()
        if tag is None
        or tag.rsplit(":", 1)[-1] not in {"binary", "set", "omap", "pairs", "timestamp"}
    }
    _Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_number)
    _Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_number)
    _Loader.add_constructor("tag:yaml.org,2002:str", _Loader.construct_str_checked)
    # `<<` outside a mapping key is just text (yaml has no constructor for it there).
    _Loader.add_constructor("tag:yaml.org,2002:merge", _Loader.construct_str_checked)


_plain_loader_tables()


def _load(text: str, value: bool = False) -> Any:
    """Parse one document; yaml errors (and the last-resort RecursionError) propagate.

    `value`: refuse a document with no value at all (`---`, `...`), which yaml reads as
    None; a `--set` value means null only when it says so (`null`, `~`).
    """
    loader = _Loader(text)  # the reader checks characters here, in __init__
    try:
        node = loader.get_single_node()
        if value and (node is None or (node.tag.endswith(":null") and node.value == "")):
            mark = node.start_mark if node is not None else None
            raise _LimitError(
                "no value (YAML reads it as a comment or a document marker)", mark, _SET_HINT
            )
        return None if node is None else loader.construct_document(node)
    finally:
        loader.dispose()


# --- public API --------------------------------------------------------------------------


def read_yaml_file(path: Path | str, what: str = "recipe") -> Any:
    """Read one YAML document from a UTF-8 text file, within the limits above.

    `what` names the file in messages ("recipe file", "a recipe holds ..."). An empty file
    reads as None. Raises `UserError` for anything else that is not a small UTF-8 YAML
    text file.

    Example:
        data = read_yaml_file(Path("my.yaml"))
        if not isinstance(data, dict):
            raise UserError(f"my.yaml: a recipe is a YAML mapping")
    """
    path = Path(path)
    label = printable(str(path))
    text = read_text_file(path, what, "YAML text file", MAX_BYTES, label=label)
    try:
        value = _load(text)
    except (yaml.YAMLError, RecursionError) as err:
        raise UserError(_file_message(err, text, label, what)) from None
    check_depth(value, MAX_DEPTH, where=label)
    return value


def parse_yaml_value(text: str, where: str) -> Any:
    """Parse a `--set key=value` value as YAML, within the same limits as a file.

    `where` starts every message, e.g. "--set bench.steps=[1". The value is read as one
    line of a recipe would read it: `4` is an int, `true`/`no` are bools, `null`/`~` is
    None, `[1, 2]`/`{a: 1}` are a list/dict, quotes make text. Text with no other YAML
    meaning stays that text (`tiny:sdxl`, `runs/a b`, `ein Hund, 🐕`, `2024-05-01`, `=`);
    an empty or blank value is "" (write `null` for None). Broken syntax such as `[1` is an
    error, not text: a typo should not pass silently. So is a ` #` comment, which YAML
    would drop (`dir #2` would read as "dir"), and a second document (`---`).

    Example:
        value = parse_yaml_value(raw, where=f"--set {item}")
    """
    label = printable(where)
    if not text.strip():
        return ""
    if len(text) > MAX_BYTES:
        raise UserError(f"{label}: the value is {len(text):,} characters; {_SET_HINT}")
    try:
        value = _load(text, value=True)
        comment = _comment_at(text)
    except (yaml.YAMLError, RecursionError) as err:
        raise UserError(_value_message(err, text, label)) from None
    if comment is not None:
        raise UserError(
            f"{label}: '#' at {_position(text, comment)} starts a YAML comment, which would "
            f"drop the rest of the value; {_SET_HINT}"
        )
    check_depth(value, MAX_DEPTH, where=label)
    return value


def check_depth(value: Any, limit: int = MAX_DEPTH, where: str = "value") -> int:
    """Refuse a value nested deeper than `limit` (lists, tuples, sets, dict values).

    For values built in code as well as parsed ones; iterative, so a 10,000-deep or
    self-containing value is refused, not a RecursionError. Returns the depth (a scalar
    is 0, `[1]` is 1).

    Example:
        check_depth({"bench": {"steps": [4]}}, limit=8)   # -> 3
    """
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, (list, tuple, set, frozenset)):
            children = item
        else:
            continue
        depth += 1
        if depth > limit:
            raise UserError(
                f"{printable(where)}: nested more than {limit} levels deep (or contains "
                "itself); flatten it: settings nest a few levels"
            )
        deepest = max(deepest, depth)
        stack.extend((child, depth) for child in children)
    return deepest


# --- messages ----------------------------------------------------------------------------


def _file_message(err: BaseException, text: str, label: str, what: str) -> str:
    if isinstance(err, RecursionError):  # last resort: the limits above should come first
        return f"{label}: nested too deeply to read; a {what} nests a few levels"
    problem, index, context, hint = _explain(err, text, what)
    where = f" at {_position(text, index, lines=True)}" if index is not None else ""
    if isinstance(err, _LimitError):
        return f"{label}: {problem}{where}; {hint}"
    context = f" ({context})" if context else ""
    return f"{label}: not valid YAML{where}: {problem}{context}; {hint}"


def _value_message(err: BaseException, text: str, label: str) -> str:
    if isinstance(err, RecursionError):
        return f"{label}: nested too deeply to read; {_SET_HINT}"
    problem, index, _, hint = _explain(err, text, "recipe")
    where = f" at {_position(text, index)}" if index is not None else ""
    if isinstance(err, (_LimitError, yaml.reader.ReaderError)):
        return f"{label}: {problem}{where}; {hint}"
    return f"{label}: not valid YAML ({problem}{where}); {_SET_HINT}"


def _explain(err: yaml.YAMLError, text: str, what: str) -> tuple[str, int | None, str, str]:
    """(problem, character index or None, context, hint), without yaml's snippets."""
    if isinstance(err, yaml.reader.ReaderError):
        char = err.character if isinstance(err.character, int) else 0
        if 0xD800 <= char <= 0xDFFF:
            return (
                f"undecodable byte 0x{char - 0xDC00:02X}" if char >= 0xDC80 else "a surrogate",
                err.position,
                "",
                "pass UTF-8 text (check the terminal's locale, e.g. LANG=C.UTF-8)",
            )
        return (
            f"control character U+{char:04X} is not allowed in YAML",
            err.position,
            "",
            "delete it (copied terminal output often carries one)",
        )
    if not isinstance(err, yaml.MarkedYAMLError):
        return printable(str(err)), None, "", _FALLBACK_HINT
    mark = err.problem_mark or err.context_mark
    index = mark.index if mark is not None else None
    problem = printable(err.problem or err.context or "unreadable")
    context = err.context or ""
    if isinstance(err, _LimitError):
        return problem, index, "", err.hint.format(what=what)
    if context.startswith("found duplicate anchor"):
        name = context.split("'")[1] if "'" in context else "?"
        first = err.context_mark
        at = f" (first at {_position(text, first.index, True)})" if first is not None else ""
        return f"anchor &{name} is defined twice{at}", index, "", "give each anchor its own name"
    if context.startswith("expected a single document"):
        return (
            "a second document starts here",
            index,
            "",
            f"a {what} file holds one document: remove this '---' and what follows, or "
            "move it to its own file",
        )
    shown = printable(context)
    if context and err.context_mark is not None and err.problem_mark is not None:
        shown += f" that starts at {_position(text, err.context_mark.index, lines=True)}"
    probe = f"{err.problem or ''} {context}"
    hint = next((h for frag, h in _HINTS if frag in probe), _FALLBACK_HINT)
    return problem, index, shown, hint.format(what=what)


def _position(text: str, index: int, lines: bool = False) -> str:
    """'line L, column C' of a character index; 'column C' for one-line text unless `lines`."""
    index = max(0, min(index, len(text)))
    line = text.count("\n", 0, index) + 1
    column = index - (text.rfind("\n", 0, index) + 1) + 1
    if not lines and "\n" not in text:
        return f"column {column}"
    return f"line {line}, column {column}"


def _comment_at(text: str) -> int | None:
    """Index of a '#' that starts a comment (yaml drops comments without a trace)."""
    if "#" not in text:
        return None
    scanner = _Loader(text)
    covered: list[tuple[int, int]] = []
    try:
        while scanner.check_token():
            token = scanner.get_token()
            covered.append((token.start_mark.index, token.end_mark.index))
    finally:
        scanner.dispose()
    covered.sort()
    k, reach = 0, 0  # sweep: `reach` is the end of the tokens that start at or before i
    for i, ch in enumerate(text):
        while k < len(covered) and covered[k][0] <= i:
            reach = max(reach, covered[k][1])
            k += 1
        if ch == "#" and (i == 0 or text[i - 1] in " \t\r\n") and i >= reach:
            return i
    return None
