"""Recipe schema: strict keys, per-pass validation, ordering, overrides, built-ins."""

from __future__ import annotations

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
