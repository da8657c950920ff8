"""The bundle manifest: what an exported bundle holds, written by export, read by runtime.

A bundle is a folder:

    manifest.json                      this schema
    text_encoder/model.onnx            one folder per component (+ model.onnx.data when
    text_encoder_2/model.onnx          the weights are stored as ONNX external data)
    unet/model.onnx | transformer/model.onnx
    vae_decoder/model.onnx
    tokenizer/tokenizer.json, tokenizer_2/...   read with the `tokenizers` library
    scheduler/scheduler_config.json    diffusers' scheduler config

`manifest.json` records the SHA-256 of every other file; `read_manifest` checks them all
before anything runs, so a truncated copy or an edited file fails loudly instead of
producing a wrong image. This module imports only the standard library.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimdiff.errors import UserError

__all__ = [
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "BundleError",
    "ComponentEntry",
    "Manifest",
    "read_manifest",
    "sha256_file",
]

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
_CHUNK = 1 << 20


class BundleError(UserError):
    """A bundle that is missing, incomplete, tampered with or from a newer slimdiff."""


@dataclass
class ComponentEntry:
    """One exported component (a graph file plus its IO contract)."""

    path: str  # relative to the bundle root, e.g. "unet/model.onnx"
    format: str  # "onnx" | "tensorrt" | "aoti"
    precision: str  # "fp32" | "fp16" | "int8" ...
    inputs: list[dict[str, Any]]  # [{"name", "dtype", "shape"}], shape entries int | axis name
    outputs: list[dict[str, Any]]
    parity: dict[str, Any] = field(default_factory=dict)  # {"rel_err", "tolerance", "passed"}
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific (TRT version, SM)


@dataclass
class Manifest:
    """A bundle's manifest.json, as data."""

    family: str
    pipeline: dict[str, Any]  # constants the runtime needs (see export/bundle.py)
    components: dict[str, ComponentEntry]
    files: dict[str, str]  # relative path -> sha256 hex
    source: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    slimdiff_version: str = ""

    def to_json(self) -> str:
        data = {
            "schema_version": self.schema_version,
            "slimdiff_version": self.slimdiff_version,
            "family": self.family,
            "source": self.source,
            "pipeline": self.pipeline,
            "components": {k: vars(v) for k, v in self.components.items()},
            "files": self.files,
        }
        return json.dumps(data, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        return cls(
            family=data["family"],
            pipeline=data["pipeline"],
            components={k: ComponentEntry(**v) for k, v in data["components"].items()},
            files=data["files"],
            source=data.get("source", {}),
            schema_version=data["schema_version"],
            slimdiff_version=data.get("slimdiff_version", ""),
        )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(bundle: str | Path, verify: bool = True) -> Manifest:
    """Read `bundle/manifest.json`; with `verify`, check every file's SHA-256 first."""
    root = Path(bundle)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise BundleError(
            f"bundle {root} not found; create one with `slimdiff export MODEL --out {root}`"
        )
    if not path.is_file():
        raise BundleError(
            f"{root} is not a slimdiff bundle (no {MANIFEST_NAME}); an interrupted export "
            "leaves none: export again"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BundleError(f"{path}: unreadable ({err}); export the bundle again") from None
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{path}: manifest schema {version!r}, this slimdiff reads {SCHEMA_VERSION}; "
            "export the bundle again with this version or upgrade slimdiff"
        )
    try:
        manifest = Manifest.from_dict(data)
    except (KeyError, TypeError) as err:
        raise BundleError(f"{path}: malformed manifest ({err}); export the bundle again") from None
    if verify:
        _verify_files(root, manifest)
    return manifest


def _verify_files(root: Path, manifest: Manifest) -> None:
    for rel, expected in manifest.files.items():
        file = root / rel
        if not file.is_file():
            raise BundleError(
                f"{root}: {rel} is missing; copy the whole bundle folder or export again"
            )
        if sha256_file(file) != expected:
            raise BundleError(
                f"{root}: {rel} does not match its SHA-256 in {MANIFEST_NAME} (changed or "
                "corrupted after export); export the bundle again"
            )
    for name, comp in manifest.components.items():
        if comp.path not in manifest.files:
            raise BundleError(
                f"{root}: component {name} ({comp.path}) is not hashed in the manifest"
            )
