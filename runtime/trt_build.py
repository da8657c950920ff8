"""TensorRT engine builds: what goes into one and where it is cached.

Everything here is computed without TensorRT, from a bundle's manifest (the build itself,
which imports TensorRT and cuda-python, is runtime/trt_engine.py):

- `profile_shapes(entry)`: the optimization profile (min/opt/max per input) that
  export/profiles.py recorded for the component;
- `builder_flags(precision, trt_major, qdq_form)`: strongly or weakly typed network, the
  BuilderFlag names and the matching trtexec arguments (a `BuilderPlan`);
- `cache_key(...)`: SHA-256 of everything that makes two engines differ; the engine lives
  at <cache>/engines/<key>.plan with an `EngineRecord` beside it (<key>.json), never inside
  the bundle (a verified bundle is read-only at run time);
- `check_record(...)`: one line when a plan was built for another GPU, TensorRT or graph.

TensorRT plans are tied to the exact TensorRT version and the GPU's compute capability
(docs: "engines must be built on the deployment GPU"), so a bundle ships ONNX and the
engine is built where it runs: by the trt backend on first load (runtime/backends/trt.py),
or by the bundle's build.sh with trtexec (export/tensorrt.py). Both use `builder_flags`.

Example:
    >>> builder_flags("int8", 10, "tensorrt").trtexec_args
    ('--int8', '--fp16')
    >>> builder_flags("fp16", 11, None).trtexec_args
    ('--stronglyTyped',)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pydantic
from slimdiff.runtime.manifest import (
    MANIFEST_NAME,
    BundleError,
    ComponentEntry,
    Manifest,
    read_manifest,
)

from slimdiff.errors import UserError
from slimdiff.fsutil import atomic_write_text

__all__ = [
    "BuilderPlan",
    "EngineRecord",
    "ProfileShapes",
    "builder_flags",
    "cache_key",
    "cache_root",
    "check_record",
    "component_digest",
    "find_component",
    "normalize_sm",
    "onnx_component",
    "profile_json",
    "profile_shapes",
    "qdq_form",
    "read_record",
    "record_path",
    "shapes_arg",
    "write_record",
]

log = logging.getLogger(__name__)

# Bumped when this module changes what it builds for the same inputs: old engines then miss.
BUILDER_VERSION = 1
TRT_INSTALL = (
    "pip install tensorrt-cu12 cuda-python (on a Jetson, TensorRT 10 comes with JetPack: "
    "apt install python3-libnvinfer, then pip install cuda-python)"
)
REBUILD = "rebuild it (delete it, or run build.sh on this device)"

Shape = tuple[int, ...]
ProfileShapes = list[tuple[str, Shape, Shape, Shape]]  # (input, min, opt, max)


# ---------------------------------------------------------------- where things live


def cache_root() -> Path:
    """The user's slimdiff cache: $SLIMDIFF_CACHE, else $XDG_CACHE_HOME/slimdiff, else
    ~/.cache/slimdiff. Engines go to <root>/engines, TensorRT-RTX caches to <root>/trt-rtx."""
    if os.environ.get("SLIMDIFF_CACHE"):
        return Path(os.environ["SLIMDIFF_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "slimdiff"
    return Path.home() / ".cache" / "slimdiff"


def find_component(path: str | Path) -> tuple[Path, Manifest, str, ComponentEntry]:
    """The bundle that holds graph `path`: (root, manifest, component name, entry).

    The root is the nearest folder above `path` with a manifest.json whose components list
    `path`. The manifest is read without re-hashing the files: the pipeline verified the
    bundle (open_bundle) just before it loads components; direct callers verify first.
    """
    path = Path(path)
    for root in list(path.parents)[:8]:
        if not (root / MANIFEST_NAME).is_file():
            continue
        rel = path.relative_to(root).as_posix()
        manifest = read_manifest(root, verify=False)
        for name, entry in manifest.components.items():
            if entry.path == rel:
                return root, manifest, name, entry
        break
    raise BundleError(
        f"{path} is not a component of a bundle (no manifest.json above it lists it); the "
        "TensorRT backends build engines from bundles written by `slimdiff export`"
    )


def onnx_component(path: str | Path) -> tuple[str, ComponentEntry, str]:
    """(component name, entry, component digest) for the ONNX graph `path` inside a bundle: what
    both TensorRT backends key their engines by; another format is a BundleError."""
    path = Path(path)
    _, manifest, name, entry = find_component(path)
    if entry.format != "onnx":
        raise BundleError(f"{path}: component {name} is {entry.format}, not an ONNX graph")
    return name, entry, component_digest(manifest, entry)


def component_digest(manifest: Manifest, entry: ComponentEntry) -> str:
    """SHA-256 over the graph file and everything in its folder (its external data), from
    the manifest's per-file hashes: what an engine built from this graph depends on."""
    if entry.path not in manifest.files:
        raise BundleError(f"{entry.path} is not listed in the manifest's files; export again")
    folder = entry.path.rpartition("/")[0]
    listed = sorted(
        (rel, sha)
        for rel, sha in manifest.files.items()
        if rel == entry.path or (folder and rel.startswith(folder + "/"))
    )
    text = "".join(f"{sha}  {rel}\n" for rel, sha in listed)
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------- profile and flags


def profile_shapes(entry: ComponentEntry) -> ProfileShapes:
    """[(input, min, opt, max)] in the graph's input order, from the manifest's profile.

    Example:
        >>> profile_shapes(manifest.components["vae_decoder"])     # doctest: +SKIP
        [('latent_sample', (1, 4, 8, 8), (1, 4, 16, 16), (1, 4, 24, 24))]
    """
    if entry.profile is None:
        raise BundleError(
            f"{entry.path}: the manifest has no shape profile (the bundle was exported by an "
            "older slimdiff); export it again (`slimdiff export --target tensorrt`)"
        )
    out: ProfileShapes = []
    for spec in entry.inputs:
        name = spec["name"]
        points = []
        for point in ("min", "opt", "max"):
            shape = entry.profile[point].get(name)
            if shape is None or len(shape) != len(spec["shape"]):
                raise BundleError(
                    f"{entry.path}: the profile's {point} shape for input {name!r} is "
                    f"{'missing' if shape is None else shape}; export the bundle again"
                )
            points.append(tuple(int(d) for d in shape))
        lo, opt, hi = points
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)):
            raise BundleError(
                f"{entry.path}: input {name!r} has profile min {list(lo)}, opt {list(opt)}, "
                f"max {list(hi)}, not min <= opt <= max; export the bundle again"
            )
        out.append((name, lo, opt, hi))
    return out


def shapes_arg(point: Mapping[str, Sequence[int]]) -> str:
    """One profile point as trtexec's --minShapes and TensorRT-RTX's nv_profile_*_shapes
    take it: "sample:2x4x16x16,timestep:2" (rank-0 inputs are static: left out).

    Example:
        >>> shapes_arg({"sample": [2, 4, 16, 16], "timestep": [2]})
        'sample:2x4x16x16,timestep:2'
    """
    return ",".join(
        f"{name}:{'x'.join(str(int(d)) for d in shape)}" for name, shape in point.items() if shape
    )


@dataclass(frozen=True)
class BuilderPlan:
    """How TensorRT builds one graph: network typing, BuilderFlag names, trtexec arguments."""

    strongly_typed: bool
    flags: tuple[str, ...]  # trt.BuilderFlag member names, e.g. ("INT8", "FP16")
    trtexec_args: tuple[str, ...]


_STRONG = BuilderPlan(True, (), ("--stronglyTyped",))
_WEAK = {
    "fp32": BuilderPlan(False, (), ()),
    # Explicit quantization: the Q/DQ pairs decide which layers run int8; the FP16 flag
    # lets the layers between them run fp16, as ModelOpt's int8 diffusion engines do.
    "int8": BuilderPlan(False, ("INT8", "FP16"), ("--int8", "--fp16")),
    # TensorRT's INT4 is weight-only block quantization (INT4-AWQ) on MatMul weights; these
    # graphs quantize weights per output channel and activations to int8, so int4 weights
    # (stored as int8 constants in the tensorrt Q/DQ form) run through the int8 kernels.
    "int4": BuilderPlan(False, ("INT8", "FP16"), ("--int8", "--fp16")),
}


def qdq_form(entry: ComponentEntry) -> str | None:
    """The Q/DQ dialect of a quantized graph ("ort" or "tensorrt"); None when not recorded."""
    return entry.extra.get("quantization", {}).get("qdq_form")


def builder_flags(precision: str, trt_major: int, qdq_form: str | None = None) -> BuilderPlan:
    """The build for a graph of `precision` on TensorRT `trt_major`.

    TensorRT 11 has strongly typed networks only (its precision flags are gone). On
    TensorRT 10 (Jetson JetPack 6 has 10.3): fp16 and bf16 graphs are built strongly typed
    too, since the exporter already typed them (float16 weights and compute, float32 IO):
    strong typing builds what export checked against torch, where weak typing with --fp16
    would let TensorRT retype layers by speed (and NVIDIA deprecated weak typing in 10.12).
    fp32 graphs get no flags; int8/int4 Q/DQ graphs get INT8 + FP16 (see _WEAK). On 11 an
    int8 graph's float layers keep the exporter's dtype (float32 unless exported as fp16).

    Quantized graphs must be in TensorRT's symmetric Q/DQ form: onnxruntime's (asymmetric
    uint8 activations with zero points) is refused with one line.
    """
    if precision not in ("fp32", "fp16", "bf16", "int8", "int4"):
        raise ValueError(f"unknown precision {precision!r}")
    if trt_major < 10:
        raise UserError(
            f"TensorRT {trt_major} is too old: slimdiff builds engines with TensorRT 10 or "
            "newer (JetPack 6.1+ on a Jetson)"
        )
    if precision in ("int8", "int4") and qdq_form != "tensorrt":
        form = f"in {qdq_form!r} Q/DQ form" if qdq_form else "without a recorded Q/DQ form"
        raise UserError(
            f"this {precision} graph is {form} (onnxruntime's asymmetric uint8 zero points), "
            "which TensorRT cannot build: export with `--target tensorrt` (or `--qdq tensorrt`)"
        )
    if trt_major >= 11 or precision in ("fp16", "bf16"):
        return _STRONG
    return _WEAK[precision]


# ---------------------------------------------------------------- cache key and record


def normalize_sm(value: str | tuple[int, int]) -> str:
    """A compute capability as "sm_90": from "9.0", "sm_90", "sm90" or (9, 0).

    Example:
        >>> normalize_sm("8.7"), normalize_sm((12, 0))
        ('sm_87', 'sm_120')
    """
    if isinstance(value, tuple):
        return f"sm_{int(value[0])}{int(value[1])}"
    text = str(value).strip().lower()
    if m := re.fullmatch(r"(\d+)\.(\d)", text):
        return f"sm_{m[1]}{m[2]}"
    if m := re.fullmatch(r"sm_?(\d{2,3})", text):
        return f"sm_{m[1]}"
    raise ValueError(f"{value!r} is not a compute capability (like '9.0' or 'sm_90')")


def profile_json(profile: ProfileShapes) -> list[list[Any]]:
    return [[name, list(lo), list(opt), list(hi)] for name, lo, opt, hi in profile]


def cache_key(
    onnx_sha256: str,
    trt_version: str,
    compute_capability: str | tuple[int, int],
    plan: BuilderPlan,
    profile: ProfileShapes,
) -> str:
    """SHA-256 hex of a canonical JSON of what makes an engine differ: the graph (and its
    external data), the exact TensorRT version, the GPU's compute capability, the typing
    and flags, the optimization profile, and this builder's version."""
    data = {
        "builder": BUILDER_VERSION,
        "onnx_sha256": onnx_sha256,
        "tensorrt_version": trt_version,
        "compute_capability": normalize_sm(compute_capability),
        "strongly_typed": plan.strongly_typed,
        "flags": sorted(plan.flags),
        "profile": profile_json(profile),
    }
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class EngineRecord(pydantic.BaseModel):
    """What a cached .plan was built from and for; saved as <key>.json beside it."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    format: Literal[1] = 1
    key: str
    onnx_sha256: str  # component_digest: the graph file and its external data
    tensorrt_version: str  # trt.__version__, e.g. "10.3.0.30"
    compute_capability: str  # "sm_87"
    precision: str
    strongly_typed: bool
    flags: tuple[str, ...]
    profile: list[tuple[str, list[int], list[int], list[int]]]
    plan_sha256: str
    plan_bytes: int
    built_at: str  # ISO 8601, UTC


def record_path(plan_path: Path) -> Path:
    return plan_path.with_suffix(".json")


def write_record(path: Path, record: EngineRecord) -> None:
    atomic_write_text(path, record.model_dump_json(indent=2) + "\n")


def read_record(path: Path) -> EngineRecord:
    """The record at `path`; one UserError line if it cannot be read."""
    try:
        return EngineRecord.model_validate_json(path.read_bytes())
    except (OSError, pydantic.ValidationError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"engine record {path} is unreadable ({first}); delete it and its .plan to rebuild"
        ) from None


def check_record(
    record: EngineRecord,
    trt_version: str,
    compute_capability: str | tuple[int, int],
    onnx_sha256: str,
    plan_path: Path | str = "",
) -> None:
    """Refuse, with one line, a plan built for another GPU, TensorRT version or graph."""
    where = plan_path or record.key
    here = normalize_sm(compute_capability)
    if (record.compute_capability, record.tensorrt_version) != (here, trt_version):
        raise UserError(
            f"engine {where} was built for {record.compute_capability} with TensorRT "
            f"{record.tensorrt_version}; this is {here} with TensorRT {trt_version}: {REBUILD}"
        )
    if record.onnx_sha256 != onnx_sha256:
        raise UserError(
            f"engine {where} was built from another graph (digest {record.onnx_sha256[:12]}, "
            f"this bundle's is {onnx_sha256[:12]}): {REBUILD}"
        )
