"""slimdiff.yamlio: every bad recipe file or `--set` value is one UserError line, fast."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest

from slimdiff.errors import UserError
from slimdiff.yamlio import (
    MAX_BYTES,
    MAX_DEPTH,
    check_depth,
    parse_yaml_value,
    read_yaml_file,
)

RECIPE = """\
version: 1
description: SDXL, blocks removed, fp16 ONNX
model: tiny:sdxl
calibration: {prompts: builtin, num_prompts: 4, steps: 2, seed: 0}
defaults: &common {steps: 4, seed: 1}
passes:
  - pass: blocks.remove
    preset: bk-base   # a comment
  - pass: quant.quest
    bits: 8
export: {targets: [onnx], precision: fp16}
bench:
  <<: *common
  prompts: ["ein Hund, 🐕", 'a "quoted" cat']
  repeat: 3
"""

LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(9)
)


def _one_line(err: pytest.ExceptionInfo[UserError]) -> str:
    msg = str(err.value)
    assert "\n" not in msg and "\r" not in msg, msg
    msg.encode("utf-8")  # printable on any UTF-8 stderr: no lone surrogates
    return msg


BAD_FILES = [
    ("binary", bytes(random.Random(0).randrange(256) for _ in range(512)) + b"\0", "NUL byte"),
    ("latin-1", "model: caf\u00e9\n".encode("latin-1"), "byte 0xE9 at offset 10 (line 1"),
    ("utf-16 bom", "model: x\n".encode("utf-16"), "saved as UTF-16; save it as UTF-8"),
    ("utf-16le no bom", "model: x\n".encode("utf-16-le"), "saved as UTF-16"),
    ("utf-16be no bom", "model: x\n".encode("utf-16-be"), "saved as UTF-16"),
    ("utf-32", "model: x\n".encode("utf-32"), "saved as UTF-32"),
    (
        "surrogateescape",
        b"a: 1\nmodel: " + "\udc80".encode("utf-8", "surrogateescape"),
        "byte 0x80 at offset 12 (line 2, column 8)",
    ),
    ("utf-8 encoded surrogate", b"model: \xed\xb2\x80\n", "is not UTF-8"),
    ("escaped surrogate", b'model: "\\udc80"\n', "lone surrogate \\udc80"),
    ("5000-digit int", b"bench: {steps: " + b"9" * 5000 + b"}\n", "5,000-character number"),
    ("5000-digit float", b"g: 1." + b"5" * 5000 + b"\n", "5,002-character number"),
    ("base-60 int", b"steps: " + b"1:2" * 50 + b"\n", "150-character number"),
    ("10000-deep flow list", b"[" * 10000 + b"]" * 10000, f"more than {MAX_DEPTH} levels"),
    ("10000-deep flow map", b"{a: " * 10000 + b"}" * 10000, f"more than {MAX_DEPTH} levels"),
    ("10000-deep block list", b"- " * 10000 + b"1\n", f"more than {MAX_DEPTH} levels"),
    # Block mappings indent one more space per level: 10,000 levels need ~50 MB, over
    # MAX_BYTES; 1,000 fit in 0.5 MB and reach the depth limit. `? ` nests block-style
    # mapping keys without indenting.
    (
        "1000-deep block map",
        b"".join(b" " * i + b"a:\n" for i in range(1000)) + b" " * 1000 + b"1\n",
        "at line 65, column 65",
    ),
    ("10000-deep block map keys", b"? " * 10000 + b"a\n", f"more than {MAX_DEPTH} levels"),
    (
        "alias nesting",
        b"a: &a " + b"[" * 60 + b"1" + b"]" * 60 + b"\nb: [[[[[*a]]]]]\n",
        f"more than {MAX_DEPTH} levels deep at line 2",
    ),
    ("billion laughs", LAUGHS.encode(), "aliases (*name)"),
    ("alias cycle", b"a: &a [1, *a]\n", "used inside the node it names"),
    ("unclosed quote", b'model: "tiny:sdxl\nbench: {}\n', "close the quote"),
    ("unclosed bracket", b"export: {targets: [onnx}\n", "not valid YAML at line 1, column 24"),
    ("bad indentation", b"bench:\n  steps: 1\n repeat: 2\n", "line up the keys"),
    ("value with ': '", b"description: a: b\n", "quote a value that contains ': '"),
    ("missing ':'", b"a: 1\nkey\nb: 2\n", "not valid YAML at line"),
    ("duplicate anchor", b"a: &x 1\nb: &x 2\n", "anchor &x is defined twice (first at line 1"),
    ("undefined alias", b"a: *nope\n", "found undefined alias 'nope'"),
    ("python tag", b"a: !!python/object:os.system {}\n", "remove the tag"),
    ("binary tag", b"a: !!binary aGVsbG8=\n", "remove the tag"),
    ("local tag", b"a: !mine 1\n", "remove the tag"),
    ("bad int literal", b"a: 0b_\n", "cannot read '0b_' as !!int"),
    ("bad explicit int", b'a: !!int ""\n', "cannot read '' as !!int"),
    ("bad explicit bool", b"a: !!bool maybe\n", "cannot read 'maybe' as !!bool"),
    ("unhashable key", b"? [1]\n: 2\n", "a mapping key is text or a number"),
    ("bad merge", b"a: {<<: 1}\n", "merges a mapping"),
    ("unknown escape", b'a: "\\q"\n', "found unknown escape character 'q'"),
    ("tab indentation", b"bench:\n\tsteps: 1\n", "indent with spaces, not tabs"),
    ("control character", b"prompt: \x1b[31mred\n", "control character U+001B"),
    ("two documents", b"model: a\n---\nmodel: b\n", "at line 2, column 1: a second document"),
    ("directive only", b"%YAML 1.1\n", "not valid YAML"),
]


@pytest.mark.parametrize(
    ("data", "fragment"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES]
)
def test_bad_file_is_one_user_error_line(tmp_path: Path, data: bytes, fragment: str) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_bytes(data)
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        read_yaml_file(path)
    assert time.perf_counter() - start < 2.0
    msg = _one_line(err)
    assert msg.startswith(f"{path}: "), msg
    assert fragment in msg, msg


def test_good_recipe_reads_as_plain_data(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE, encoding="utf-8")
    data = read_yaml_file(path)
    assert data["model"] == "tiny:sdxl"
    assert data["passes"][1] == {"pass": "quant.quest", "bits": 8}
    assert data["export"] == {"targets": ["onnx"], "precision": "fp16"}
    assert data["bench"] == {
        "steps": 4,
        "seed": 1,
        "prompts": ["ein Hund, 🐕", 'a "quoted" cat'],
        "repeat": 3,
    }


def test_utf8_bom_and_unicode_prompts_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + "prompts: [ein Hund, 🐕, '\u00e9t\u00e9']\n".encode())
    assert read_yaml_file(path) == {"prompts": ["ein Hund", "🐕", "\u00e9t\u00e9"]}


def test_dates_and_equals_stay_text_and_empty_file_is_none(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("description: 2024-05-01\nbad: 2024-13-45\neq: =\nm: <<\n")
    assert read_yaml_file(path) == {
        "description": "2024-05-01",
        "bad": "2024-13-45",
        "eq": "=",
        "m": "<<",
    }
    path.write_text("# only a comment\n")
    assert read_yaml_file(path) is None


def test_what_names_the_file_kind(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_bytes(b"\0")
    with pytest.raises(UserError, match="a manifest is a UTF-8 YAML text file"):
        read_yaml_file(path, what="manifest")


def test_missing_file_directory_and_oversized_file(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        read_yaml_file(tmp_path / "nope.yaml")
    assert "no such file; check the path" in _one_line(err)
    with pytest.raises(UserError) as err:
        read_yaml_file(tmp_path)
    assert "is a directory, not a recipe file" in _one_line(err)
    big = tmp_path / "big.yaml"
    big.write_bytes(b"a: 1\n" * (2 * MAX_BYTES // 5))
    with pytest.raises(UserError) as err:
        read_yaml_file(big)
    assert "2.0 MiB (2,097,150 bytes) is too large for a recipe file" in _one_line(err)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            read_yaml_file(fifo)
        except BaseException as exc:  # handed to the main thread to assert on
            outcome.append(exc)

    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    worker.join(timeout=5)
    if worker.is_alive():  # blocked in open(): give it a writer so the thread can end
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("read_yaml_file blocked on a FIFO")
    assert len(outcome) == 1 and isinstance(outcome[0], UserError), outcome
    assert "is a named pipe (FIFO), not a recipe file" in str(outcome[0])


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_endless_device_is_refused() -> None:
    with pytest.raises(UserError, match="is a character device"):
        read_yaml_file(Path("/dev/zero"))


# --- --set values ------------------------------------------------------------------------

GOOD_VALUES = [
    ("4", 4),
    ("0.5", 0.5),
    ("true", True),
    ("no", False),  # YAML 1.1, as in a recipe file
    ("null", None),
    ("~", None),
    ("[1, 2]", [1, 2]),
    ("{a: 1, b: [x]}", {"a": 1, "b": ["x"]}),
    ("tiny:sdxl", "tiny:sdxl"),
    ("runs/a b", "runs/a b"),
    ("ein Hund, 🐕", "ein Hund, 🐕"),
    ("a#b", "a#b"),
    ("'dir #2'", "dir #2"),
    ("2024-05-01", "2024-05-01"),
    ("=", "="),
    ("", ""),
    ("  ", ""),
]


@pytest.mark.parametrize(("text", "expected"), GOOD_VALUES)
def test_set_value_reads_like_a_recipe_line(text: str, expected: object) -> None:
    assert parse_yaml_value(text, where=f"--set x={text}") == expected


BAD_VALUES = [
    (
        "[1",
        "--set bench.steps=[1: not valid YAML (expected ',' or ']', but got '<stream end>' "
        "at column 3); quote strings, e.g. --set \"model='dir #2'\"",
    ),
    ("dir #2", "'#' at column 5 starts a YAML comment"),
    ("a: b: c", "mapping values are not allowed here at column 5"),
    ("'open", "not valid YAML (found unexpected end of stream"),
    ("---", "no value (YAML reads it as a comment or a document marker)"),
    ("#ff0000", "no value (YAML reads it as a comment"),
    ("a\n---\nb", "a second document starts here at line 2, column 1"),
    ("9" * 5000, "5,000-character number"),
    ("[" * 10000, f"more than {MAX_DEPTH} levels"),
    ("{a: " * 10000, f"more than {MAX_DEPTH} levels"),
    ("".join(" " * i + "a:\n" for i in range(1000)), f"more than {MAX_DEPTH} levels"),
    (LAUGHS.replace("\n", ", ").join("{}"), "aliases (*name)"),
    ("!!python/object:os.system {}", "could not determine a constructor for the tag"),
    ("\udc80x", "undecodable byte 0x80 at column 1; pass UTF-8 text"),
    ("a\x07", "control character U+0007"),
    ("x" * (MAX_BYTES + 1), "characters"),
]


@pytest.mark.parametrize(("text", "fragment"), BAD_VALUES, ids=[b[1][:40] for b in BAD_VALUES])
def test_bad_set_value_names_the_item(text: str, fragment: str) -> None:
    where = "--set bench.steps=" + text
    with pytest.raises(UserError) as err:
        parse_yaml_value(text, where=where)
    msg = _one_line(err)
    assert msg.startswith("--set bench.steps="), msg
    assert fragment in msg, msg
    assert len(msg) < 600, msg  # a 5000-character value is shortened when echoed


def test_check_depth_on_values_built_in_code() -> None:
    assert check_depth(4, limit=8) == 0
    assert check_depth({"bench": {"steps": [4]}}, limit=8) == 3
    deep: list = []
    for _ in range(10_000):
        deep = [deep]
    with pytest.raises(UserError, match="nested more than 64 levels"):
        check_depth(deep, 64, where="--set x")
    loop: list = [1]
    loop.append(loop)
    with pytest.raises(UserError, match="contains itself"):
        check_depth(loop, 64)


# --- fuzz: mutations of a valid recipe ---------------------------------------------------

SNIPPETS = [
    b"[",
    b"]",
    b"{",
    b"}",
    b"&a ",
    b"*a ",
    b"*b ",
    b"!!",
    b"!!python/object ",
    b"!!int ",
    b"!!binary ",
    b"!x ",
    b": ",
    b"- ",
    b"? ",
    b"\t",
    b'"',
    b"'",
    b"\\",
    b"#",
    b"|",
    b">",
    b"\n",
    b"\n---\n",
    b"%YAML 1.1\n",
    b"<<: *a\n",
    b"&a [*a]",
    b"0b_",
    b"1:2:3",
    b"=",
    b"\x00",
    b"\x1b",
    b"\xff",
    b"\xc3",
    b"\xef\xbb\xbf",
    b"\xff\xfe",
    b'"\\udc80"',
    b"9" * 5000,
    b"[" * 500,
    b"{a: " * 500,
    b"- " * 500,
    b"? " * 500,
    LAUGHS.encode(),
]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    for _ in range(rng.randint(1, 3)):
        pos = rng.randrange(len(data) + 1)
        kind = rng.random()
        if kind < 0.3 and data:
            flip = bytes([rng.randrange(256)])
            data = data[:pos] + flip + data[pos + 1 :]
        elif kind < 0.4:
            data = data[:pos]
        else:
            data = data[:pos] + rng.choice(SNIPPETS) + data[pos:]
    return data


def test_fuzzed_recipes_parse_or_raise_user_error_quickly(tmp_path: Path) -> None:
    rng = random.Random(20240501)
    base = RECIPE.encode()
    path = tmp_path / "fuzz.yaml"
    outcomes = {"value": 0, "error": 0}
    slowest = 0.0
    start = time.perf_counter()
    for i in range(300):
        data = _mutate(rng, base)
        path.write_bytes(data)
        text = data.decode("utf-8", "surrogateescape")  # what sys.argv would hold
        for label in ("file", "--set"):
            t0 = time.perf_counter()
            try:
                if label == "file":
                    read_yaml_file(path)
                else:
                    parse_yaml_value(text, where="--set x=...")
                outcomes["value"] += 1
            except UserError as err:
                msg = str(err)
                assert "\n" not in msg, (i, label, data, msg)
                msg.encode("utf-8")
                outcomes["error"] += 1
            except Exception as err:  # the bug this test exists for
                pytest.fail(f"case {i} ({label}) raised {err!r} for {data[:200]!r}")
            slowest = max(slowest, time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    assert outcomes["value"] > 30 and outcomes["error"] > 100, outcomes
    assert slowest < 1.0, slowest
    assert elapsed < 10.0, elapsed  # ~2 s on a laptop; generous for a loaded CI machine


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    """YAML keeps the last of two equal keys without a word; a recipe's second `export:`
    would silently undo the first. A merge (`<<: *anchor`) overridden by a key is fine."""
    path = tmp_path / "r.yaml"
    path.write_text("version: 1\nexport: {precision: fp16}\nexport: {precision: fp32}\n")
    with pytest.raises(
        UserError,
        match=r"key 'export' appears twice in one mapping \(first on "
        r"line 2\) at line 3",
    ):
        read_yaml_file(path)
    path.write_text(
        "base: &b {precision: fp16, targets: [onnx]}\nexport:\n  <<: *b\n  precision: fp32\n"
    )
    assert read_yaml_file(path)["export"] == {"precision": "fp32", "targets": ["onnx"]}
