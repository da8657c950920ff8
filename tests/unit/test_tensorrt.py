"""TensorRT engine builds without TensorRT: profiles, flags, cache keys, records, build.sh.

TensorRT cannot be installed on CI machines; what decides an engine (runtime/trt_build.py),
the cache lookup that refuses plans built elsewhere (runtime/backends/trt.py) and the
trtexec script a bundle ships (export/tensorrt.py) are computed here. The build and the
session themselves run in tests/gpu/test_trt_parity.py.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydantic
import pytest
from slimdiff.runtime.backends.trt import (
    DeviceInfo,
    TensorRTBackend,
    check_in_profile,
)
from slimdiff.runtime.manifest import BundleError, ComponentEntry, read_manifest, sha256_file
from slimdiff.runtime.trt_build import (
    BuilderPlan,
    EngineRecord,
    builder_flags,
    cache_key,
    cache_root,
    check_record,
    component_digest,
    normalize_sm,
    profile_shapes,
    read_record,
    shapes_arg,
    write_record,
)
from slimdiff.runtime.trt_engine import import_cudart

from slimdiff.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROFILE = {
    "min": {"sample": [1, 4, 8, 8], "timestep": [1]},
    "opt": {"sample": [2, 4, 16, 16], "timestep": [2]},
    "max": {"sample": [2, 4, 24, 24], "timestep": [2]},
}


def entry(precision="fp32", profile=PROFILE, extra=None) -> ComponentEntry:
    return ComponentEntry(
        path="unet/model.onnx",
        format="onnx",
        precision=precision,
        inputs=[
            {"name": "sample", "dtype": "float32", "shape": ["B", 4, "H", "W"]},
            {"name": "timestep", "dtype": "float32", "shape": ["B"]},
        ],
        outputs=[{"name": "out_sample", "dtype": "float32", "shape": ["B", 4, "H", "W"]}],
        parity={},
        extra=extra or {},
        profile=profile,
    )


# ---------------------------------------------------------------- profiles and flags


def test_profile_shapes_follow_the_graph_inputs():
    assert profile_shapes(entry()) == [
        ("sample", (1, 4, 8, 8), (2, 4, 16, 16), (2, 4, 24, 24)),
        ("timestep", (1,), (2,), (2,)),
    ]
    assert shapes_arg(PROFILE["max"]) == "sample:2x4x24x24,timestep:2"


def test_a_bundle_without_profiles_is_refused_with_export_again():
    with pytest.raises(BundleError, match=r"no shape profile .*export it again"):
        profile_shapes(entry(profile=None))


def test_a_profile_with_min_above_max_is_refused():
    bad = {**PROFILE, "min": {"sample": [4, 4, 8, 8], "timestep": [1]}}
    with pytest.raises(pydantic.ValidationError, match=r"min .* <= opt <= max fails"):
        entry(profile=bad)  # the manifest's schema refuses it (runtime/manifest.py)
    unchecked = entry().model_copy(update={"profile": bad})  # built around the schema
    with pytest.raises(BundleError, match="not min <= opt <= max"):
        profile_shapes(unchecked)


STRONG = BuilderPlan(True, (), ("--stronglyTyped",))
INT8_WEAK = BuilderPlan(False, ("INT8", "FP16"), ("--int8", "--fp16"))
EXPECTED = {
    ("fp32", 10): BuilderPlan(False, (), ()),
    ("fp16", 10): STRONG,
    ("bf16", 10): STRONG,
    ("int8", 10): INT8_WEAK,
    ("int4", 10): INT8_WEAK,
    **{(p, 11): STRONG for p in ("fp32", "fp16", "bf16", "int8", "int4")},
}


@pytest.mark.parametrize(("precision", "major"), sorted(EXPECTED))
def test_builder_flags_per_precision_and_tensorrt_major(precision, major):
    form = "tensorrt" if precision in ("int8", "int4") else None
    assert builder_flags(precision, major, form) == EXPECTED[precision, major]
    assert builder_flags(precision, 12, form) == STRONG  # later majors: strongly typed too


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("form", ["ort", None])
def test_onnxruntime_qdq_graphs_are_refused_with_the_export_flag(precision, form):
    for major in (10, 11):
        with pytest.raises(UserError, match=r"export with `--target tensorrt` \(or `--qdq"):
            builder_flags(precision, major, form)


def test_tensorrt_before_10_is_refused():
    with pytest.raises(UserError, match="TensorRT 8 is too old"):
        builder_flags("fp16", 8)


# ---------------------------------------------------------------- cache key and record


def test_compute_capabilities_are_normalized():
    assert [normalize_sm(v) for v in ("9.0", "sm_90", "SM90", (9, 0))] == ["sm_90"] * 4
    assert normalize_sm("8.7") == "sm_87" and normalize_sm("12.0") == "sm_120"
    with pytest.raises(ValueError, match="not a compute capability"):
        normalize_sm("hopper")


def test_cache_key_is_stable_and_changes_with_each_input():
    profile = profile_shapes(entry())
    base = ("a" * 64, "10.3.0.30", "sm_87", builder_flags("fp16", 10), profile)
    key = cache_key(*base)
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    as_lists = [(n, list(lo), list(o), list(hi)) for n, lo, o, hi in profile]
    assert cache_key("a" * 64, "10.3.0.30", "8.7", builder_flags("fp16", 10), as_lists) == key
    bigger = [("sample", (1, 4, 8, 8), (2, 4, 16, 16), (2, 4, 32, 32)), profile[1]]
    variants = [
        ("b" * 64, *base[1:]),
        (base[0], "10.3.0.31", *base[2:]),
        (*base[:2], "sm_86", *base[3:]),
        (*base[:3], builder_flags("fp32", 10), profile),
        (*base[:4], bigger),
    ]
    keys = {cache_key(*v) for v in variants}
    assert len(keys) == len(variants) and key not in keys


def record(**changes) -> EngineRecord:
    fields = {
        "key": "k" * 64,
        "onnx_sha256": "a" * 64,
        "tensorrt_version": "10.3.0.30",
        "compute_capability": "sm_87",
        "precision": "int8",
        "strongly_typed": False,
        "flags": ("INT8", "FP16"),
        "profile": [["sample", [1, 4, 8, 8], [2, 4, 16, 16], [2, 4, 24, 24]]],
        "plan_sha256": "c" * 64,
        "plan_bytes": 123,
        "built_at": "2026-01-02T03:04:05+00:00",
    }
    return EngineRecord(**{**fields, **changes})


def test_engine_record_round_trips_through_its_json_sidecar(tmp_path):
    path = tmp_path / "k.json"
    write_record(path, record())
    assert read_record(path) == record()
    assert [p.name for p in tmp_path.iterdir()] == ["k.json"]  # no temp file left


def test_an_unreadable_record_is_one_line_saying_delete(tmp_path):
    path = tmp_path / "k.json"
    path.write_text('{"format": 1, "key": 3}')
    with pytest.raises(UserError) as err:
        read_record(path)
    assert "\n" not in str(err.value) and "delete it and its .plan" in str(err.value)


def test_check_record_names_what_the_plan_was_built_for():
    ok = record()
    check_record(ok, "10.3.0.30", "8.7", "a" * 64)  # same device and graph: no error
    with pytest.raises(UserError) as err:
        check_record(ok, "10.7.0.23", "sm_90", "a" * 64, "/c/engines/k.plan")
    assert str(err.value) == (
        "engine /c/engines/k.plan was built for sm_87 with TensorRT 10.3.0.30; this is sm_90 "
        "with TensorRT 10.7.0.23: rebuild it (delete it, or run build.sh on this device)"
    )
    with pytest.raises(UserError, match=r"built from another graph \(digest aaaaaaaaaaaa"):
        check_record(ok, "10.3.0.30", "sm_87", "b" * 64)


def test_cache_root_prefers_slimdiff_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SLIMDIFF_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "slimdiff"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "slimdiff"
    monkeypatch.setenv("SLIMDIFF_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


def test_feeds_outside_the_profile_name_the_input_and_the_export_flags():
    lo, hi = (1, 4, 8, 8), (2, 4, 24, 24)
    check_in_profile("sample", (2, 4, 16, 16), lo, hi, Path("b/unet/model.onnx"))
    with pytest.raises(UserError) as err:
        check_in_profile("sample", (1, 4, 32, 32), lo, hi, Path("b/unet/model.onnx"))
    assert str(err.value) == (
        "b/unet/model.onnx: input 'sample' has shape 1x4x32x32, outside the range this bundle "
        "was built for (1x4x8x8 .. 2x4x24x24); export the bundle with --min-size/--max-size "
        "covering the sizes you run"
    )
    with pytest.raises(UserError, match="has shape 4x32x32"):
        check_in_profile("sample", (4, 32, 32), lo, hi, Path("x"))


# ---------------------------------------------------------------- missing libraries


def test_missing_tensorrt_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(UserError) as err:
        TensorRTBackend()
    assert "pip install tensorrt-cu12 cuda-python" in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_cuda_python_names_the_package(monkeypatch):
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(UserError, match=r"needs cuda-python .*pip install tensorrt-cu12 cuda"):
        import_cudart()


# ---------------------------------------------------------------- a real tensorrt bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from slimdiff.export import export_bundle

    from slimdiff.models import load_model

    out = tmp_path_factory.mktemp("trt") / "b"
    export_bundle(load_model("tiny:sd15"), out, target="tensorrt")
    return out


def trtexec_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith('"$TRTEXEC" ')]


def option(line: str, name: str) -> str:
    return re.search(rf"--{name}=(\S+)", line)[1]


def test_build_sh_lines_match_the_manifest(bundle):
    manifest = read_manifest(bundle)
    script = (bundle / "build.sh").read_text()
    assert script.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in script
    assert manifest.files["build.sh"] == sha256_file(bundle / "build.sh")
    lines = trtexec_lines(script)
    onnx = {n: e for n, e in manifest.components.items() if e.format == "onnx"}
    assert len(lines) == len(onnx) == 3
    for line in lines:
        name, entry = next((n, e) for n, e in onnx.items() if e.path == option(line, "onnx"))
        assert entry.path in manifest.files
        assert option(line, "saveEngine") == f'"$OUT/{name}.plan"'
        for point in ("min", "opt", "max"):
            assert option(line, f"{point}Shapes") == ",".join(
                f"{i}:{'x'.join(map(str, s))}" for i, s in entry.profile[point].items()
            )


def test_build_sh_runs_trtexec_with_the_flags_for_each_tensorrt_major(bundle, tmp_path):
    # A stand-in trtexec that records its arguments: checks the script's shell (quoting,
    # variables, TRT_MAJOR), not TensorRT.
    log = tmp_path / "argv.txt"
    stub = tmp_path / "trtexec"
    stub.write_text(f'#!/usr/bin/env bash\nprintf "%s " "$@" >> {log}\necho >> {log}\n')
    stub.chmod(0o755)
    manifest = read_manifest(bundle)
    unet = manifest.components["unet"].profile
    for major, flags in (("10", ""), ("11", "--stronglyTyped ")):
        log.write_text("")
        env = {**os.environ, "TRTEXEC": str(stub), "TRT_MAJOR": major}
        out = tmp_path / f"eng{major}"
        subprocess.run(["bash", str(bundle / "build.sh"), str(out)], env=env, check=True)
        calls = log.read_text().splitlines()
        assert len(calls) == 3 and out.is_dir()
        assert calls[1] == (
            f"--onnx=unet/model.onnx --saveEngine={out}/unet.plan "
            f"--minShapes={shapes_arg(unet['min'])} --optShapes={shapes_arg(unet['opt'])} "
            f"--maxShapes={shapes_arg(unet['max'])} {flags}"
            f"--timingCacheFile={out}/timing.cache --skipInference "
        )
    assert not (bundle / "engines").exists()  # $1 given: nothing written into the bundle
    # A relative OUT is the caller's, not the bundle's.
    subprocess.run(["bash", str(bundle / "build.sh"), "rel"], env=env, cwd=tmp_path, check=True)
    assert f"--saveEngine={tmp_path}/rel/unet.plan" in log.read_text()


def test_component_digest_covers_the_graph_folder(bundle):
    manifest = read_manifest(bundle)
    unet = manifest.components["unet"]
    listed = sorted(p for p in manifest.files if p.startswith("unet/"))
    text = "".join(f"{manifest.files[p]}  {p}\n" for p in listed)
    assert component_digest(manifest, unet) == hashlib.sha256(text.encode()).hexdigest()


def plant(backend: TensorRTBackend, graph: Path, **changes) -> Path:
    """Write a plan (random bytes) and its record where `backend` looks for `graph`'s."""
    where = backend.locate(graph)
    data = np.random.default_rng(0).bytes(256)
    where.plan_path.parent.mkdir(parents=True)
    where.plan_path.write_bytes(data)
    fields = {
        "key": where.key,
        "onnx_sha256": where.onnx_sha256,
        "tensorrt_version": backend.device.tensorrt_version,
        "compute_capability": backend.device.compute_capability,
        "precision": where.entry.precision,
        "strongly_typed": where.plan.strongly_typed,
        "flags": where.plan.flags,
        "profile": [[n, list(a), list(b), list(c)] for n, a, b, c in where.profile],
        "plan_sha256": hashlib.sha256(data).hexdigest(),
        "plan_bytes": len(data),
        "built_at": "2026-01-02T03:04:05+00:00",
    }
    write_record(where.record_path, EngineRecord(**{**fields, **changes}))
    return where.plan_path


@pytest.mark.parametrize(
    ("changes", "built_for"),
    [
        ({"compute_capability": "sm_86"}, "sm_86 with TensorRT 10.7.0.23"),
        ({"tensorrt_version": "10.3.0.30"}, "sm_90 with TensorRT 10.3.0.30"),
    ],
)
def test_a_cached_plan_built_elsewhere_is_refused(bundle, tmp_path, changes, built_for):
    backend = TensorRTBackend(cache_dir=tmp_path, device=DeviceInfo("10.7.0.23", "sm_90"))
    plan = plant(backend, bundle / "unet" / "model.onnx", **changes)
    assert plan.parent == tmp_path / "engines"
    with pytest.raises(UserError) as err:
        backend.load(bundle / "unet" / "model.onnx")
    assert str(err.value) == (
        f"engine {plan} was built for {built_for}; this is sm_90 with TensorRT 10.7.0.23: "
        "rebuild it (delete it, or run build.sh on this device)"
    )


def test_a_matching_cached_plan_goes_to_tensorrt(bundle, tmp_path, monkeypatch):
    backend = TensorRTBackend(cache_dir=tmp_path, device=DeviceInfo("10.7.0.23", "sm_90"))
    plan = plant(backend, bundle / "unet" / "model.onnx")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(UserError, match="needs TensorRT's Python package: pip install tensorrt"):
        backend.load(bundle / "unet" / "model.onnx")
    plan.write_bytes(b"truncated")
    with pytest.raises(UserError, match="does not match its record"):
        backend.load(bundle / "unet" / "model.onnx")


def test_a_graph_outside_a_bundle_is_refused(tmp_path):
    graph = tmp_path / "x" / "model.onnx"
    graph.parent.mkdir()
    graph.write_bytes(b"")
    backend = TensorRTBackend(cache_dir=tmp_path, device=DeviceInfo("10.7.0.23", "sm_90"))
    with pytest.raises(BundleError, match="is not a component of a bundle"):
        backend.locate(graph)


def test_the_bundle_is_left_unchanged_by_lookups(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    backend = TensorRTBackend(cache_dir=tmp_path / "c", device=DeviceInfo("10.7.0.23", "sm_90"))
    backend.locate(copy / "unet" / "model.onnx")
    assert backend.cached_engine(backend.locate(copy / "unet" / "model.onnx")) is None
    read_manifest(copy)  # verifies every file's hash and that no file was added
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in bundle.iterdir())
