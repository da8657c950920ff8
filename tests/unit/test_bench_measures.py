"""What bench measures and writes: FLOPs of the batch that runs, params, cache keys, the
report's settings, pooled PSNR, eager step timing, and what it refuses before model work."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from slimdiff.errors import UserError
from slimdiff.models import load_model
from slimdiff.recipe import validate_recipe
from tests.unit.bench_rows import bench_row

pytestmark = pytest.mark.usefixtures("one_torch_thread")


_row = bench_row


def _results(*rows) -> dict:
    machine = {"cpu": "x86_64", "cpu_count": 2, "onnxruntime": "1", "torch": "2"}
    return {"date": "d", "machine": machine, "command": "slimdiff bench", "recipes": list(rows)}


# ------------------------------------------------------------------ 1: FLOPs of the batch run


@pytest.mark.parametrize(
    ("model", "guidance", "batch"),
    [("tiny:sd15", 7.5, 2), ("tiny:sd15", 1.0, 1), ("tiny:sd3", 1.0, 1), ("tiny:flux", 3.5, 1)],
)
def test_gflop_per_step_counts_the_batch_the_pipelines_run(model, guidance, batch):
    """CFG doubles the batch only above guidance 1 (diffusers and the runtime alike), and
    never for FLUX (guidance is an input): bench counts that batch's FLOPs."""
    from slimdiff.app.bench import cfg_batch
    from slimdiff.inspect import inspect_model

    loaded = load_model(model, device="meta")
    assert cfg_batch(loaded.arch, loaded, guidance) == batch
    one = inspect_model(loaded, size=(64, 64), batch=1)["denoiser"]["flops_per_step"]
    counted = inspect_model(loaded, size=(64, 64), batch=cfg_batch(loaded.arch, loaded, guidance))
    assert counted["batch"] == batch
    assert counted["denoiser"]["flops_per_step"] == batch * one


# ------------------------------------------------------------------ 2: tied parameters


def test_tied_parameters_count_once():
    """T5's `shared` and `encoder.embed_tokens` are one Parameter: counted once, as torch's
    parameters() does; full-size T5-XXL (SD3's and FLUX's) is 4,762,310,656."""
    from slimdiff.lowbit import parameter_count

    te = load_model("tiny:flux").pipe.text_encoder_2
    assert te.shared.weight is te.encoder.embed_tokens.weight
    assert parameter_count(te) == sum(p.numel() for p in te.parameters())
    t5 = load_model("random:sd3", device="meta").pipe.text_encoder_3
    assert parameter_count(t5) == 4_762_310_656


# ------------------------------------------------------------------ 3: versions in cache keys


def test_cache_keys_change_with_the_slimdiff_version(monkeypatch):
    import slimdiff
    from slimdiff.app import bench
    from slimdiff.app.flow import compress_hash, export_hash

    recipe = validate_recipe({"model": "tiny:sd15"})
    before = compress_hash(recipe, {"m": 1}), export_hash("c", recipe, "onnx")
    monkeypatch.setattr(slimdiff, "__version__", "9.9.9")
    after = compress_hash(recipe, {"m": 1}), export_hash("c", recipe, "onnx")
    assert before[0] != after[0] and before[1] != after[1]
    assert bench.machine_info()["slimdiff"] == "9.9.9"


def test_the_reference_key_holds_the_libraries_that_draw_it():
    import diffusers
    import torch

    from slimdiff.app.bench import _reference_versions

    assert _reference_versions() == {"diffusers": diffusers.__version__, "torch": torch.__version__}


# ------------------------------------------------------------------ 4: tokenizers fingerprinted


def _swapped_tokenizer(tokenizer, folder):
    """`tokenizer` saved, two vocabulary entries' ids swapped, loaded again."""
    tokenizer.save_pretrained(folder)
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    vocab["red</w>"], vocab["blue</w>"] = vocab["blue</w>"], vocab["red</w>"]
    path.write_text(json.dumps(data))
    return type(tokenizer).from_pretrained(folder)


def test_another_vocabulary_is_another_fingerprint(tmp_path):
    from slimdiff.models.fingerprint import fingerprint

    pipe = load_model("tiny:sd15").pipe
    first = fingerprint(pipe)
    assert set(first) >= {"tokenizer", "text_encoder", "unet"}
    # the same tokenizer from another folder: the same digest
    pipe.tokenizer.save_pretrained(tmp_path / "copy")
    pipe.tokenizer = type(pipe.tokenizer).from_pretrained(tmp_path / "copy")
    assert fingerprint(pipe) == first
    swapped = _swapped_tokenizer(pipe.tokenizer, tmp_path / "swapped")
    assert swapped("red").input_ids != pipe.tokenizer("red").input_ids
    pipe.tokenizer = swapped
    second = fingerprint(pipe)
    assert second["tokenizer"] != first["tokenizer"]
    assert {k: v for k, v in second.items() if k != "tokenizer"} == {
        k: v for k, v in first.items() if k != "tokenizer"
    }


def test_tokenizer_digest_is_the_same_in_another_process():
    from slimdiff.models.fingerprint import tokenizer_digest

    code = (
        "from slimdiff.models import load_model\n"
        "from slimdiff.models.fingerprint import tokenizer_digest\n"
        "p = load_model('tiny:sd3').pipe\n"
        "print(tokenizer_digest(p.tokenizer_2), tokenizer_digest(p.tokenizer_3))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    pipe = load_model("tiny:sd3").pipe
    assert out == [tokenizer_digest(pipe.tokenizer_2), tokenizer_digest(pipe.tokenizer_3)]


# ------------------------------------------------------------------ 5: a corrupted cached bundle


def test_a_cached_bundle_that_does_not_verify_is_exported_again(tmp_path, caplog, monkeypatch):
    from slimdiff.runtime.bundle_files import open_bundle

    from slimdiff.app.flow import compress_and_export

    # one torch thread, as the module's others run with (the flow would take 2, spinning)
    monkeypatch.setenv("SLIMDIFF_THREADS", "1")
    recipe = validate_recipe({"model": "tiny:sd15", "export": {"optimize": False}})
    first = compress_and_export(recipe, tmp_path / "out")
    bundle = first.bundles["onnx"]
    graph = next(p for p in sorted(bundle.rglob("*.onnx")))
    graph.write_bytes(graph.read_bytes()[:100])  # truncated
    again = compress_and_export(recipe, tmp_path / "out")
    assert again.reused == ["compress"]  # the artifact still; the bundle exported again
    assert "does not verify" in caplog.text
    assert open_bundle(bundle).summary().endswith("every SHA-256 matches")
    assert compress_and_export(recipe, tmp_path / "out").reused == ["compress", "export:onnx"]


# ------------------------------------------------------------------ 6, 10: results.md


def test_settings_that_differ_are_columns_and_shared_ones_are_said_once(tmp_path):
    from slimdiff.app.bench_report import write_markdown

    rows = [
        _row("a"),
        _row("b", steps=8, size=[64, 128], guidance_rescale=0.7),
        {"name": "c", "error": "failed early"},
    ]
    write_markdown(_results(*rows), tmp_path / "results.md")
    head, _, _, table, _, a, b, c = (tmp_path / "results.md").read_text().splitlines()
    assert head.endswith("torch 2; backend ort-cpu.")  # shared: once, in the heading
    cells = [c.strip() for c in table.split("|")[1:-1]]
    assert cells[:5] == ["recipe", "size", "steps", "guidance", "denoiser params (M)"]
    assert "peak RSS (MiB)" in cells
    assert [c.strip() for c in a.split("|")[1:5]] == ["a", "64x64", "4", "7.5"]
    assert [c.strip() for c in b.split("|")[1:5]] == ["b", "128x64", "8", "7.5 (rescaled 0.7)"]
    assert c.count("|") == table.count("|")


def test_a_bench_where_every_recipe_failed_states_no_settings(tmp_path):
    from slimdiff.app.bench_report import write_markdown

    write_markdown(_results({"name": "x", "error": "no"}), tmp_path / "results.md")
    head = (tmp_path / "results.md").read_text().splitlines()[0]
    assert "None" not in head and head.endswith("torch 2.")


def test_peak_rss_is_labelled_mib_and_old_results_still_render():
    from slimdiff.app.bench_report import markdown_table

    old = _row("old", peak_rss_mb=99.0)
    del old["peak_rss_mib"]
    header, _, new, legacy = markdown_table(_results(_row("new"), old)).splitlines()
    col = [c.strip() for c in header.split("|")].index("peak RSS (MiB)")
    assert new.split("|")[col].strip() == "120" and legacy.split("|")[col].strip() == "99"


# ------------------------------------------------------------------ 7: pooled PSNR


def test_psnr_over_images_is_from_their_pooled_mse():
    from slimdiff.app.bench import pooled_psnr
    from slimdiff.metrics import psnr

    rng = np.random.default_rng(0)
    refs = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(4)]
    images = [r.copy() for r in refs]
    images[2] = np.clip(refs[2].astype(int) + 8, 0, 255).astype(np.uint8)  # one image off
    mse = np.mean((np.stack(images).astype(float) - np.stack(refs)) ** 2)
    assert pooled_psnr(images, refs) == pytest.approx(10 * np.log10(255**2 / mse))
    # three identical images (100 dB each) do not lift it as a mean of dB values does
    per_image = [psnr(a, b) for a, b in zip(images, refs, strict=True)]
    assert np.mean(per_image) > pooled_psnr(images, refs) + 40
    assert pooled_psnr(refs, refs) == 100.0


# ------------------------------------------------------------------ 8: WIDTHxHEIGHT in inspect


def test_inspect_names_sizes_width_by_height():
    from rich.console import Console

    from slimdiff.inspect import format_table, inspect_model

    flux = load_model("tiny:flux", device="meta")
    # --size 96x72 is (height 72, width 96)
    with pytest.raises(UserError, match=r"^--size 96x72 is not a multiple of 16 .*; try 96x64$"):
        inspect_model(flux, size=(72, 96))
    console = Console(record=True, width=200)
    console.print(format_table(inspect_model(flux, size=(64, 128))))  # --size 128x64
    assert "128x64, batch 1" in console.export_text()


# ------------------------------------------------------------------ 9, 12: refused up front


def _never(*args, **kwargs):
    raise AssertionError("bench did model work before refusing")


def test_a_size_off_the_grid_is_refused_before_any_model_work(tmp_path, monkeypatch):
    from slimdiff.app import bench

    monkeypatch.setattr(bench, "_bench_one", _never)
    recipe = validate_recipe({"model": "tiny:flux", "name": "f", "bench": {"size": [72, 96]}})
    with pytest.raises(UserError, match=r"^bench\.size 96x72 is not a multiple of 16 pixels"):
        bench.run_bench([recipe], tmp_path / "o", device="cpu")
    assert not (tmp_path / "o" / "results.json").exists()


def test_prompt_accuracy_is_refused_for_a_model_not_from_toy_shapes(tmp_path, monkeypatch):
    from slimdiff.app import bench

    monkeypatch.setattr(bench, "_bench_one", _never)
    recipe = validate_recipe(
        {"model": "tiny:sd15", "name": "s", "bench": {"accuracy": "toy-shapes"}}
    )
    with pytest.raises(UserError, match=r"bench\.accuracy: toy-shapes judges toy:shapes images"):
        bench.run_bench([recipe], tmp_path / "o", device="cpu")


def test_toy_shapes_and_what_derives_from_it_may_be_judged(tmp_path):
    from slimdiff.app.bench_checks import check_accuracy_model
    from slimdiff.models.toy import toy_folder

    def check(model: str) -> None:
        check_accuracy_model(validate_recipe({"model": model, "bench": {"accuracy": "toy-shapes"}}))

    copy = tmp_path / "copy" / "unet"  # a saved or retrained toy: its UNet's architecture
    copy.mkdir(parents=True)
    (copy / "config.json").write_text((toy_folder() / "unet" / "config.json").read_text())
    artifacts = {}
    for name, source in [("of_toy", "toy:shapes"), ("of_copy", str(tmp_path / "copy"))]:
        artifacts[name] = tmp_path / name
        artifacts[name].mkdir()
        (artifacts[name] / "slimdiff.json").write_text(json.dumps({"source": source}))
    for model in (
        "toy:shapes",
        str(toy_folder()),
        str(tmp_path / "copy"),
        *map(str, artifacts.values()),
    ):
        check(model)
    other = tmp_path / "of_sd15"
    other.mkdir()
    (other / "slimdiff.json").write_text(json.dumps({"source": "tiny:sd15"}))
    for model in ("tiny:sd15", str(other)):
        with pytest.raises(UserError, match="is not toy:shapes nor compressed from it"):
            check(model)


# ------------------------------------------------------------------ 11: stale outputs


def test_a_failing_rerun_removes_the_earlier_runs_grid_and_images(tmp_path, monkeypatch):
    from slimdiff.app import bench, bench_report

    out = tmp_path / "o"
    fail = []

    def one(recipe, out_, advance, device, allow_pickle):
        if fail:
            raise UserError("broke")
        run = out_ / "recipes" / recipe.name / "run"
        run.mkdir(parents=True)
        (run / "image_0.png").write_bytes(b"png")
        return _row(recipe.name)

    monkeypatch.setattr(bench, "_bench_one", one)
    monkeypatch.setattr(bench_report, "write_grid", lambda row, path: path.write_bytes(b"grid"))
    recipe = validate_recipe({"model": "tiny:sd15", "name": "r"})
    bench.run_bench([recipe], out, device="cpu")
    assert (out / "grid_r.png").is_file() and (out / "recipes/r/run/image_0.png").is_file()
    fail.append(True)
    with pytest.raises(UserError, match="1 of 1 recipes failed"):
        bench.run_bench([recipe], out, device="cpu")
    assert not (out / "grid_r.png").exists()
    assert not (out / "recipes/r/run").exists()
    assert "failed: broke" in (out / "results.md").read_text()


# ------------------------------------------------------------------ 13: eager's step


@pytest.mark.parametrize("steps", [1, 2])
def test_eager_ms_per_step_leaves_text_encoding_out(steps, monkeypatch):
    """Text encoding (made 1 s slow here) is in no step, at 1 step as at more."""
    from slimdiff.app.bench_timing import torch_ms_per_step

    pipe = load_model("tiny:sd15").pipe
    pipe.set_progress_bar_config(disable=True)
    encode = pipe.encode_prompt

    def slow(*args, **kwargs):
        time.sleep(1.0)
        return encode(*args, **kwargs)

    monkeypatch.setattr(pipe, "encode_prompt", slow)
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    settings = {"steps": steps, "guidance": 7.5, "size": [64, 64]}
    start = time.perf_counter()
    ms = torch_ms_per_step(pipe, settings, latents, "a red cube")
    assert (time.perf_counter() - start) > 1.0  # the slow encoding ran
    assert 0 < ms < 500


def test_a_tokenizer_call_does_not_change_its_digest():
    """A fast tokenizer called with padding and truncation keeps them and saves them in
    tokenizer.json; the digest leaves that call state out (a pipeline's first prompt
    changed it, and a resumed calibration missed its cache)."""
    from slimdiff.models.fingerprint import tokenizer_digest

    tokenizer = load_model("tiny:sd15").pipe.tokenizer
    before = tokenizer_digest(tokenizer)
    tokenizer(["a cat"], padding="max_length", max_length=77, truncation=True)
    assert tokenizer_digest(tokenizer) == before


# ------------------------------------------------------------------ 10: the torch reference


@pytest.mark.parametrize("name", ["euler-a", "dpm++2m-sde-karras", "dpm++sde-karras"])
def test_a_stochastic_reference_adds_the_noise_the_runtime_adds(tmp_path, shared_bundle, name):
    """bench's torch reference with a scheduler that adds noise every step draws it as the
    bundle's run of that prompt does (seed + i): the two agree to float error, batched
    (`bench.reference_batch`) or not. Before, torch drew unseeded noise of its own: the
    fidelity compared two noise draws, not the models."""
    import diffusers
    from slimdiff.runtime import Text2ImagePipeline
    from slimdiff.runtime.schedulers import SCHEDULER_ALIASES

    from slimdiff.app.bench import _reference
    from slimdiff.metrics import latent_rel_err

    shared = shared_bundle("sd15")
    pipe = shared.model.pipe
    class_name, overrides = SCHEDULER_ALIASES[name]
    own = pipe.scheduler
    settings = {"prompts": ["a red circle", "a blue square", "a green cross"], "seed": 4}
    settings.update(steps=3, size=[64, 64], guidance=5.0)
    noise = [np.random.default_rng(i).standard_normal((1, 4, 8, 8), np.float32) for i in range(3)]
    pipe.scheduler = getattr(diffusers, class_name).from_config(own.config, **overrides)
    try:
        one = _reference(pipe, settings, noise, tmp_path / "one")
        two = _reference(pipe, settings, noise, tmp_path / "two", batch=2)
    finally:
        pipe.scheduler = own
    runtime = Text2ImagePipeline.from_bundle(shared.out, scheduler=name)
    run = {"steps": 3, "size": (64, 64), "guidance": 5.0}
    for i, prompt in enumerate(settings["prompts"]):
        got = runtime(prompt, latents=noise[i], seed=4 + i, **run).latents
        assert one["latents"][i].shape == two["latents"][i].shape == got.shape == (1, 4, 8, 8)
        assert latent_rel_err(got, one["latents"][i]) < 1e-4, i
        assert latent_rel_err(two["latents"][i], one["latents"][i]) < 1e-5, i
        assert np.abs(two["images"][i].astype(int) - one["images"][i]).max() <= 1, i
        # the step noise is what makes them agree: another seed's draws do not
        other = runtime(prompt, latents=noise[i], seed=40 + i, **run).latents
        assert latent_rel_err(other, one["latents"][i]) > 1e-2, i
