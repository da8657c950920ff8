"""fp16 graphs keep in fp32 what diffusers and transformers compute in fp32 (export/fp16.py):
T5's norms, `wo` and residual stream, and the sinusoidal time embeddings.

The overflow shows only with native fp16 arithmetic, as on a GPU: ORT's CPU EP computes
fp16 graphs through fp32 casts. onnx's reference evaluator computes in the graph's types,
so it stands in for the GPU here."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator
from slimdiff.export import export_onnx_component
from slimdiff.export.components import plan_components
from slimdiff.export.dummy_inputs import Sizes
from slimdiff.export.fp16 import convert_fp16, fp32_nodes

from slimdiff.models import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _component(model, name: str):
    return next(c for c in plan_components(model) if c.name == name)


def _types(graph: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(graph)
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    return {v.name: v.type.tensor_type.elem_type for v in values}


@pytest.fixture(scope="module")
def loud_t5(tmp_path_factory):
    """tiny:flux's T5 with its embeddings x400 (a real T5-XXL's activations are hundreds),
    exported fp16 (the parity check on ORT-CPU passes either way)."""
    model = load_model("tiny:flux")
    with torch.no_grad():
        model.pipe.text_encoder_2.shared.weight.mul_(400.0)
    component = _component(model, "text_encoder_2")
    root = tmp_path_factory.mktemp("t5")
    entry = export_onnx_component(component, root, precision="fp16", check=True)
    assert entry.parity["passed"]
    ids = component.make_inputs(Sizes(1, 8, 8, 16, False, 1))["input_ids"]
    with torch.inference_mode():
        want = model.pipe.text_encoder_2(ids).last_hidden_state.numpy()
    return root / "text_encoder_2" / "model.onnx", ids.numpy(), want


def test_a_t5_with_large_activations_stays_finite_in_native_fp16(loud_t5):
    path, ids, want = loud_t5
    graph = onnx.load(str(path))
    got = ReferenceEvaluator(graph).run(None, {"input_ids": ids})[0]
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() / np.abs(want).max() < 2e-2
    # the residual stream is fp32 from the first norm on; the attention and wi MatMuls fp16
    types = _types(graph)
    norm = next(n for n in graph.graph.node if n.op_type == "Pow")
    assert "layer_norm" in norm.name and types[norm.output[0]] == TensorProto.FLOAT
    wo = next(n for n in graph.graph.node if "/wo/MatMul" in n.name)
    q = next(n for n in graph.graph.node if "/q/MatMul" in n.name)
    assert types[wo.output[0]] == TensorProto.FLOAT
    assert types[q.output[0]] == TensorProto.FLOAT16


def test_converted_whole_the_same_t5_overflows(loud_t5):
    """What the kept nodes prevent: the fp32 graph converted with nothing kept."""
    path, ids, _ = loud_t5
    model = load_model("tiny:flux")
    with torch.no_grad():
        model.pipe.text_encoder_2.shared.weight.mul_(400.0)
    root = path.parents[1] / "fp32"
    export_onnx_component(_component(model, "text_encoder_2"), root, precision="fp32", check=False)
    fp32 = onnx.load(str(root / "text_encoder_2" / "model.onnx"))
    from onnxruntime.transformers.float16 import convert_float_to_float16

    whole = convert_float_to_float16(fp32, keep_io_types=True)
    got = ReferenceEvaluator(whole).run(None, {"input_ids": ids})[0]
    assert not np.isfinite(got).all() or (got == 0).all()
    kept = fp32_nodes(fp32, t5=True)
    assert sum("layer_norm" in n for n in kept) >= 8 and any("/wo/" in n for n in kept)


@pytest.mark.parametrize(("family", "inputs"), [("sd15", 1), ("flux", 2)])
def test_the_time_embedding_takes_the_timestep_unrounded(family, inputs, tmp_path):
    """The sinusoids' arguments in the fp16 graph equal the fp32 graph's: the timestep
    (and FLUX's guidance) reach them as float32, never rounded to fp16 (801.3 would read
    801.5 there, a 0.2 rad phase error at the highest frequency)."""
    model = load_model(f"tiny:{family}")
    component = _component(model, model.arch.denoiser)
    graphs = {}
    for precision in ("fp32", "fp16"):
        root = tmp_path / precision
        export_onnx_component(component, root, precision=precision, check=False)
        graphs[precision] = onnx.load(str(root / component.name / "model.onnx"))
    fed = [i for i in ("timestep", "guidance") if i in component.input_names]
    assert len(fed) == inputs
    feeds = {k: v.numpy() for k, v in component.make_inputs(Sizes(1, 8, 8, 16, False, 1)).items()}
    feeds["timestep"] = np.full_like(feeds["timestep"], 801.3 if family == "sd15" else 0.8013)
    if "guidance" in feeds:
        feeds["guidance"] = np.full_like(feeds["guidance"], 3.5)
    phases = {}
    for precision, graph in graphs.items():
        sines = [n.input[0] for n in graph.graph.node if n.op_type in ("Sin", "Cos")]
        graph.graph.output.extend(
            helper.make_tensor_value_info(s, TensorProto.FLOAT, None) for s in sines
        )
        session = ort.InferenceSession(
            graph.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        phases[precision] = session.run(sines, feeds)
    for fp16, fp32 in zip(phases["fp16"], phases["fp32"], strict=True):
        assert fp16.dtype == np.float32
        np.testing.assert_allclose(fp16, fp32, rtol=1e-6, atol=1e-6)


def test_nothing_is_kept_where_nothing_needs_it():
    """A graph with no T5 and no time input converts whole (the CLIP text encoder)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    node = helper.make_node("Sin", ["x"], ["y"], name="sin")
    graph = helper.make_model(helper.make_graph([node], "g", [x], [y]))
    assert fp32_nodes(graph) == []
    converted = convert_fp16(graph)
    assert [n.op_type for n in converted.graph.node] == ["Cast", "Sin", "Cast"]
    assert math.isclose(
        ort.InferenceSession(converted.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": np.ones((2, 3), np.float32)}
        )[0][0, 0],
        math.sin(1.0),
        rel_tol=1e-3,
    )


def test_a_kept_time_input_is_not_rounded_through_fp16():
    """timestep -> Mul -> Sin (kept) -> MatMul (fp16): the converter's Cast to fp16 at the
    input and the Cast back before the kept Mul are joined, so Mul sees the float32 value."""
    t = helper.make_tensor_value_info("timestep", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    freqs = helper.make_tensor("f", TensorProto.FLOAT, [1, 4], [1.0, 0.1, 0.01, 0.001])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel())
    nodes = [
        helper.make_node("Unsqueeze", ["timestep", "axes"], ["t2"], name="unsq"),
        helper.make_node("Mul", ["t2", "f"], ["arg"], name="mul"),
        helper.make_node("Sin", ["arg"], ["s"], name="sin"),
        helper.make_node("MatMul", ["s", "w"], ["y"], name="linear"),
    ]
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    graph = helper.make_model(
        helper.make_graph(nodes, "g", [t], [y], [freqs, w, axes]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    assert fp32_nodes(graph) == ["unsq", "mul", "sin"]
    converted = convert_fp16(graph)
    # the converter renames the kept nodes' outputs: the Mul's, found by its node name
    (arg_name,) = next(n.output for n in converted.graph.node if n.name == "mul")
    converted.graph.output.append(helper.make_tensor_value_info(arg_name, TensorProto.FLOAT, None))
    session = ort.InferenceSession(
        converted.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    arg = session.run([arg_name], {"timestep": np.array([801.3], np.float32)})[0]
    assert arg.dtype == np.float32
    np.testing.assert_allclose(arg[0], np.float32(801.3) * np.float32([1.0, 0.1, 0.01, 0.001]))
    # the input's cast to fp16 is gone: its one Cast now goes straight to float32
    casts = [n for n in converted.graph.node if n.op_type == "Cast" and "timestep" in n.input]
    assert [_to(n) for n in casts] == [TensorProto.FLOAT]


def _to(node) -> int:
    return next(a.i for a in node.attribute if a.name == "to")


def test_the_module_docstring_names_this_file():
    import slimdiff.export.fp16 as fp16

    assert Path(__file__).name in fp16.__doc__
