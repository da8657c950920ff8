"""Recipe schema: strict keys, per-pass validation, ordering, overrides, built-ins."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import pytest
from slimdiff.compress import (
    Pass,
    PassConfig,
    PassReport,
    Stage,
    build_passes,
    register_pass,
    unregister_pass,
)

from slimdiff.errors import UserError
from slimdiff.recipe import builtin_recipes, load_recipe, parse_size, validate_recipe


@pytest.fixture
def two_passes():
    """Throwaway passes of two stages, registered for one test."""

    class Cfg(PassConfig):
        ratio: float = 0.5

    class Structural(Pass):
        name = "test.structural"
        stage = Stage.STRUCTURAL
        Config = Cfg

        def apply(self, pipe, calib):
            return PassReport(self.name)

    class Quant(Pass):
        name = "test.quant"
        stage = Stage.QUANTIZATION

        def apply(self, pipe, calib):
            return PassReport(self.name)

    register_pass(Structural)
    register_pass(Quant)
    yield
    unregister_pass("test.structural")
    unregister_pass("test.quant")


def _write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_minimal_recipe_gets_defaults(tmp_path):
    r = load_recipe(_write(tmp_path, "version: 1\nmodel: tiny:sd15\n"))
    assert r.name == "r"
    assert r.passes == []
    assert r.export.precision == "fp32" and r.export.targets == ["onnx"]
    assert r.bench.repeat == 3


def test_unknown_top_level_key_names_the_file_and_field(tmp_path):
    path = _write(tmp_path, "version: 1\nmodel: tiny:sd15\nexprot: {}\n")
    with pytest.raises(UserError, match=r"r\.yaml: field 'exprot': unknown key"):
        load_recipe(path)


def test_wrong_type_names_the_field(tmp_path):
    path = _write(tmp_path, "version: 1\nmodel: tiny:sd15\nbench: {steps: many}\n")
    with pytest.raises(UserError, match=r"field 'bench\.steps': .*integer"):
        load_recipe(path)


def test_unsupported_version_is_rejected(tmp_path):
    with pytest.raises(UserError, match="field 'version'"):
        load_recipe(_write(tmp_path, "version: 2\nmodel: tiny:sd15\n"))


def test_pass_options_are_validated_by_the_pass_config(tmp_path, two_passes):
    path = _write(
        tmp_path, "version: 1\nmodel: m\npasses:\n  - pass: test.structural\n    ratio: x\n"
    )
    with pytest.raises(UserError, match=r"passes\[0\] \(test\.structural\): field 'ratio'"):
        load_recipe(path)
    path = _write(
        tmp_path, "version: 1\nmodel: m\npasses:\n  - pass: test.structural\n    ratoi: 1\n"
    )
    with pytest.raises(UserError, match=r"passes\[0\].*'ratoi': unknown key"):
        load_recipe(path)


def test_unknown_pass_lists_the_known_ones(tmp_path, two_passes):
    path = _write(tmp_path, "version: 1\nmodel: m\npasses:\n  - pass: prune.magic\n")
    with pytest.raises(
        UserError, match=r"unknown pass 'prune\.magic'; known passes: .*test\.quant"
    ):
        load_recipe(path)


def test_every_problem_is_listed_and_the_message_counts_them(tmp_path, two_passes):
    path = _write(
        tmp_path,
        "version: 1\nmodel: m\nbench: {steps: -1}\nexport: {targetz: [onnx]}\n",
    )
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert "(1 more; `slimdiff validate` lists them)" in str(err.value)
    assert sorted(line.split(": ", 1)[1] for line in err.value.details) == [
        "field 'bench.steps': Input should be greater than or equal to 1",
        "field 'export.targetz': unknown key; remove it or check the spelling",
    ]
    # every pass entry is checked, not only the first bad one
    path = _write(
        tmp_path,
        "version: 1\nmodel: m\npasses:\n  - pass: test.structural\n    ratio: x\n    a: 1\n"
        "  - pass: prune.magic\n  - 7\n",
    )
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert str(err.value).endswith("(3 more; `slimdiff validate` lists them)")
    details = [line.split(": ", 1)[1] for line in err.value.details]
    assert [d.split(":")[0] for d in details] == ["passes[0] (test.structural)"] * 2 + [
        "passes[1]",
        "passes[2]",
    ]
    assert "unknown pass 'prune.magic'" in details[2]
    # a bad pass does not hide the other fields' problems, before or after it
    path = _write(
        tmp_path,
        "version: 1\nmodel: m\ndevice: gpu\npasses:\n  - pass: prune.magic\n"
        "export: {precision: fp64}\n",
    )
    with pytest.raises(UserError) as err:
        load_recipe(path)
    details = [line.split(": ", 1)[1] for line in err.value.details]
    assert [d.split(":")[0] for d in details] == [
        "field 'device'",
        "passes[0]",
        "field 'export.precision'",
    ]


@pytest.mark.parametrize("key", ["on", "no", "1", "null", "2.5"])
def test_a_key_yaml_reads_as_a_bool_or_number_is_refused_with_its_line(tmp_path, key):
    path = _write(tmp_path, f"version: 1\nmodel: m\nbench:\n  {key}: 3\n")
    with pytest.raises(UserError, match=rf"key '{key}' is read by YAML as !!\w+.*line 4.*quote"):
        load_recipe(path)
    path = _write(tmp_path, f"version: 1\nmodel: m\nbench:\n  '{key}': 3\n")
    with pytest.raises(UserError, match=rf"field 'bench.{key}': unknown key"):
        load_recipe(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: ''", "field 'model': String should have at least 1 character"),
        ("calibration: {prompts: []}", "field 'calibration.prompts': give at least one prompt"),
        ("calibration: {prompts: ' '}", "field 'calibration.prompts': give at least one prompt"),
        ("bench: {prompts: ['']}", "field 'bench.prompts': give at least one prompt"),
        ("bench: {backend: onnx}", "field 'bench.backend': unknown backend 'onnx'; use one of"),
        ("bench: {steps: true}", "field 'bench.steps': true is a yes/no value"),
        ("bench: {guidance: .inf}", "field 'bench.guidance': Input should be a finite number"),
        (
            "passes: [{pass: test.structural, ratio: yes}]",
            "passes[0] (test.structural): field 'ratio': true is a yes/no value",
        ),
        ("passes: [{pass: test.structural, ratio: .nan}]", "should be a finite number"),
    ],
)
def test_values_no_run_could_use_are_refused_at_validation(tmp_path, two_passes, text, message):
    base = "version: 1\nmodel: m\n" if not text.startswith("model") else "version: 1\n"
    with pytest.raises(UserError, match=re.escape(message)):
        load_recipe(_write(tmp_path, base + text + "\n"))


def test_passes_must_go_structural_then_quantization(two_passes):
    data = {"model": "m", "passes": [{"pass": "test.quant"}, {"pass": "test.structural"}]}
    with pytest.raises(UserError, match=r"passes\[1\].*cannot follow test\.quant"):
        validate_recipe(data)
    ok = validate_recipe(
        {
            "model": "m",
            "passes": [{"pass": "test.structural", "ratio": 0.25}, {"pass": "test.quant"}],
        }
    )
    assert build_passes(ok)[0].config.ratio == 0.25


def test_set_overrides_nested_fields_and_list_items(tmp_path, two_passes):
    path = _write(tmp_path, "version: 1\nmodel: m\npasses:\n  - pass: test.structural\n")
    r = load_recipe(
        path, ["bench.steps=4", "model=tiny:sdxl", "passes.0.ratio=0.75", "bench.size=[64, 96]"]
    )
    assert r.bench.steps == 4 and r.model == "tiny:sdxl" and r.bench.size == (64, 96)
    assert build_passes(r)[0].config.ratio == 0.75
    with pytest.raises(UserError, match="use --set key=value"):
        load_recipe(path, ["bench.steps"])
    with pytest.raises(UserError, match="not an index"):
        load_recipe(path, ["passes.3.ratio=1"])


def test_recipe_hash_changes_with_content(tmp_path):
    path = _write(tmp_path, "version: 1\nmodel: tiny:sd15\n")
    assert load_recipe(path).content_hash() == load_recipe(path).content_hash()
    assert load_recipe(path).content_hash() != load_recipe(path, ["bench.steps=2"]).content_hash()


def test_every_builtin_recipe_validates():
    recipes = builtin_recipes()
    assert len(recipes) >= 3
    for name in recipes:
        assert load_recipe(name).name == name


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_recipe("no-such-recipe")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(_write(tmp_path, "model: [unclosed\n"))


@pytest.mark.parametrize(("text", "expected"), [("1024x768", (768, 1024)), ("64X64", (64, 64))])
def test_parse_size_is_width_by_height(text, expected):
    assert parse_size(text) == expected


def test_parse_size_rejects_garbage():
    with pytest.raises(UserError, match="WIDTHxHEIGHT"):
        parse_size("big")


def test_register_pass_refuses_duplicates(two_passes):
    from slimdiff.compress import get_pass

    with pytest.raises(ValueError, match="already registered"):
        register_pass(get_pass("test.quant"))


def test_a_recipe_built_in_python_gets_the_checks_validate_gives(two_passes):
    from slimdiff.recipe import Recipe

    r = Recipe(model="m", passes=[{"pass": "test.structural", "ratio": 0.25}])
    assert r.passes[0].config.ratio == 0.25 and r.passes[0].name == "test.structural"
    with pytest.raises(UserError, match=r"passes\[0\] \(test\.structural\): field 'ratio'"):
        Recipe(model="m", passes=[{"pass": "test.structural", "ratio": "x"}])
    with pytest.raises(UserError, match=r"cannot follow test\.quant"):
        Recipe(model="m", passes=[{"pass": "test.quant"}, {"pass": "test.structural"}])
    with pytest.raises(UserError, match="unknown pass 'nope'"):
        Recipe(model="m", passes=[{"pass": "nope"}])


def test_dry_run_yaml_holds_every_resolved_default(two_passes):
    import yaml

    r = validate_recipe({"model": "m", "passes": [{"pass": "test.structural"}]})
    dumped = yaml.safe_load(r.to_yaml())
    assert dumped["passes"] == [{"pass": "test.structural", "ratio": 0.5}]
    assert dumped["device"] == "auto" and dumped["calibration"]["dtype"] == "float32"
    assert validate_recipe(dumped) == r  # what --dry-run prints validates back to the same


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"export": {"targets": ["trt"]}}, "unknown target 'trt'"),
        ({"export": {"targets": ["onnx", "onnx"]}}, "give each export target once"),
        ({"export": {"max_images": 0}}, "export.max_images"),
        ({"bench": {"seed": -1}}, "bench.seed"),
        ({"bench": {"seed": 2**70}}, "bench.seed"),
        ({"bench": {"steps": 1_000_000_000}}, "bench.steps"),
        ({"bench": {"guidance": float("nan")}}, "bench.guidance"),
        ({"bench": {"guidance": 1e308}}, "bench.guidance"),
        ({"calibration": {"size": [7, 7]}}, "a side must be a multiple of 8"),
        ({"bench": {"size": [100000, 64]}}, "a side must be a multiple of 8 from 8 to 8192"),
        ({"device": "gpu"}, "'gpu' is not a device; use auto, cpu, cuda or cuda:N"),
        ({"calibration": {"dtype": "int8"}}, "calibration.dtype"),
    ],
)
def test_values_out_of_bounds_say_what_is_allowed(data, message):
    with pytest.raises(UserError, match=message):
        validate_recipe({"model": "tiny:sd15", **data}, "r.yaml")


def test_typed_values_are_not_yaml(tmp_path):
    path = _write(tmp_path, "version: 1\nmodel: tiny:sd15\n")
    assert load_recipe(path, values={"model": "dir #2"}).model == "dir #2"
    assert load_recipe(path, values={"model": "off"}).model == "off"  # YAML would say False
    assert load_recipe(path, ["model='dir #2'"]).model == "dir #2"  # --set is YAML, quoted
    with pytest.raises(UserError, match="--set model=dir #2"):
        load_recipe(path, ["model=dir #2"])  # a YAML comment would cut the value


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\x01\x02binary\xff",
        "model: caf\xe9\n".encode("latin-1"),
        "version: 1\nmodel: tiny:sd15\n".encode("utf-16"),
        b"version: 1\nmodel: " + b"9" * 5000 + b"\n",
        b"version: 1\nmodel: m\nbench: " + b"[" * 5000 + b"]" * 5000 + b"\n",
        b"version: 1\nmodel: m\n  bad: indent\n",
        b"version: 1\nmodel: !!python/object:os.system ls\n",
    ],
)
def test_unreadable_recipe_files_are_one_user_error(tmp_path, content):
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert "\n" not in str(err.value)


def test_a_thousand_mutated_recipes_load_or_fail_cleanly():
    """Byte-level mutations of a built-in recipe through the whole load (YAML, the schema,
    every pass's config, the order): a Recipe or one UserError, never anything else."""
    import random

    source = builtin_recipes()["toy-shapes-ssd"].read_bytes()
    rng = random.Random(11)
    inserts = [b"[", b"{", b"&a ", b"*a", b"!!", b"- ", b": ", b"\x00", b"\xff", b"99999999999"]
    outcomes = {"ok": 0, "refused": 0}
    tmp = Path(tempfile.mkdtemp())
    try:
        for i in range(1000):
            data = bytearray(source)
            for _ in range(rng.randint(1, 4)):
                at = rng.randrange(len(data))
                choice = rng.random()
                if choice < 0.4:
                    data[at] = rng.randrange(256)
                elif choice < 0.8:
                    data[at:at] = rng.choice(inserts)
                else:
                    del data[at : at + rng.randint(1, 40)]
            path = tmp / f"r{i}.yaml"
            path.write_bytes(bytes(data))
            try:
                load_recipe(path)
                outcomes["ok"] += 1
            except UserError:
                outcomes["refused"] += 1
    finally:
        shutil.rmtree(tmp)
    assert outcomes["ok"] > 0 and outcomes["refused"] > 0


@pytest.mark.parametrize("name", ["../escape", "a/b", "a\\b", ".hidden", "..", "c:d", "x\ny"])
def test_a_recipe_name_is_a_folder_name(name):
    """bench writes each recipe's work under OUT/recipes/NAME."""
    with pytest.raises(UserError, match="name"):
        validate_recipe({"model": "tiny:sdxl", "name": name})
    assert (
        validate_recipe({"model": "tiny:sdxl", "name": "sdxl-ssd_1b.v2"}).name == "sdxl-ssd_1b.v2"
    )


def test_quantized_recipes_export_fp32():
    """Q/DQ layers have no fp16 form in onnxruntime: refused before any compress work."""
    step = {"pass": "quant.quest", "weights": "int8", "method": "minmax"}
    recipe = {"model": "tiny:sdxl", "passes": [step]}
    with pytest.raises(UserError, match=r"export\.precision fp16: quant\.quest bundles are fp32"):
        validate_recipe({**recipe, "export": {"precision": "fp16"}})
    assert validate_recipe(recipe).export.precision == "fp32"


def test_fewer_prompts_than_num_prompts_is_said(tmp_path, caplog):
    from slimdiff.prompts import CALIBRATION_PROMPTS, read_prompts

    with caplog.at_level("WARNING", logger="slimdiff.prompts"):
        assert read_prompts("builtin", 100) == CALIBRATION_PROMPTS
    (record,) = caplog.records
    assert record.getMessage().startswith(
        f"calibration.num_prompts is 100, but 'builtin' holds {len(CALIBRATION_PROMPTS)} prompts"
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="slimdiff.prompts"):
        assert read_prompts(["a", "b", "c"], 2) == ["a", "b"]
    assert not caplog.records


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"a cat\n# a comment\n\n  a dog  \n", None),
        ("\ufeffa café\n".encode(), None),  # a UTF-8 BOM is fine
        ("a cat\na dog\n".encode("utf-16"), r"saved as UTF-16; save it as UTF-8"),
        ("un café\n".encode("latin-1"), r"byte 0xE9 at offset 6 \(line 1, column 7\) is not UTF-8"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", r"not a text file \(NUL byte at offset 8"),
        ("dir", r"is a directory, not a prompt list file; pass the text file itself"),
    ],
)
def test_a_prompts_file_is_utf8_text_or_one_line_says_what_it_is(tmp_path, content, message):
    """calibration.prompts as a file: read as UTF-8 whatever the locale (it was read in the
    locale's encoding, and a UTF-16 or Latin-1 file raised UnicodeDecodeError); a
    directory or a binary file is refused in one line naming the file."""
    from slimdiff.prompts import read_prompts

    path = tmp_path / "prompts.txt"
    if content == "dir":
        path.mkdir()
    else:
        path.write_bytes(content)
    if message is None:
        expected = ["a cat", "a dog"] if b"cat" in content else ["a café"]
        assert read_prompts(str(path)) == expected
        return
    with pytest.raises(UserError, match=message) as err:
        read_prompts(str(path))
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
