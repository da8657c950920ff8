"""Backends: selection by name, clear errors for missing libraries, numpy in and out."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from slimdiff.runtime.backends import backend_names, get_backend, shape_bound
from slimdiff.runtime.manifest import BundleError

from slimdiff.errors import UserError


def _tiny_graph(path) -> None:
    """y = x * 2 + float(n): one float32 input, one int64 input, one output."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3])
    n = helper.make_tensor_value_info("n", TensorProto.INT64, ["B", 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 3])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["x2"]),
        helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["x2", "nf"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "tiny", [x, n], [y], initializer=[two])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def test_ort_cpu_session_runs_and_casts_feeds(tmp_path):
    path = tmp_path / "tiny.onnx"
    _tiny_graph(path)
    session = get_backend("ort-cpu").load(path)
    assert session.input_names == ["x", "n"] and session.output_names == ["y"]
    assert session.input_dtypes == {"x": np.dtype(np.float32), "n": np.dtype(np.int64)}
    # float64 and int32 feeds are cast to what the graph declares
    out = session.run({"x": np.arange(6.0).reshape(2, 3), "n": np.array([[1], [2]], np.int32)})
    np.testing.assert_array_equal(out["y"], [[1, 3, 5], [8, 10, 12]])
    assert out["y"].dtype == np.float32


def test_feeds_that_do_not_match_the_graph_are_rejected(tmp_path):
    path = tmp_path / "tiny.onnx"
    _tiny_graph(path)
    session = get_backend("ort-cpu").load(path)
    with pytest.raises(ValueError, match=r"missing \['n'\], unexpected \['z'\]"):
        session.run({"x": np.zeros((1, 3), np.float32), "z": np.zeros(1)})


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(
        UserError,
        match="unknown backend 'ort-gpu'; known backends: ort-cpu, ort-cuda, trt, trt-rtx, aoti",
    ):
        get_backend("ort-gpu")
    assert backend_names() == ("ort-cpu", "ort-cuda", "trt", "trt-rtx", "aoti")


@pytest.mark.parametrize(
    ("module", "cls", "path", "bound"),
    [
        ("ort", "OrtBackend", "unet/model.onnx", False),  # onnxruntime runs any shape
        ("trt", "TensorRTBackend", "unet/model.onnx", True),  # an engine: its profile's only
        ("trt_rtx", "TrtRtxBackend", "unet/model.onnx", True),
        # a package runs its exported axis ranges, wider than the profile; it checks them
        ("aoti", "AotiBackend", "unet/model.pt2", False),
    ],
)
def test_which_backends_run_only_the_profiles_shapes(module, cls, path, bound):
    import importlib

    backend_cls = getattr(importlib.import_module(f"slimdiff.runtime.backends.{module}"), cls)
    # Not constructed: TensorRT's constructors look for TensorRT, absent here.
    backend = object.__new__(backend_cls)
    assert shape_bound(backend, path) is bound


@pytest.mark.usefixtures("onnxruntime_not_installed")
def test_missing_onnxruntime_names_the_package_to_install():
    with pytest.raises(UserError, match="needs onnxruntime, which is not installed: pip install"):
        get_backend("ort-cpu")
    with pytest.raises(UserError, match=r"not installed: pip install 'slimdiff\[gpu\]'"):
        get_backend("ort-cuda")


def test_cuda_backend_without_cuda_provider_names_onnxruntime_gpu():
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(UserError, match=r"has no CUDAExecutionProvider.*onnxruntime-gpu"):
        get_backend("ort-cuda")


def test_unloadable_graph_is_a_user_error(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not an onnx file")
    with pytest.raises(UserError, match="onnxruntime could not load it"):
        get_backend("ort-cpu").load(path)


def _identity_graph(path, elem_type) -> None:
    """y = x for one input of ONNX type `elem_type`."""
    x = helper.make_tensor_value_info("x", elem_type, [2])
    y = helper.make_tensor_value_info("y", elem_type, [2])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


@pytest.mark.parametrize(
    ("elem_type", "ort_type", "why"),
    [
        (TensorProto.BFLOAT16, "tensor(bfloat16)", "numpy has no bfloat16 dtype"),
        (TensorProto.STRING, "tensor(string)", "the runtime tokenizes text itself"),
    ],
)
def test_input_type_numpy_cannot_feed_fails_at_load(tmp_path, elem_type, ort_type, why):
    path = tmp_path / "graph.onnx"
    _identity_graph(path, elem_type)
    with pytest.raises(BundleError) as err:
        get_backend("ort-cpu").load(path)
    message = str(err.value)
    assert str(path) in message and f"input 'x' has type {ort_type}" in message
    assert why in message and "export the bundle again with this slimdiff" in message


@pytest.mark.parametrize(
    ("elem_type", "dtype"),
    [
        (TensorProto.UINT8, np.uint8),
        (TensorProto.INT8, np.int8),
        (TensorProto.INT32, np.int32),
        (TensorProto.BOOL, np.bool_),
        (TensorProto.FLOAT16, np.float16),
    ],
)
def test_integer_bool_and_half_inputs_are_fed_in_their_own_dtype(tmp_path, elem_type, dtype):
    path = tmp_path / "graph.onnx"
    _identity_graph(path, elem_type)
    session = get_backend("ort-cpu").load(path)
    assert session.input_dtypes == {"x": np.dtype(dtype)}
    out = session.run({"x": np.array([1, 0])})["y"]
    assert out.dtype == np.dtype(dtype) and out.tolist() == np.array([1, 0], dtype).tolist()


def _session_threads(session) -> tuple[int, str]:
    options = session._session.get_session_options()
    return (
        options.intra_op_num_threads,
        options.get_session_config_entry("session.intra_op.allow_spinning"),
    )


def test_sessions_get_the_thread_policy_and_never_spin(tmp_path, monkeypatch):
    from slimdiff.runtime.backends.ort import OrtBackend

    from slimdiff import threads

    monkeypatch.delenv("SLIMDIFF_THREADS", raising=False)
    path = tmp_path / "tiny.onnx"
    _tiny_graph(path)
    monkeypatch.setattr(threads, "read_cpu_state", lambda root="/": threads.CpuState(8))
    # a tiny graph on 8 free CPUs: the policy's cap for tiny models
    assert _session_threads(get_backend("ort-cpu").load(path)) == (2, "0")
    monkeypatch.setattr(threads, "read_cpu_state", lambda root="/": threads.CpuState(1))
    assert _session_threads(get_backend("ort-cpu").load(path)) == (1, "0")
    assert _session_threads(OrtBackend("ort-cpu", threads=4).load(path)) == (4, "0")
    monkeypatch.setenv("SLIMDIFF_THREADS", "3")
    assert _session_threads(get_backend("ort-cpu").load(path)) == (3, "0")


def test_the_recipe_knows_the_backends():
    """bench.backend is checked by the recipe, which may not import the runtime."""
    from slimdiff.recipe import BACKENDS

    assert backend_names() == BACKENDS
