"""The bench's matrix-rate denominator and its choice of bundle per backend."""

from __future__ import annotations

import math

import pytest

from slimdiff.app.bench import bundle_target
from slimdiff.app.bench_report import markdown_table
from slimdiff.errors import UserError
from slimdiff.metrics.matmul_rate import matmul_tflops
from tests.unit.bench_rows import bench_row


def test_cpu_matmul_rate_is_measured():
    rate = matmul_tflops("cpu", threads=1, repeat=2)
    assert rate["dtype"] == "float32" and rate["n"] == 2048 and rate["device"] == "cpu"
    # a 2-core CPU of 2020s: 10 GFLOP/s to 10 TFLOP/s on one thread, fp32
    assert math.isfinite(rate["tflops"]) and 0.01 < rate["tflops"] < 10


@pytest.mark.parametrize(
    ("backend", "targets", "chosen"),
    [
        ("ort-cpu", ["onnx"], "onnx"),
        ("ort-cuda", ["tensorrt", "onnx"], "onnx"),
        ("trt", ["onnx", "tensorrt"], "tensorrt"),
        ("trt", ["onnx"], "onnx"),
        ("trt-rtx", ["tensorrt"], "tensorrt"),
        ("aoti", ["onnx", "aoti"], "aoti"),
    ],
)
def test_each_backend_benches_the_bundle_it_runs(backend, targets, chosen):
    assert bundle_target(backend, targets) == chosen


def test_a_backend_without_its_bundle_is_refused():
    with pytest.raises(UserError, match=r"add aoti to export\.targets"):
        bundle_target("aoti", ["onnx"])


_row = bench_row


def test_the_table_quotes_the_fraction_of_the_matmul_rate():
    table = markdown_table({"recipes": [_row(), _row(name="s", simulated="w4a4")]})
    head, _, fast, slow = table.splitlines()
    col = head.split("|").index(" of matmul rate ")
    assert fast.split("|")[col].strip() == "12.5%"
    assert slow.split("|")[col].strip() == "simulated"


def test_a_recipe_that_failed_keeps_its_row_and_the_others_theirs(tmp_path, monkeypatch):
    """One failing recipe does not lose the others' results: they are written, its row
    says why, and the command still ends in one line, exit code 2."""
    import json

    from slimdiff.app import bench, bench_report
    from slimdiff.recipe import Recipe

    def one(recipe, out, advance, device, allow_pickle):
        if recipe.name == "bad":
            raise UserError("compress: something | wrong\nhere")
        return _row(recipe.name)

    monkeypatch.setattr(bench, "_bench_one", one)
    monkeypatch.setattr(bench_report, "write_grid", lambda row, path: None)
    recipes = [Recipe(model="tiny:sd15", name=n) for n in ("good", "bad")]
    with pytest.raises(UserError, match=r"^1 of 2 recipes failed \(bad; why: .*results\.md\)"):
        bench.run_bench(recipes, tmp_path / "o", device="cpu")
    rows = json.loads((tmp_path / "o/results.json").read_text())["recipes"]
    assert [r["name"] for r in rows] == ["good", "bad"]
    assert rows[1] == {"name": "bad", "error": "compress: something | wrong\nhere"}
    table = (tmp_path / "o/results.md").read_text().splitlines()
    header = next(line for line in table if line.startswith("| recipe |"))
    bad = next(line for line in table if line.startswith("| bad |"))
    assert "| failed: compress: something \\| wrong here |" in bad
    assert bad.count("|") - bad.count("\\|") == header.count("|")  # as many cells
    assert any(line.startswith("| good | 1.00 |") for line in table)
    assert (tmp_path / "o/latency_vs_fidelity.png").is_file()
