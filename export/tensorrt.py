"""build.sh: the trtexec commands that build a bundle's TensorRT engines on the target device.

An engine is tied to the TensorRT version and the GPU it was built on, so a bundle ships
ONNX graphs and this script, which builds the same engines the trt backend builds on first
load (runtime/trt_build.py: the same profiles, the same precision choices), for devices
where the engines are built once by hand and run from C++ or trtexec, such as a Jetson
with JetPack's trtexec (/usr/src/tensorrt/bin/trtexec, not on PATH by default).

One trtexec line per ONNX component (AOTInductor components are skipped), all on one line
each so tools and tests can read them. Precision arguments depend on the TensorRT major
version, chosen by `TRT_MAJOR` (default 10, what JetPack 6 has): each component gets a
shell variable with its arguments for 10, replaced by those for 11 when TRT_MAJOR >= 11
(TensorRT 11 builds strongly typed networks only). Engines go to ./engines next to the
script, or to the folder given as $1; one timing cache there speeds up rebuilds on the
same device. The script is deterministic: same entries, same bytes.

UNVERIFIED: no trtexec on the development machine; the flags follow TensorRT 10.x's and
11.x's trtexec documentation.

Example:
    bash build.sh                        # engines/<component>.plan, TensorRT 10
    TRT_MAJOR=11 bash build.sh /data/eng # TensorRT 11, engines under /data/eng
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

from slimdiff.runtime.manifest import ComponentEntry
from slimdiff.runtime.trt_build import builder_flags, profile_shapes, qdq_form, shapes_arg

__all__ = ["SCRIPT_NAME", "build_script", "trtexec_shapes", "write_build_script"]

SCRIPT_NAME = "build.sh"

_HEADER = """\
#!/usr/bin/env bash
# Builds this bundle's TensorRT engines on the device that will run them, the same engines
# slimdiff's trt backend builds on first load (same shape profiles and precision choices):
# for example on a Jetson, with the trtexec that comes with JetPack.
#
#   bash build.sh [OUT]   engines go to OUT/<component>.plan, default ./engines beside
#                         this script; OUT/timing.cache speeds up rebuilds on this device
#   TRT_MAJOR=11 bash build.sh    TensorRT 11 (strongly typed networks only); default 10
#   TRTEXEC=/path/to/trtexec bash build.sh
#
# Engines only run with the TensorRT version and on the GPU model they were built with.
# Written by slimdiff export --target tensorrt (unverified: no trtexec where it was written).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${1:-$HERE/engines}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$HERE"
TRT_MAJOR="${TRT_MAJOR:-10}"
TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"
"""


def trtexec_shapes(profile_point: Mapping[str, Sequence[int]]) -> str:
    """One profile point as trtexec's --minShapes/--optShapes/--maxShapes value.

    Example:
        >>> trtexec_shapes({"sample": [1, 4, 8, 8], "timestep": [1]})
        'sample:1x4x8x8,timestep:1'
    """
    return shapes_arg(profile_point)


def _component_lines(name: str, entry: ComponentEntry) -> list[str]:
    shapes = profile_shapes(entry)
    points = {
        point: trtexec_shapes({n: s[i] for n, *s in shapes})
        for i, point in enumerate(("min", "opt", "max"))
    }
    form = qdq_form(entry)
    trt10 = " ".join(builder_flags(entry.precision, 10, form).trtexec_args)
    trt11 = " ".join(builder_flags(entry.precision, 11, form).trtexec_args)
    var = f"{name}_args"
    lines = [f"# {name}: {entry.precision}" + (f", Q/DQ in {form} form" if form else "")]
    if trt10 == trt11:
        lines.append(f'{var}="{trt10}"')
    else:
        lines.append(f'if [ "$TRT_MAJOR" -ge 11 ]; then {var}="{trt11}"; else {var}="{trt10}"; fi')
    # $<name>_args unquoted on purpose: it is zero or more flags, split on spaces.
    lines.append(
        f'"$TRTEXEC" --onnx={shlex.quote(entry.path)} --saveEngine="$OUT/{name}.plan" '
        f"--minShapes={points['min']} --optShapes={points['opt']} --maxShapes={points['max']} "
        f'${var} --timingCacheFile="$OUT/timing.cache" --skipInference'
    )
    return lines


def build_script(entries: Mapping[str, ComponentEntry]) -> str:
    """The text of build.sh for `entries` (component name -> manifest entry)."""
    body = [_HEADER]
    for name, entry in entries.items():
        if entry.format != "onnx":
            continue
        body.append("\n".join(_component_lines(name, entry)) + "\n")
    body.append('echo "engines written to $OUT"\n')
    return "\n".join(body)


def write_build_script(root: Path, entries: Mapping[str, ComponentEntry]) -> None:
    """Write root/build.sh (executable). The bundle folder is written atomically as a whole,
    so a plain write is enough; export hashes the script with the bundle's other files."""
    path = Path(root) / SCRIPT_NAME
    path.write_text(build_script(entries), encoding="utf-8")
    path.chmod(0o755)
