"""The tamperings tests/unit/test_bundle_tamper.py applies to copies of an exported
tiny:sd15 bundle: (id, tamper(bundle_dir), message fragment) in CASES, each of which must be
refused with a BundleError before any graph loads, and (id, tamper) in HARMLESS, which must
give the identical image.

Cases that need a file outside the bundle put it in `outside/`, beside the copy, so that
following the trick would "work" and only a guard can stop it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

SCHED = "scheduler/scheduler_config.json"
TOK = "tokenizer/tokenizer.json"
UNET = "unet/model.onnx"


def _data(b: Path) -> dict:
    return json.loads((b / "manifest.json").read_text())


def _write(b: Path, data: dict) -> None:
    (b / "manifest.json").write_text(json.dumps(data, indent=2))


def edit(fn):
    """A tampering that edits manifest.json's data with fn(data)."""

    def tamper(b: Path) -> None:
        data = _data(b)
        fn(data)
        _write(b, data)

    return tamper


def pipe(key, value):
    return edit(lambda d: d["pipeline"].__setitem__(key, value))


def enc(key, value):
    return edit(lambda d: d["pipeline"]["text_encoders"][0].__setitem__(key, value))


def unet(key, value):
    return edit(lambda d: d["components"]["unet"].__setitem__(key, value))


def raw(fn):
    """A tampering that rewrites manifest.json's bytes with fn(bytes)."""
    return lambda b: (b / "manifest.json").write_bytes(fn((b / "manifest.json").read_bytes()))


def replace_file(rel: str, content: bytes, rehash: bool = False):
    """Write `content` to `rel`; with `rehash`, fix its hash (a crafted, consistent bundle)."""

    def tamper(b: Path) -> None:
        (b / rel).write_bytes(content)
        if rehash:
            data = _data(b)
            data["files"][rel] = hashlib.sha256(content).hexdigest()
            _write(b, data)

    return tamper


def link_out(rel: str):
    """Move `rel` (file or folder) outside the bundle and leave a symlink to it."""

    def tamper(b: Path) -> None:
        target = b.parent / "outside" / rel.replace("/", "_")
        shutil.move(b / rel, target)
        os.symlink(target, b / rel)

    return tamper


def link_in(rel: str):
    """Replace `rel` by a symlink to a copy of it elsewhere inside the bundle."""

    def tamper(b: Path) -> None:
        shutil.move(b / rel, b / "elsewhere")
        os.symlink(b / "elsewhere", b / rel)

    return tamper


def unlisted(rel: str, then=None):
    """Drop `rel` from `files`, then optionally change the file (`then(path)`)."""

    def tamper(b: Path) -> None:
        edit(lambda d: d["files"].pop(rel))(b)
        if then:
            then(b / rel)

    return tamper


def deep(n: int) -> bytes:
    return b'{"schema_version": 2, "x": ' + b"[" * n + b"]" * n + b"}"


def _hard_link_out(b: Path, rel: str) -> None:
    # A hard link is a regular file: its bytes are hashed like any copy's.
    target = b.parent / "outside" / "linked"
    shutil.move(b / rel, target)
    (b / rel).hardlink_to(target)


def both(*tampers):
    return lambda b: [t(b) for t in tampers]


_UTF16 = raw(lambda s: s.decode().encode("utf-16"))
_SWAP = edit(
    lambda d: d["components"].update(
        unet=d["components"]["vae_decoder"], vae_decoder=d["components"]["unet"]
    )
)
_SWAP_PATHS = both(
    unet("path", "vae_decoder/model.onnx"),
    edit(lambda d: d["components"]["vae_decoder"].__setitem__("path", UNET)),
)

# (id, tampering, message fragment)
CASES = [
    # paths that leave the bundle, or are not plain relative POSIX paths
    ("path-dotdot", unet("path", "../outside/unet.onnx"), r"components.unet.path.*'\.\.' part"),
    ("path-absolute", unet("path", "/tmp/unet/model.onnx"), r"is absolute"),
    ("path-backslash", unet("path", "unet\\model.onnx"), r"contains '\\\\'"),
    ("path-nul", unet("path", "unet/model.onnx\x00"), r"contains"),
    ("path-dot", unet("path", "unet/./model.onnx"), r"'\.' or '\.\.' part"),
    ("path-empty-part", unet("path", "unet//model.onnx"), r"empty"),
    ("path-drive", unet("path", "C:/unet/model.onnx"), r"contains ':'"),
    ("path-other-folder", unet("path", "vae_decoder/model.onnx"), r"not inside the unet/ folder"),
    (
        "files-key-dotdot",
        edit(lambda d: d["files"].update({"../../etc/passwd": "0" * 64})),
        r"files\['\.\./\.\./etc/passwd'\] \(a key\)",
    ),
    (
        "files-key-absolute",
        edit(lambda d: d["files"].update({"/etc/passwd": "0" * 64})),
        r"absolute",
    ),
    ("files-key-trailing-slash", edit(lambda d: d["files"].update({"unet/": "0" * 64})), "empty"),
    ("tokenizer-dotdot", enc("tokenizer", "../outside"), r"tokenizer.*'\.\.' part"),
    ("tokenizer-absolute", enc("tokenizer", "/tmp/tokenizer"), r"absolute"),
    ("scheduler-dotdot", pipe("scheduler", "../scheduler_config.json"), r"'\.\.' part"),
    # symbolic links: none at all inside a bundle
    ("link-graph-out", link_out(UNET), r"unet/model.onnx is a symbolic link .*outside"),
    ("link-graph-folder-out", link_out("unet"), r"unet is a symbolic link .*outside"),
    ("link-tokenizer-out", link_out("tokenizer"), r"tokenizer is a symbolic link"),
    ("link-manifest-out", link_out("manifest.json"), r"manifest.json is a symbolic link"),
    ("link-scheduler-in", link_in(SCHED), r"scheduler_config.json is a symbolic link .*inside"),
    ("link-unread-file-out", link_out("tokenizer/tokenizer_config.json"), r"symbolic link"),
    (
        "link-beside-graph",
        lambda b: os.symlink("/etc/hostname", b / "unet/model.onnx.data"),
        r"unet/model.onnx.data is a symbolic link",
    ),
    # files the runtime reads but `files` does not list
    ("unlisted-tokenizer", unlisted(TOK), r"tokenizer/tokenizer.json is not listed in manifest"),
    ("unlisted-scheduler", unlisted(SCHED), r"scheduler_config.json is not listed in manifest"),
    (
        "unlisted-scheduler-edited",
        unlisted(SCHED, lambda p: p.write_text(p.read_text().replace("1000", "10"))),
        r"scheduler.*not listed",
    ),
    ("unlisted-graph", unlisted(UNET), r"unet/model.onnx is not listed"),
    (
        "unlisted-beside-graph",
        replace_file("unet/model.onnx.data", b"\0" * 64),
        r"unet/model.onnx.data is not listed in manifest.json files, yet it sits in",
    ),
    (
        "unlisted-in-subfolder",
        both(lambda b: (b / "unet/sub").mkdir(), replace_file("unet/sub/w.bin", b"x")),
        r"unet/sub/w.bin",
    ),
    ("fifo-beside-graph", lambda b: os.mkfifo(b / "unet/pipe"), r"not a regular file or folder"),
    ("tokenizer-folder-unlisted", enc("tokenizer", "tokenizer_x"), r"tokenizer_x/tokenizer.json"),
    (
        "files-lists-manifest",
        edit(lambda d: d["files"].update({"manifest.json": "0" * 64})),
        r"cannot hold its own hash",
    ),
    (
        "files-lists-missing",
        edit(lambda d: d["files"].update({"unet/x.bin": "0" * 64})),
        r"unet/x.bin is missing",
    ),
    (
        "files-lists-folder",
        edit(lambda d: d["files"].update({"unet": "0" * 64})),
        r"unet is not a regular file",
    ),
    # hashes and file contents
    ("hash-wrong", edit(lambda d: d["files"].update({UNET: "0" * 64})), r"does not match"),
    ("hash-short", edit(lambda d: d["files"].update({UNET: "abc"})), r"should match pattern"),
    ("hash-upper", edit(lambda d: d["files"].update({UNET: d["files"][UNET].upper()})), "pattern"),
    (
        "graph-truncated",
        lambda b: (b / UNET).write_bytes((b / UNET).read_bytes()[:1000]),
        r"unet/model.onnx does not match its SHA-256",
    ),
    ("tokenizer-edited", lambda b: (b / TOK).write_text((b / TOK).read_text() + " "), "SHA-256"),
    ("tokenizer-empty-rehashed", replace_file(TOK, b"", rehash=True), "not a readable tokenizer"),
    ("tokenizer-garbage-rehashed", replace_file(TOK, b"\xff\xfe{", rehash=True), "tokenizer"),
    ("scheduler-garbage-rehashed", replace_file(SCHED, b"{not json", rehash=True), "valid JSON"),
    ("scheduler-array-rehashed", replace_file(SCHED, b"[]", rehash=True), "not a JSON object"),
    ("scheduler-deep-rehashed", replace_file(SCHED, deep(50_000), rehash=True), "nested"),
    (
        "scheduler-class-rehashed",
        replace_file(SCHED, b'{"_class_name": "X"}', rehash=True),
        r"scheduler config not supported",
    ),
    (
        "scheduler-values-rehashed",
        replace_file(
            SCHED,
            b'{"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 0}',
            rehash=True,
        ),
        r"scheduler config not supported",
    ),
    # values
    ("vae-scaling-zero", pipe("vae_scaling_factor", 0), r"vae_scaling_factor.*greater than 0"),
    ("vae-scaling-negative", pipe("vae_scaling_factor", -0.2), r"vae_scaling_factor"),
    ("vae-scaling-string", pipe("vae_scaling_factor", "0.18"), r"valid number"),
    (
        "vae-scaling-nan",
        raw(lambda s: s.replace(b'"vae_scaling_factor": 0.18215', b'"vae_scaling_factor": NaN')),
        r"NaN",
    ),
    (
        "vae-scaling-huge",
        raw(lambda s: s.replace(b'"vae_scaling_factor": 0.18215', b'"vae_scaling_factor": 1e999')),
        "range",
    ),
    ("latent-channels-9", pipe("latent_channels", 9), r"channels are not 9"),
    ("latent-channels-0", pipe("latent_channels", 0), r"latent_channels"),
    ("max-length-5", enc("max_length", 5), r"length 77 is not the text encoders' 5 tokens"),
    ("max-length-past-positions", enc("max_length", 100), r"exceeds the encoder's 77 positions"),
    ("max-length-zero", enc("max_length", 0), r"max_length"),
    ("pad-token-negative", enc("pad_token_id", -1), r"pad_token_id"),
    ("pad-token-string", enc("pad_token_id", "1"), r"pad_token_id.*valid integer"),
    ("pad-token-unknown", enc("pad_token_id", 999_999), r"pad_token_id 999999 is not in"),
    ("vae-scale-3", pipe("vae_scale_factor", 3), r"vae_scale_factor.*not a power of two"),
    ("vae-scale-bool", pipe("vae_scale_factor", True), r"vae_scale_factor.*valid integer"),
    ("kind-field-deleted", edit(lambda d: d["pipeline"]["kind"].pop("sigmas")), r"sigmas missing"),
    (
        "kind-pooled-empty",
        edit(lambda d: d["pipeline"]["kind"].update(pooled_input="")),
        r"pooled_input.*should match pattern",
    ),
    ("parity-deleted", edit(lambda d: d["components"]["unet"].pop("parity")), r"parity.*required"),
    ("default-steps-zero", pipe("default_steps", 0), r"default_steps"),
    ("default-steps-float", pipe("default_steps", 1.5), r"default_steps.*valid integer"),
    ("default-guidance-negative", pipe("default_guidance", -1.0), r"default_guidance"),
    ("default-size-odd", pipe("default_size", [130, 128]), r"not a multiple of size_multiple"),
    ("default-size-short", pipe("default_size", [128]), r"default_size"),
    ("default-size-object", pipe("default_size", {"h": 128}), r"default_size"),
    ("size-multiple-off-grid", pipe("size_multiple", 4), r"latent grid"),
    ("uses-cfg-int", pipe("uses_cfg", 1), r"uses_cfg.*valid boolean"),
    (
        "kind-extra-input",
        edit(lambda d: d["pipeline"]["kind"].update(extra_inputs=["time_ids"])),
        r"is not what a unet pipeline feeds",
    ),
    (
        "kind-sample-input",
        edit(lambda d: d["pipeline"]["kind"].update(sample_input="latent")),
        r"not what a unet pipeline feeds",
    ),
    ("kind-unknown-key", edit(lambda d: d["pipeline"]["kind"].update(evil=1)), r"Extra inputs"),
    ("kind-packing-zero", edit(lambda d: d["pipeline"]["kind"].update(latent_packing=0)), "pack"),
    (
        "kind-divisor-zero",
        edit(lambda d: d["pipeline"]["kind"].update(timestep_divisor=0)),
        r"timestep_divisor",
    ),
    ("encoder-output-missing", enc("outputs", ["pooler_output"]), r"per-token hidden states"),
    ("encoder-kind", enc("kind", "bert"), r"kind"),
    (
        "dtype-unknown",
        edit(lambda d: d["components"]["unet"]["inputs"][0].update(dtype="f8")),
        r"dtype",
    ),
    (
        "shape-zero",
        edit(lambda d: d["components"]["unet"]["inputs"][0].update(shape=["B", 0])),
        r"greater than or equal to 1",
    ),
    (
        "shape-bool",
        edit(lambda d: d["components"]["unet"]["inputs"][0].update(shape=[True])),
        r"shape",
    ),
    (
        "shape-bad-axis",
        edit(lambda d: d["components"]["unet"]["inputs"][0].update(shape=["a b"])),
        r"shape",
    ),
    ("format-unknown", unet("format", "pickle"), r"format"),
    # wrong types and structure
    ("denoiser-null", pipe("denoiser", None), r"denoiser"),
    ("pipeline-is-null", edit(lambda d: d.update(pipeline=None)), r"'pipeline'.*object"),
    ("pipeline-is-list", edit(lambda d: d.update(pipeline=[])), r"'pipeline'.*object"),
    ("encoders-object", pipe("text_encoders", {}), r"text_encoders.*array"),
    ("components-list", edit(lambda d: d.update(components=[])), r"components"),
    ("extra-top-key", edit(lambda d: d.update(evil=1)), r"'evil': Extra inputs"),
    ("extra-pipeline-key", pipe("evil", 1), r"pipeline.evil"),
    ("extra-component-key", unet("evil", 1), r"components.unet.evil"),
    ("missing-field", edit(lambda d: d["pipeline"].pop("uses_cfg")), r"uses_cfg.*required"),
    ("no-vae", edit(lambda d: d["components"].pop("vae_decoder")), r"no vae_decoder entry"),
    (
        "unused-component",
        edit(lambda d: d["components"].update(safety=d["components"]["vae_decoder"])),
        r"components.safety.*not a component this pipeline uses",
    ),
    ("denoiser-renamed", pipe("denoiser", "transformer"), r"no transformer entry"),
    ("swapped-components", _SWAP, r"components.unet"),
    ("swapped-paths", _SWAP_PATHS, r"not inside the unet/ folder"),
    # versions
    ("version-1", edit(lambda d: d.update(schema_version=1)), r"version 1 is from an older"),
    ("version-3", edit(lambda d: d.update(schema_version=3)), r"newer slimdiff; .*upgrade"),
    ("version-true", edit(lambda d: d.update(schema_version=True)), r"not an integer"),
    ("version-string", edit(lambda d: d.update(schema_version="2")), r"not an integer"),
    ("version-missing", edit(lambda d: d.pop("schema_version")), r"schema_version is missing"),
    # encodings and garbage
    ("utf16", _UTF16, r"not UTF-8 JSON \(it starts with a byte-order mark"),
    ("utf16-no-bom", raw(lambda s: s.decode().encode("utf-16-le")), r"not UTF-8 JSON"),
    ("utf8-bom", raw(lambda s: b"\xef\xbb\xbf" + s), r"byte-order mark"),
    ("invalid-utf8", raw(lambda s: s.replace(b"tiny:sd15", b"tiny:\xffsd15")), "not UTF-8 JSON"),
    ("empty", raw(lambda s: b""), r"not valid JSON"),
    ("truncated", raw(lambda s: s[: len(s) // 2]), r"not valid JSON"),
    ("garbage", raw(lambda s: np.random.default_rng(0).bytes(4000)), r"not (UTF-8|valid) JSON"),
    ("top-array", raw(lambda s: b"[" + s + b"]"), r"top level is a JSON array"),
    ("top-null", raw(lambda s: b"null"), r"top level is a JSON null"),
    ("top-string", raw(lambda s: b'"manifest"'), r"top level is a JSON string"),
    ("deep-100000", raw(lambda s: deep(100_000)), r"nested too deeply"),
    ("deep-40", edit(lambda d: d.update(source=json.loads("[" * 40 + "]" * 40))), r"deeper than"),
    ("huge", raw(lambda s: s + b" " * (5 << 20)), r"more than a manifest may be"),
    (
        "duplicate-key",
        raw(lambda s: s.replace(b'"files": {', b'"files": {}, "files": {', 1)),
        r"'files' appears twice",
    ),
    (
        "manifest-folder",
        lambda b: ((b / "manifest.json").unlink(), (b / "manifest.json").mkdir()),
        r"manifest.json is not a regular file",
    ),
    ("manifest-missing", lambda b: (b / "manifest.json").unlink(), r"not a slimdiff bundle"),
]


HARMLESS = [
    (
        "unread-file-unlisted-and-edited",
        unlisted("tokenizer/tokenizer_config.json", lambda p: p.write_text(" {}\n")),
    ),
    ("unread-file-added", replace_file("README.txt", b"deployed 2026-12-01\n")),
    ("manifest-reformatted", raw(lambda s: json.dumps(json.loads(s), indent=4).encode())),
    ("graph-hard-linked-from-outside", lambda b: _hard_link_out(b, UNET)),
]
