"""The streamed export (export/streamed.py): lazy models, weights written one tensor at a time.

What a FLUX-size export on a 24 GiB machine rests on, checked on tiny models: the streamed
graph computes what torch and the in-memory route's graph compute, reads a saved folder's
safetensors (sharded, with an fp16 variant beside it) by key, keeps tied weights single,
records a parity check it could not run, and leaves the lazy model lazy.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from slimdiff.export import export_bundle
from slimdiff.export.components import plan_components
from slimdiff.export.dummy_inputs import Sizes
from slimdiff.export.parity import ExportError
from slimdiff.runtime import Text2ImagePipeline
from slimdiff.runtime.manifest import read_manifest

from slimdiff.cli import main
from slimdiff.models import load_model
from slimdiff.models.lazy import is_lazy, materialize, weight_source
from slimdiff.models.weights import InitWeights, SafetensorsWeights

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(bundle, entry, feeds):
    session = ort.InferenceSession(str(bundle / entry.path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_cli_streams_flux_fp16_and_the_runtime_draws_from_it(tmp_path):
    out = tmp_path / "flux"
    result = CliRunner().invoke(
        main,
        ["export", "tiny:flux", "--out", str(out), "--precision", "fp16", "--weights", "stream"],
    )
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)  # hashes every file, external data included
    from slimdiff.export.bundle import component_precisions

    # as the in-memory route decides (a VAE whose config says force_upcast stays fp32)
    want = component_precisions(load_model("tiny:flux"), "fp16", None)
    for name, entry in manifest.components.items():
        assert entry.extra["weights"] == "streamed", name
        assert entry.precision == want[name], name
        assert entry.parity["passed"], name
        graph = onnx.load(str(out / entry.path), load_external_data=False).graph
        # Weights are initializers, never inputs; linear weights stored transposed.
        assert [i.name for i in graph.input] == [i["name"] for i in entry.inputs], name
        assert not any(
            n.op_type == "Transpose" and n.input[0].endswith("weight") for n in graph.node
        )
    t5 = onnx.load(str(out / "text_encoder_2" / "model.onnx")).graph
    embeddings = [
        t for t in t5.initializer if t.name.endswith(("shared.weight", "embed_tokens.weight"))
    ]
    assert len(embeddings) == 1  # T5's tied embedding stays one tensor
    assert embeddings[0].data_type == onnx.TensorProto.FLOAT16
    image = Text2ImagePipeline.from_bundle(out)("a red circle", steps=2, size=(64, 64), seed=0)
    assert image.image.shape == (64, 64, 3) and image.image.dtype == np.uint8
    # tools/streamed_check.py reads sampled weights back: bit for bit the model's, converted.
    tool = Path(__file__).resolve().parents[2] / "tools" / "streamed_check.py"
    cmd = [sys.executable, str(tool), str(out), "tiny:flux", "--samples", "4"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout)
    assert {r["component"] for r in rows} == set(manifest.components)  # all streamed
    assert all(r["identical"] for r in rows) and any(r["initializer"].endswith(".T") for r in rows)


@pytest.fixture(scope="module")
def saved_sd15(tmp_path_factory):
    """tiny:sd15 saved as a diffusers folder: the UNet sharded (index + shards) with an
    fp16 variant beside it that must not be read."""
    folder = tmp_path_factory.mktemp("sd15") / "pipe"
    pipe = load_model("tiny:sd15").pipe
    pipe.save_pretrained(folder, safe_serialization=True)
    unet = folder / "unet"
    for f in unet.glob("*.safetensors"):
        f.unlink()
    pipe.unet.save_pretrained(unet, safe_serialization=True, max_shard_size="200KB")
    pipe.unet.to(torch.float16).save_pretrained(unet, safe_serialization=True, variant="fp16")
    return folder


def test_lazy_folder_reads_sharded_weights_and_skips_the_variant(saved_sd15):
    assert len(list((saved_sd15 / "unet").glob("*-of-*.safetensors"))) > 1
    model = load_model(str(saved_sd15), weights="lazy")
    unet = model.pipe.unet
    assert is_lazy(unet) and isinstance(weight_source(unet), SafetensorsWeights)
    assert {p.device.type for p in unet.parameters()} == {"meta"}
    materialize(unet)
    eager = load_model(str(saved_sd15)).pipe.unet
    for (key, got), (_, want) in zip(
        unet.named_parameters(), eager.named_parameters(), strict=True
    ):
        assert got.dtype == torch.float32 and torch.equal(got, want), key  # not the fp16 variant


def test_streamed_graph_computes_what_the_in_memory_graph_computes(saved_sd15, tmp_path):
    memory = export_bundle(load_model(str(saved_sd15)), tmp_path / "memory", optimize=False)
    lazy = load_model(str(saved_sd15), weights="lazy")
    streamed = export_bundle(lazy, tmp_path / "streamed", weights="stream")
    assert all(is_lazy(getattr(lazy.pipe, n)) for n in ("unet", "vae", "text_encoder"))
    component = next(c for c in plan_components(load_model(str(saved_sd15))) if c.name == "unet")
    feeds = {k: v.numpy() for k, v in component.make_inputs(Sizes(2, 8, 16, 77, seed=3)).items()}
    a = _run(tmp_path / "memory", memory.components["unet"], feeds)
    b = _run(tmp_path / "streamed", streamed.components["unet"], feeds)
    assert a.shape == b.shape == (2, 4, 8, 16)
    assert float(np.max(np.abs(a - b))) <= 1e-5 * float(np.max(np.abs(a)))
    assert streamed.components["unet"].parity["rel_err"] < 1e-4


def test_parity_too_big_for_memory_is_recorded_as_skipped(monkeypatch, tmp_path):
    import slimdiff.export.streamed as streamed

    monkeypatch.setattr(streamed, "available_bytes", lambda: 1)  # nothing fits
    manifest = export_bundle(load_model("tiny:sd15", weights="lazy"), tmp_path / "b")  # auto
    for name, entry in manifest.components.items():
        assert entry.extra["weights"] == "streamed", name  # auto streams what does not fit
        assert entry.parity == {}
        assert "do not fit in this machine's memory" in entry.extra["parity_skipped"]


def test_in_memory_model_streams_and_is_left_as_it_was(tmp_path):
    model = load_model("tiny:sd3")
    before = {k: v.clone() for k, v in model.pipe.transformer.state_dict().items()}
    manifest = export_bundle(model, tmp_path / "b", weights="stream", external_data_threshold=1024)
    entry = manifest.components["transformer"]
    assert entry.extra["external_data"] is True and entry.parity["passed"]
    after = model.pipe.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_random_weights_are_drawn_per_tensor_the_same_in_any_order():
    module = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32))
    a, b = InitWeights(module, seed=0), InitWeights(module, seed=0)
    w = a.tensor("0.weight")
    assert torch.equal(b.tensor("0.bias"), a.tensor("0.bias"))  # order does not matter
    assert torch.equal(b.tensor("0.weight"), w)
    assert not torch.equal(InitWeights(module, seed=1).tensor("0.weight"), w)
    assert w.shape == (32, 64) and float(w.abs().max()) <= 1 / 8  # torch's +-1/sqrt(fan_in)
    assert float(w.std()) > 0.05
    assert torch.equal(a.tensor("1.weight"), torch.ones(32))
    assert torch.equal(a.tensor("1.bias"), torch.zeros(32))


def test_random_builtin_is_the_same_model_lazy_or_in_memory():
    lazy = load_model("random:sd15", weights="lazy").pipe.vae
    source = weight_source(lazy)
    assert isinstance(source, InitWeights) and is_lazy(lazy)
    key = "decoder.conv_in.weight"
    assert torch.equal(source.tensor(key), InitWeights(lazy).tensor(key))


def test_merged_weight_inputs_are_refused():
    from slimdiff.export.streamed import _check_names

    node = onnx.helper.make_node("Identity", ["a.weight"], ["b.weight"])
    graph = onnx.helper.make_model(onnx.helper.make_graph([node], "g", [], []))
    with pytest.raises(ExportError, match="merged weight inputs"):
        _check_names(graph, {"a.weight": ["a.weight"], "b.weight": ["b.weight"]}, "unet")


def test_streaming_a_hub_id_says_to_download_it_first(tmp_path):
    result = CliRunner().invoke(
        main, ["export", "someorg/somemodel", "--out", str(tmp_path / "b"), "--weights", "stream"]
    )
    assert result.exit_code == 2
    assert "hf download" in result.output and "Traceback" not in result.output


def test_fp16_weights_are_converted_bit_for_bit_as_onnxruntime_does():
    from onnxruntime.transformers.float16 import convert_np_to_float16
    from slimdiff.export.streamed import fp16_as_ort

    x = torch.randn(4096) * torch.logspace(-12, 8, 4096)
    edges = torch.tensor([0.0, -0.0, 1e-9, -1e-9, 5.96e-08, 7e5, -7e5, 65504, 65519, 65520])
    x = torch.cat([x, edges, torch.tensor([float("inf"), -float("inf"), float("nan")])])
    got = fp16_as_ort(x).numpy()
    want = convert_np_to_float16(x.numpy())
    assert got.dtype == want.dtype == np.float16
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))


def test_a_folder_in_an_older_layout_is_refused_lazily_and_loads_in_auto(saved_sd15, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from slimdiff.errors import UserError

    folder = tmp_path / "old"
    shutil.copytree(saved_sd15, folder)
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(vae))
    state["decoder.conv_in.kernel"] = state.pop("decoder.conv_in.weight")  # a renamed key
    save_file(state, str(vae))
    with pytest.raises(UserError, match="--weights memory"):
        load_model(str(folder), weights="lazy")
    # auto falls back to loading into memory, which names the missing weight (diffusers
    # leaves it on the meta device with a warning, and the export failed much later)
    result = CliRunner().invoke(main, ["export", str(folder), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2, result.output
    assert "vae lacks 1 of its weights (first: decoder.conv_in.weight)" in result.output


def _damage(folder: Path, how: str) -> None:
    if how == "no scheduler folder":
        import shutil

        shutil.rmtree(folder / "scheduler")
    elif how == "bad json":
        (folder / "scheduler" / "scheduler_config.json").write_text("{not json")
    elif how == "config of another model":
        config = json.loads((folder / "unet" / "config.json").read_text())
        config["block_out_channels"] = config["block_out_channels"][:2]
        (folder / "unet" / "config.json").write_text(json.dumps(config))
    else:  # model_index.json without its vae
        index = json.loads((folder / "model_index.json").read_text())
        del index["vae"]
        (folder / "model_index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    ("how", "where"),
    [
        ("no scheduler folder", "scheduler"),
        ("bad json", "scheduler"),
        ("config of another model", "unet"),
        ("no vae in model_index.json", "pipe"),
    ],
)
@pytest.mark.parametrize("weights", ["stream", "auto"])
def test_a_damaged_folder_is_one_clear_error_on_either_route(
    saved_sd15, tmp_path, how, where, weights
):
    import shutil

    folder = tmp_path / "pipe"
    shutil.copytree(saved_sd15, folder)
    _damage(folder, how)
    out = tmp_path / "b"
    result = CliRunner().invoke(
        main, ["export", str(folder), "--out", str(out), "--weights", weights]
    )
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not out.exists()
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("error: ") and "complete" in message
    if weights == "stream":  # the lazy route names the component it could not build
        name = "" if where == "pipe" else f"/{where}"
        assert f"{folder}{name}: could not build" in message


@pytest.mark.parametrize("command", ["export-stream", "export-memory", "inspect"])
def test_a_cut_short_weights_file_is_named(saved_sd15, tmp_path, command):
    """A shard cut short (an interrupted download) is refused naming it, on every route;
    an fp16 variant beside it, which no route reads, may be damaged."""
    import shutil

    folder = tmp_path / "pipe"
    shutil.copytree(saved_sd15, folder)
    shard = sorted((folder / "unet").glob("diffusion_pytorch_model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    variant = next((folder / "unet").glob("*.fp16*.safetensors"))
    variant.write_bytes(b"")
    out = tmp_path / "b"
    args = {
        "export-stream": ["export", str(folder), "--out", str(out), "--weights", "stream"],
        "export-memory": ["export", str(folder), "--out", str(out), "--weights", "memory"],
        "inspect": ["inspect", str(folder)],
    }[command]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not out.exists()
    assert (
        result.output.strip()
        .splitlines()[-1]
        .startswith(f"error: {shard}: not a readable safetensors file (")
    )
    assert "damaged or incomplete" in result.output


@pytest.mark.parametrize(
    ("gib", "precision", "streams"),
    [(3, "fp32", False), (3, "fp16", True), (1, "fp16", False), (5, "fp32", True)],
)
def test_auto_streams_an_fp16_graph_past_2_gib_sooner(monkeypatch, gib, precision, streams):
    """With 8 GiB free: the usual route needs about 2x the weights, and an fp16 graph past
    protobuf's 2 GiB 3.5x (its conversion runs ORT's symbolic shape inference)."""
    import slimdiff.export as export
    import slimdiff.export.streamed as streamed
    from slimdiff.export.components import plan_components

    component = plan_components(load_model("tiny:sd15", weights="lazy"))[0]
    for module in (export, streamed):
        monkeypatch.setattr(module, "param_bytes", lambda _m: gib << 30)
    monkeypatch.setattr(streamed, "available_bytes", lambda: 8 << 30)
    assert export._streams(component, "auto", precision) == streams
    assert export._streams(component, "memory", precision) is False
