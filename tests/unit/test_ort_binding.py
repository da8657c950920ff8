"""IO binding (runtime/backends/ort_binding.py) on the CPU EP: the bookkeeping a GPU run
relies on (constants copied once, buffers per input shape), checked where it can run."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from slimdiff.runtime.backends.ort_binding import MAX_GRAPHS, BoundRunner


def _session(tmp_path) -> ort.InferenceSession:
    # y = x + c (c broadcast over the batch), z = 2 x
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3])
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 3])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["B", 3])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"]), helper.make_node("Mul", ["x", "two"], ["z"])],
        "g",
        [x, c],
        [y, z],
        initializer=[two],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _const(values) -> np.ndarray:
    c = np.array([values], dtype=np.float32)
    c.flags.writeable = False
    return c


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_read_only_feeds_are_copied_once(tmp_path, cuda_graph):
    session = _session(tmp_path)
    runner = BoundRunner(ort, session, ["y", "z"], "cpu", cuda_graph=cuda_graph)
    c = _const([1.0, 2.0, 3.0])
    rng = np.random.default_rng(0)
    for step in range(3):
        x = rng.standard_normal((2, 3)).astype(np.float32)
        y, z = runner.run({"x": x, "c": c})
        np.testing.assert_array_equal(y, x + c)
        np.testing.assert_array_equal(z, 2 * x)
        # x each step, c on the first only
        assert runner.copies == step + 2
    # A new constant (another image's conditioning) is copied, then reused.
    c2 = _const([-1.0, 0.0, 1.0])
    x = np.ones((2, 3), np.float32)
    for _ in range(2):
        np.testing.assert_array_equal(runner.run({"x": x, "c": c2})[0], x + c2)
    assert runner.copies == 4 + 3


def test_cuda_graph_mode_keeps_buffers_per_input_shape(tmp_path):
    session = _session(tmp_path)
    runner = BoundRunner(ort, session, ["y", "z"], "cpu", cuda_graph=True)
    c = _const([1.0, 2.0, 3.0])
    small, big = np.ones((1, 3), np.float32), np.full((4, 3), 2.0, np.float32)
    np.testing.assert_array_equal(runner.run({"x": small, "c": c})[0], small + c)
    np.testing.assert_array_equal(runner.run({"x": big, "c": c})[1], 2 * big)
    # Back to the first shape: its own buffers, written in place with the new values.
    again = np.full((1, 3), 5.0, np.float32)
    y, z = runner.run({"x": again, "c": c})
    np.testing.assert_array_equal(y, again + c)
    np.testing.assert_array_equal(z, 2 * again)
    assert len(runner._graphs) == 2
    # Outputs are host copies: a later run does not change an earlier result.
    assert float(y[0, 0]) == 6.0 and float(runner.run({"x": small, "c": c})[0][0, 0]) == 2.0
    assert float(y[0, 0]) == 6.0


def test_cuda_graph_mode_keeps_the_most_recent_shapes_only(tmp_path):
    """At most MAX_GRAPHS shape sets keep buffers, the least recently used evicted; an
    evicted shape seen again gets new buffers under a new graph id (never an old one: the
    session would replay that id's capture onto the freed buffers)."""
    session = _session(tmp_path)
    runner = BoundRunner(ort, session, ["y", "z"], "cpu", cuda_graph=True)
    c = _const([1.0, 2.0, 3.0])
    shapes = 3 * MAX_GRAPHS
    for batch in range(1, shapes + 1):
        x = np.full((batch, 3), float(batch), np.float32)
        np.testing.assert_array_equal(runner.run({"x": x, "c": c})[0], x + c)
        assert len(runner._graphs) == min(batch, MAX_GRAPHS)
    kept = _batches(runner)
    assert kept == list(range(shapes - MAX_GRAPHS + 1, shapes + 1))
    ids = [graph.graph_id for graph in runner._graphs.values()]
    assert ids == list(range(shapes - MAX_GRAPHS + 1, shapes + 1))
    # the oldest kept shape, used again, becomes the most recent: the next new shape evicts
    # the one kept after it instead
    oldest = np.ones((shapes - MAX_GRAPHS + 1, 3), np.float32)
    np.testing.assert_array_equal(runner.run({"x": oldest, "c": c})[1], 2 * oldest)
    runner.run({"x": np.ones((shapes + 1, 3), np.float32), "c": c})
    kept = _batches(runner)
    assert kept == [*range(shapes - MAX_GRAPHS + 3, shapes + 1), oldest.shape[0], shapes + 1]
    # the first shape, evicted long ago: right values, a fresh graph id
    first = np.full((1, 3), 4.0, np.float32)
    np.testing.assert_array_equal(runner.run({"x": first, "c": c})[0], first + c)
    assert runner._graphs[next(reversed(runner._graphs))].graph_id == shapes + 2
    assert len(runner._graphs) == MAX_GRAPHS


def _batches(runner: BoundRunner) -> list[int]:
    """The batch size of x in each kept graph's shapes, least recently used first."""
    return [shape[0] for key in runner._graphs for name, shape, _ in key if name == "x"]


def test_cuda_graph_mode_refills_a_constant_another_shape_moved_on_from(tmp_path):
    """Each shape's buffers remember their own constant: c, then c2 at another shape, then c2
    back at the first shape is copied there (its buffer still held c)."""
    session = _session(tmp_path)
    runner = BoundRunner(ort, session, ["y", "z"], "cpu", cuda_graph=True)
    c, c2 = _const([1.0, 2.0, 3.0]), _const([10.0, 20.0, 30.0])
    small, big = np.zeros((1, 3), np.float32), np.zeros((2, 3), np.float32)
    runner.run({"x": small, "c": c})
    runner.run({"x": big, "c": c})
    runner.run({"x": big, "c": c2})
    np.testing.assert_array_equal(runner.run({"x": small, "c": c2})[0], small + c2)


def test_a_writable_feed_is_never_cached(tmp_path):
    session = _session(tmp_path)
    runner = BoundRunner(ort, session, ["y", "z"], "cpu")
    x = np.zeros((1, 3), np.float32)
    c = np.zeros((1, 3), np.float32)  # writable: fed fresh each call
    runner.run({"x": x, "c": c})
    c[:] = 7.0  # the caller may change it in place between calls
    np.testing.assert_array_equal(runner.run({"x": x, "c": c})[0], c)
    assert runner.copies == 4


def test_pipeline_copies_the_text_conditioning_once_per_image(shared_bundle):
    from slimdiff.runtime.backends.ort import OrtBackend
    from slimdiff.runtime.bundle_files import open_bundle
    from slimdiff.runtime.pipeline import Text2ImagePipeline

    path = shared_bundle("sd15", optimize=False).out
    plain = Text2ImagePipeline.from_bundle(path)
    bound = Text2ImagePipeline._load_verified(open_bundle(path), OrtBackend("ort-cpu", bind=True))
    steps = 3
    plain_latents, bound_latents = (
        pipe("a red circle", steps=steps, seed=1, size=(64, 64)).latents for pipe in (plain, bound)
    )
    np.testing.assert_allclose(bound_latents, plain_latents, rtol=0, atol=1e-6)
    runner = bound.denoiser._bound
    # sample and timestep at every step; encoder_hidden_states (CFG batch) once.
    assert set(runner._constants) == {"encoder_hidden_states"}
    assert runner.copies == 1 + 2 * steps
    bound("a blue square", steps=steps, seed=1, size=(64, 64))  # a new image: new conditioning
    assert runner.copies == 2 * (1 + 2 * steps)
