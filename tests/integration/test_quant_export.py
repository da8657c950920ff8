"""A quantized model end to end on tiny SDXL: compressed by the runner (calibration, ranges,
a few finetuning steps), reloaded through the edit log, exported as Q/DQ graphs that ORT's
CPU EP runs with integer kernels (read from its optimized graph, recorded in the manifest),
int4 weights packed on disk, and run by the torch-free runtime."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from slimdiff.compress.runner import compress_model

from slimdiff.models import load_model
from slimdiff.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _recipe(tmp_path, name: str, **quant):
    recipe = {
        "version": 1,
        "model": "tiny:sdxl",
        "calibration": {"num_prompts": 2, "steps": 2, "size": [64, 64]},
        "passes": [{"pass": "quant.quest", **quant}],
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return load_recipe(path)


def _unet_bytes(bundle) -> int:
    return sum(f.stat().st_size for f in (bundle / "unet").iterdir())


def test_w8a8_and_w4a8_export_to_integer_kernels_and_run(tmp_path):
    from slimdiff.export import export_bundle
    from slimdiff.runtime.pipeline import Text2ImagePipeline

    fp32_bytes = 4 * sum(p.numel() for p in load_model("tiny:sdxl").denoiser.parameters())
    # W8A8 as the minmax baseline; W4A8 with QuEST's time-layer stage (one epoch; the
    # sensitivity ranking, one forward a layer, is covered by the pass's unit tests).
    quest = {"timestep_groups": 2, "finetune": {"sensitive": 0, "epochs_time": 1, "batch": 2}}
    configs = {
        "w8a8": {"weights": "int8", "method": "minmax"},
        "w4a8": {"weights": "int4", **quest},
    }
    bundles = {}
    for name, config in configs.items():
        weights = config["weights"]
        recipe = _recipe(tmp_path, name, **config)
        quantized = compress_model(load_model("tiny:sdxl"), recipe, tmp_path / f"a-{name}")
        manifest = export_bundle(quantized, tmp_path / name)
        entry = manifest.components["unet"]
        assert entry.precision == ("int8" if weights == "int8" else "int4")
        assert entry.parity["passed"] and entry.parity["tolerance"] == 0.2
        q = entry.extra["quantization"]
        # The convolutions and linear layers run as ORT's integer kernels.
        assert q["kernels"].get("QLinearConv", 0) > 0
        assert q["kernels"].get("MatMulIntegerToFloat", 0) > 0
        assert q["activation_scales"] == "merged"
        assert (q["int4_packed_weights"] > 0) == (weights == "int4")
        assert q["qdq_form"] == "ort"
        bundles[name] = tmp_path / name
        if name == "w8a8":
            _check_tensorrt_form(quantized, tmp_path / "w8a8-trt", entry)
    w8, w4 = _unet_bytes(bundles["w8a8"]), _unet_bytes(bundles["w4a8"])
    # Tiny graphs: the graph itself (13k nodes) and the scales weigh much more than at full
    # size (random:sd15 W8: 0.27x of fp32, docs/BENCHMARKS.md).
    assert w4 < 0.75 * w8 and w8 < 0.5 * fp32_bytes
    runtime = Text2ImagePipeline.from_bundle(bundles["w4a8"])
    image = runtime("a red circle on the left", steps=2, size=(64, 64), seed=3).image
    assert image.shape == (64, 64, 3) and image.std() > 0


def _check_tensorrt_form(quantized, out, ort_entry) -> None:
    """ModelOpt's Q/DQ form for TensorRT: every activation quantizer symmetric int8 (zero
    point 0), Q/DQ on layer inputs only (no output quantizers after convolutions), int8
    weights per output channel; onnxruntime runs it (TensorRT is not installable here)."""
    import onnx
    from onnx import numpy_helper
    from slimdiff.export import export_bundle

    entry = export_bundle(quantized, out, qdq="tensorrt").components["unet"]
    assert entry.parity["passed"] and entry.extra["quantization"]["qdq_form"] == "tensorrt"
    graph = onnx.load(str(out / "unet" / "model.onnx")).graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    producer = {o: n for n in graph.node for o in n.output}
    qs = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert qs
    for q in qs:
        zero = values[q.input[2]]
        assert zero.dtype == np.int8 and not zero.any(), q.name
        source = producer.get(q.input[0])
        assert source is None or source.op_type != "Conv", "an output quantizer is left"
    ort_graph = onnx.load(str(out.parent / "w8a8" / "unet" / "model.onnx")).graph
    ort_qs = sum(n.op_type == "QuantizeLinear" for n in ort_graph.node)
    convs = sum(n.op_type == "Conv" for n in graph.node)
    assert len(qs) < ort_qs  # the convolutions' output quantizers are gone
    assert convs > 0 and ort_entry.precision == entry.precision == "int8"
