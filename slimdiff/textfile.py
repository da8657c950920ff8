"""Read a small user text file (a recipe, a prompts file): one `UserError` line otherwise.

Regular files only (a FIFO or device is refused before it is opened: opening a FIFO waits
for a writer, /dev/zero never ends), at most `max_bytes`; binary content (NUL bytes),
UTF-16/32 and other non-UTF-8 encodings are named with the fix; a UTF-8 BOM is fine.

Example:

    text = read_text_file(Path("prompts.txt"), "prompt list", "text file", 64 << 20)
    # UserError: prompts.txt: saved as UTF-16; save it as UTF-8 (in most editors: ...)
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from slimdiff.errors import UserError

__all__ = ["printable", "read_text_file", "shorten"]

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)

_BOMS = (  # UTF-32 first: its LE BOM starts with UTF-16's
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)


def read_text_file(
    path: Path | str, what: str, form: str, max_bytes: int, label: str | None = None
) -> str:
    """The UTF-8 text of the file at `path` (without a BOM).

    `what` names the file's role in messages and `form` its format ("recipe" and "YAML
    text file": "a recipe is a UTF-8 YAML text file"), `label` the path as messages show
    it (default: the path, made printable). Files over `max_bytes` are refused.
    """
    path = Path(path)
    label = printable(str(path)) if label is None else label
    data = _read_bytes(path, label, what, form, max_bytes)
    return _decode(data, label, what, form)


def _read_bytes(path: Path, label: str, what: str, form: str, max_bytes: int) -> bytes:
    try:
        # stat before open: opening a FIFO blocks until a writer comes, /dev/zero never ends.
        _check_regular(os.stat(path), label, what, form, max_bytes)
        # O_NONBLOCK: if a FIFO is swapped in after the stat, open still returns at once.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            _check_regular(os.fstat(f.fileno()), label, what, form, max_bytes)
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise UserError(f"{label}: no such file; check the path") from None
    except PermissionError:
        raise UserError(f"{label}: permission denied; check the file's permissions") from None
    except (OSError, ValueError) as err:  # ELOOP, ENAMETOOLONG, a NUL in the path...
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise UserError(f"{label}: cannot read it ({printable(reason)}); check the path") from None
    if len(data) > max_bytes:  # it grew after the stat
        _refuse_size(len(data), label, what, max_bytes, at_least=True)
    return data


def _check_regular(st: os.stat_result, label: str, what: str, form: str, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
        raise UserError(f"{label}: is {kind}, not a {what} file; pass the {form} itself")
    if st.st_size > max_bytes:
        _refuse_size(st.st_size, label, what, max_bytes)


def _refuse_size(size: int, label: str, what: str, max_bytes: int, at_least: bool = False):
    more = "over " if at_least else ""
    raise UserError(
        f"{label}: {more}{size / (1 << 20):.1f} MiB ({size:,} bytes) is too large for a {what} "
        f"file (the limit is {max_bytes >> 20} MiB); check the path"
    )


def _decode(data: bytes, label: str, what: str, form: str) -> str:
    fix = "save it as UTF-8 (in most editors: Save As, encoding UTF-8)"
    encoding = next((name for bom, name in _BOMS if data.startswith(bom)), None)
    if encoding is None and b"\x00" in data:
        encoding = _wide_encoding(data)
        if encoding is None:
            offset = data.index(b"\x00")
            raise UserError(
                f"{label}: not a text file (NUL byte at offset {offset}, "
                f"{_byte_position(data, offset)}); a {what} is a UTF-8 {form}: "
                "check the path"
            )
    if encoding is not None:
        raise UserError(f"{label}: saved as {encoding}; {fix}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{label}: not UTF-8 text: byte 0x{data[err.start]:02X} at offset {err.start} "
            f"({_byte_position(data, err.start)}) is not UTF-8 (saved as Latin-1 or "
            f"Windows-1252?); {fix}"
        ) from None
    return text.removeprefix("\ufeff")


def _wide_encoding(data: bytes) -> str | None:
    """UTF-16/32 without a BOM, by where the NULs of mostly-ASCII text fall."""
    head = data[:4096]
    n = len(head) - len(head) % 4
    if n < 4:
        return None
    nul = [head[i:n:4].count(0) / (n // 4) for i in range(4)]
    if sum(f > 0.9 for f in nul) == 3:
        return "UTF-32"
    even, odd = (nul[0] + nul[2]) / 2, (nul[1] + nul[3]) / 2
    if max(even, odd) > 0.6 and min(even, odd) < 0.1:
        return "UTF-16"
    return None


def _byte_position(data: bytes, offset: int) -> str:
    line_start = data.rfind(b"\n", 0, offset) + 1
    column = len(data[line_start:offset].decode("utf-8", "replace")) + 1
    line = data.count(b"\n", 0, offset) + 1
    return f"line {line}, column {column}"


def printable(text: str, limit: int = 200) -> str:
    """User text made safe for a one-line message: no newlines, surrogates or controls."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    text = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
    return shorten(text, limit)


def shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
