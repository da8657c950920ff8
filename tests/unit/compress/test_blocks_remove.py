"""blocks.remove: presets hit the published sizes, kept weights are copied exactly, the
artifact loads with plain diffusers, and bad configs fail with one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pydantic
import pytest
import torch
from slimdiff.compress import build_passes, get_pass
from slimdiff.compress.blocks import PRESETS
from slimdiff.compress.blocks.plan import make_plan, pick_layers, read_structure
from slimdiff.compress.blocks.student import module_mapping, teacher_key

from slimdiff.errors import UserError
from slimdiff.models import load_model
from slimdiff.recipe import load_recipe, validate_recipe
from tests.unit.compress.pass_contract import PassContract

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[3]
SDXL_PRESETS = [n for n, p in PRESETS.items() if p.family == "sdxl"]
SD15_PRESETS = [n for n, p in PRESETS.items() if p.family == "sd15"]


class TestBlocksRemoveSSD(PassContract):
    pass_name = "blocks.remove"
    config: ClassVar[dict] = {"preset": "ssd-1b"}
    family = "sdxl"


class TestBlocksRemoveBKTiny(PassContract):
    pass_name = "blocks.remove"
    config: ClassVar[dict] = {"preset": "bk-sdm-tiny"}
    family = "sd15"


class TestBlocksRemoveGeneric(PassContract):
    pass_name = "blocks.remove"
    config: ClassVar[dict] = {
        "drop": ["down_blocks.*.resnets.1", "down_blocks.*.attentions.1"],
        "down_depths": [1, 1, 2],
        "up_depths": [[2, 1], [2, 1], 1],
        "mid": "none",
        "keep": "even",
    }
    family = "sdxl"


def _remove(pipe, **config):
    cls = get_pass("blocks.remove")
    return cls(cls.Config.model_validate(config)).apply(pipe, None)


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _plain(config) -> dict:
    """A config as its config.json says it (lists, no private keys)."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


# ------------------------------------------------------------------ published sizes

# Student UNet parameters on the full-size configs (random:*, meta device), pinned; the
# published figures they are checked against are in each Preset (presets.py cites them).
EXPECTED_PARAMS = {
    "bk-sdm-base": 579_384_964,  # published 0.58B
    "bk-sdm-small": 482_346_884,  # published 0.49B
    "bk-sdm-tiny": 323_384_964,  # published 0.33B
    "ssd-1b": 1_331_334_404,  # published 1.3B
    "vega": 745_225_604,  # published 0.745B
    "koala-1b": 1_161_184_324,  # published 1.16B
    "koala-700m": 782_822_724,  # published 0.78B
}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_student_matches_the_published_size(preset):
    model = load_model(f"random:{PRESETS[preset].family}", device="meta")
    before = _params(model.denoiser)
    report = _remove(model.pipe, preset=preset)
    after = _params(model.pipe.unet)
    assert after == EXPECTED_PARAMS[preset]
    assert after == pytest.approx(PRESETS[preset].unet_params, rel=0.03)
    assert report.summary["params_before"] == before and report.summary["params_after"] == after
    assert model.pipe.unet.device.type == "meta"


def test_ssd_1b_config_is_the_published_one():
    model = load_model("random:sdxl", device="meta")
    _remove(model.pipe, preset="ssd-1b")
    cfg = model.pipe.unet.config
    assert [list(d) for d in cfg.transformer_layers_per_block] == [[1, 1], [2, 2], [4, 4]]
    assert [list(d) for d in cfg.reverse_transformer_layers_per_block][:2] == [
        [4, 4, 10],
        [2, 1, 1],
    ]
    assert cfg.mid_block_type == "UNetMidBlock2D" and cfg.layers_per_block == 2


def test_vega_and_koala_depths_on_sdxl():
    structures = {}
    for preset in ("vega", "koala-1b", "koala-700m"):
        model = load_model("random:sdxl", device="meta")
        _remove(model.pipe, preset=preset)
        structures[preset] = read_structure(model.pipe.unet)
    vega, koala, koala7 = structures["vega"], structures["koala-1b"], structures["koala-700m"]
    assert vega.down_depths == ((0, 0), (1, 1), (2, 2))
    assert vega.up_depths == ((2, 2, 2), (1, 1, 1), (0, 0, 0))
    assert (vega.mid, vega.mid_depth) == ("resnet_only", 0)
    assert koala.down_depths == ((0,), (2,), (6,)) and koala.up_depths[0] == (6, 6)
    assert (koala.mid, koala.mid_depth) == ("keep", 6)
    assert koala7.down_depths == ((0,), (2,), (5,)) and koala7.mid == "none"


# ------------------------------------------------------------------ weights and mapping


def _tiny_pipe(family: str, toy: bool = False):
    if toy:
        from slimdiff.models.toy import build_toy_pipeline

        return build_toy_pipeline()
    return load_model(f"tiny:{family}").pipe


@pytest.mark.parametrize(
    ("preset", "toy"),
    [(p, False) for p in PRESETS] + [(p, True) for p in SDXL_PRESETS],
)
def test_kept_modules_are_bit_identical_to_the_teacher(preset, toy):
    pipe = _tiny_pipe(PRESETS[preset].family, toy)
    teacher = pipe.unet
    _remove(pipe, preset=preset)
    student = pipe.unet
    assert student is not teacher
    plan = make_plan(read_structure(teacher), PRESETS[preset].settings("first"))
    top = [n for n, _ in teacher.named_children() if not n.endswith(("blocks", "mid_block"))]
    mapping = module_mapping(plan, top)
    source = teacher.state_dict()
    target = student.state_dict()
    for key, value in target.items():
        assert torch.equal(value, source[teacher_key(mapping, key)]), key
    # Copies, not views: training the student must leave the teacher alone.
    assert all(
        t.data_ptr() != source[teacher_key(mapping, k)].data_ptr() for k, t in target.items()
    )


def test_student_keeps_the_teacher_dtype():
    pipe = _tiny_pipe("sdxl")
    pipe.unet.to(torch.float16)
    teacher = pipe.unet.state_dict()
    _remove(pipe, preset="vega")
    assert {t.dtype for t in pipe.unet.state_dict().values()} == {torch.float16}
    key = "up_blocks.0.attentions.2.transformer_blocks.0.ff.net.2.weight"
    assert torch.equal(pipe.unet.state_dict()[key], teacher[key])


def test_bk_sdm_maps_the_last_up_layer_and_shifts_tiny_up_blocks():
    base = _tiny_pipe("sd15")
    teacher = base.unet
    _remove(base, preset="bk-sdm-base")
    s, t = base.unet.state_dict(), teacher.state_dict()
    # The middle of three up layers goes: student layer 1 starts from teacher layer 2.
    key = "up_blocks.2.resnets.1.conv1.weight"
    assert torch.equal(s[key], t["up_blocks.2.resnets.2.conv1.weight"])
    assert torch.equal(
        s["mid_block.attentions.0.proj_in.weight"], t["mid_block.attentions.0.proj_in.weight"]
    )

    tiny = _tiny_pipe("sd15")
    teacher = tiny.unet
    _remove(tiny, preset="bk-sdm-tiny")
    s, t = tiny.unet.state_dict(), teacher.state_dict()
    # Up blocks shift by one: student up_blocks.0 is teacher up_blocks.1 (the first with
    # transformers), its layer 1 the teacher's layer 2.
    assert torch.equal(
        s["up_blocks.0.attentions.1.proj_in.weight"], t["up_blocks.1.attentions.2.proj_in.weight"]
    )
    assert torch.equal(
        s["up_blocks.2.resnets.0.conv1.weight"], t["up_blocks.3.resnets.0.conv1.weight"]
    )


def test_removed_modules_are_gone_and_reported():
    pipe = _tiny_pipe("sd15")
    report = _remove(pipe, preset="bk-sdm-tiny")
    unet = pipe.unet
    assert len(unet.down_blocks) == 3 and len(unet.up_blocks) == 3 and unet.mid_block is None
    assert unet.down_blocks[2].downsamplers is None
    assert all(len(b.resnets) == 1 for b in unet.down_blocks)
    assert all(len(b.resnets) == 2 for b in unet.up_blocks)
    (edit,) = report.edits
    assert edit.op == "blocks.remove" and edit.in_config and edit.component == "unet"
    assert {"down_blocks.3", "up_blocks.0", "mid_block", "down_blocks.2.downsamplers.0"} <= set(
        edit.removed
    )
    assert "down_blocks.0.resnets.1" in edit.removed
    assert edit.config["block_out_channels"] == [[32, 64, 64, 64], [32, 64, 64]]
    assert edit.config["mid_block_type"] == ["UNetMidBlock2DCrossAttn", None]


def test_ssd_1b_on_tiny_cuts_depths_relative_to_the_teacher():
    pipe = _tiny_pipe("sdxl")  # depths (1, 2, 4) where SDXL has (1, 2, 10)
    report = _remove(pipe, preset="ssd-1b")
    got = read_structure(pipe.unet)
    assert got.down_depths == ((0, 0), (2, 2), (2, 2))  # 4 x 4/10 -> 2
    assert got.up_depths == ((2, 2, 4), (2, 1, 1), (0, 0, 0))
    removed = report.edits[0].removed
    assert "down_blocks.2.attentions.0.transformer_blocks.2" in removed
    assert "down_blocks.2.attentions.0.transformer_blocks.1" not in removed
    assert {"mid_block.attentions.0", "mid_block.resnets.1"} <= set(removed)
    assert not hasattr(pipe.unet.mid_block, "attentions") or not pipe.unet.mid_block.attentions


def test_keep_even_spreads_the_kept_transformer_blocks():
    assert pick_layers(10, 4, "first") == (0, 1, 2, 3)
    assert pick_layers(10, 4, "even") == (0, 3, 6, 9)
    assert pick_layers(4, 2, "even") == (0, 3)
    pipe = _tiny_pipe("sdxl")
    teacher = pipe.unet.state_dict()
    _remove(pipe, down_depths=[1, 2, 2], up_depths=[2, 2, 1], mid="resnet_only", keep="even")
    prefix = "down_blocks.2.attentions.0.transformer_blocks"
    student = pipe.unet.state_dict()
    assert torch.equal(
        student[f"{prefix}.1.attn1.to_q.weight"], teacher[f"{prefix}.3.attn1.to_q.weight"]
    )


def test_generic_keys_reproduce_a_preset():
    by_preset, by_keys, by_drop = (_tiny_pipe("sd15") for _ in range(3))
    _remove(by_preset, preset="bk-sdm-small")
    _remove(by_keys, layers_per_block=1, mid="none")
    _remove(by_drop, drop=["down_blocks.*.*.1", "mid_block"])
    for other in (by_keys, by_drop):
        assert dict(other.unet.config) == dict(by_preset.unet.config)
        for key, value in by_preset.unet.state_dict().items():
            assert torch.equal(other.unet.state_dict()[key], value), key


def test_toy_recipe_builds_the_ssd_style_student():
    from slimdiff.models.toy import build_toy_pipeline

    recipe = load_recipe(ROOT / "recipes" / "toy-shapes-ssd.yaml")
    pipe = build_toy_pipeline()
    for p in build_passes(recipe):
        p.apply(pipe, None)
    got = read_structure(pipe.unet)
    assert got.down_depths == ((0, 0), (2, 2), (2, 2))
    assert got.up_depths == ((2, 2, 2), (2, 2, 2), (0, 0, 0))
    assert got.mid == "resnet_only"
    # Symmetric depths keep diffusers' flat form (no reverse key): the widest compatibility.
    assert list(pipe.unet.config.transformer_layers_per_block) == [1, 2, 2]
    assert pipe.unet.config.reverse_transformer_layers_per_block is None


# ------------------------------------------------------------------ plain diffusers


@pytest.mark.parametrize("preset", list(PRESETS))
def test_artifact_loads_with_plain_diffusers(preset, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    from slimdiff.artifact import save_artifact

    family = PRESETS[preset].family
    model = load_model(f"tiny:{family}")
    report = _remove(model.pipe, preset=preset)
    save_artifact(model.pipe, tmp_path / "a", source=model.source, reports=[report])
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "a" / "unet").eval()
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(tmp_path / "a")
    student = model.pipe.unet
    assert _plain(unet.config) == _plain(student.config)
    for key, value in student.state_dict().items():
        assert torch.equal(pipe.unet.state_dict()[key], value), key

    g = torch.Generator().manual_seed(0)
    cfg = student.config
    sample = torch.randn(2, cfg.in_channels, 16, 16, generator=g)
    context = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    extra = {}
    if family == "sdxl":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pooled, generator=g),
            "time_ids": torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]] * 2),
        }
    with torch.no_grad():
        want = student(sample, 500, context, **extra).sample
        got = unet(sample, 500, context, **extra).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_inspect_counts_the_student_from_the_cli():
    from click.testing import CliRunner

    from slimdiff.cli import main

    recipe = str(ROOT / "recipes" / "sd15-bk-sdm-tiny.yaml")
    result = CliRunner().invoke(main, ["inspect", "random:sd15", "--recipe", recipe, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert report["model"] == "random:sd15"  # the positional model, not the recipe's hub id
    assert report["denoiser"]["params"] == EXPECTED_PARAMS["bk-sdm-tiny"]
    assert [b["name"] for b in report["denoiser"]["blocks"]] == [
        *(f"down_blocks.{i}" for i in range(3)),
        *(f"up_blocks.{i}" for i in range(3)),
    ]


# ------------------------------------------------------------------ errors


def test_unknown_preset_is_rejected_when_the_recipe_is_validated():
    data = {
        "version": 1,
        "model": "tiny:sdxl",
        "passes": [{"pass": "blocks.remove", "preset": "ssd-2b"}],
    }
    with pytest.raises(
        UserError, match=r"passes\[0\] \(blocks\.remove\).*unknown preset 'ssd-2b'.*ssd-1b"
    ):
        validate_recipe(data, "r.yaml")


def test_preset_for_the_wrong_family_names_preset_family_and_fix():
    pipe = _tiny_pipe("sdxl")
    with pytest.raises(
        UserError,
        match=r"preset bk-sdm-base is for sd15 UNets, this model is sdxl; use one of ssd-1b",
    ):
        _remove(pipe, preset="bk-sdm-base")


def test_preset_refuses_an_already_compressed_unet():
    pipe = _tiny_pipe("sdxl")
    _remove(pipe, preset="ssd-1b")
    with pytest.raises(UserError, match="starts from an uncompressed sdxl UNet"):
        _remove(pipe, preset="vega")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"down_depths": [1, 2, 5]}, r"down_blocks\.2\.attentions\.0 can keep 1 to 4 .*not 5"),
        ({"down_depths": [1, 2, 2, 2]}, r"down_depths has 4 entries but the student has 3"),
        ({"up_depths": [[4, 4, 4, 4], 2, 1]}, r"up_depths\[0\] lists 4 depths .* 3 layers"),
        ({"layers_per_block": 3}, r"can keep 1 to 2 layers .*not 3"),
        ({"drop": ["down_blocks.0"]}, r"only the innermost stages can be removed"),
        ({"drop": ["down_blocks.1.attentions.1"]}, r"pairs every ResNet with a transformer"),
        ({"drop": ["up_blocks.0.*.1"]}, r"drop leaves up_blocks\.0 2 layers"),
        ({"drop": ["encoder.*"]}, r"matches no removable module"),
        (
            {"drop": ["mid_block.resnets.1"]},
            r"drop mid_block\.attentions\.0 and mid_block\.resnets\.1",
        ),
        (
            {"drop": ["up_blocks.2.resnets.0", "down_blocks.0.resnets.1"]},
            r"cannot start from the teacher.s",
        ),
    ],
)
def test_bad_structures_get_one_clear_error(config, message):
    with pytest.raises(UserError, match=message):
        _remove(_tiny_pipe("sdxl"), **config)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "give a preset"),
        ({"preset": "vega", "mid": "none"}, "preset vega sets the structure; remove mid"),
        ({"preset": "vega", "depth": 2}, "Extra inputs"),
        ({"mid": "half"}, "Input should be"),
    ],
)
def test_bad_configs_fail_validation(config, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        get_pass("blocks.remove").Config.model_validate(config)


def test_transformer_models_are_refused():
    pipe = load_model("tiny:flux").pipe
    with pytest.raises(UserError, match=r"blocks\.remove cuts UNet2DConditionModel denoisers"):
        _remove(pipe, preset="ssd-1b")


def test_validating_a_recipe_does_not_import_torch():
    code = (
        "import sys\nfrom slimdiff.recipe import load_recipe\n"
        f"load_recipe({str(ROOT / 'recipes' / 'sdxl-ssd-1b.yaml')!r})\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
