"""The contract mixin itself, exercised on a small real pass defined here."""

from __future__ import annotations

import json
from typing import ClassVar, Literal

import pytest
import torch
from slimdiff.compress import Pass, PassConfig, PassReport, Stage, register_pass, unregister_pass
from torch import nn

from slimdiff.edits import Edit
from slimdiff.errors import UserError
from slimdiff.models import load_model
from tests.unit.compress.pass_contract import PassContract


class _ScaleFFNConfig(PassConfig):
    scale: float = 0.5


class _ScaleFFN(Pass):
    """Scales the output projection of every feed-forward block (changes weights only)."""

    name = "test.scale_ffn"
    stage = Stage.PRUNING
    Config = _ScaleFFNConfig

    def apply(self, pipe, calib):
        unet = pipe.unet
        n = 0
        with torch.no_grad():
            for name, module in unet.named_modules():
                if name.endswith("ff.net.2"):
                    module.weight.mul_(self.config.scale)
                    n += 1
        return PassReport(self.name, summary={"scaled": n})


class FFNSliced(Edit):
    """A feed-forward block cut to its first `hidden` neurons: a width per block, which
    diffusers' config cannot say (as EcoDiff's pruning records them)."""

    op: Literal["test.slice_ffn"] = "test.slice_ffn"
    module: str
    hidden: int


def _slice(ff: nn.Module, hidden: int, meta: bool) -> None:
    """GEGLU: the up projection's rows are [value; gate], both halves cut alike."""
    up, down = ff.net[0].proj, ff.net[2]
    width = up.out_features // 2
    new_up = nn.Linear(up.in_features, 2 * hidden, device="meta" if meta else None)
    new_down = nn.Linear(hidden, down.out_features, device="meta" if meta else None)
    if not meta:
        rows = torch.cat([torch.arange(hidden), width + torch.arange(hidden)])
        with torch.no_grad():
            new_up.weight.copy_(up.weight[rows])
            new_up.bias.copy_(up.bias[rows])
            new_down.weight.copy_(down.weight[:, :hidden])
            new_down.bias.copy_(down.bias)
    ff.net[0].proj, ff.net[2] = new_up, new_down


class _SliceFFN(Pass):
    """Halves every feed-forward block of the UNet: an edit replayed on load."""

    name = "test.slice_ffn"
    stage = Stage.PRUNING
    edits = (FFNSliced,)

    def apply(self, pipe, calib):
        edits = []
        for name, module in pipe.unet.named_modules():
            if name.endswith(".ff"):
                hidden = module.net[0].proj.out_features // 4
                _slice(module, hidden, meta=False)
                edits.append(FFNSliced(component="unet", module=name, hidden=hidden))
        return PassReport(self.name, edits=edits)

    @classmethod
    def restore(cls, module, edit):
        _slice(module.get_submodule(edit.module), edit.hidden, meta=True)


@pytest.fixture(autouse=True, scope="module")
def _registered():
    register_pass(_ScaleFFN)
    register_pass(_SliceFFN)
    yield
    unregister_pass(_ScaleFFN.name)
    unregister_pass(_SliceFFN.name)


class TestScaleFFNMeetsTheContract(PassContract):
    pass_name = "test.scale_ffn"
    config: ClassVar[dict] = {"scale": 0.25}
    family = "sdxl"


class TestReplayedEditsMeetTheContract(PassContract):
    """An artifact diffusers cannot load alone: slimdiff rebuilds it from its edits."""

    pass_name = "test.slice_ffn"
    family = "sdxl"


def _sliced_artifact(tmp_path):
    from slimdiff.artifact import save_artifact

    model = load_model("tiny:sdxl")
    report = _SliceFFN().apply(model.pipe, None)
    return save_artifact(model.pipe, tmp_path / "a", source="tiny:sdxl", reports=[report])


def test_replayed_edits_rebuild_what_the_config_cannot_say(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    path = _sliced_artifact(tmp_path)
    with pytest.raises((RuntimeError, ValueError)):  # diffusers alone: shapes do not match
        StableDiffusionXLPipeline.from_pretrained(path, use_safetensors=True)
    again = load_model(str(path))
    ff = again.pipe.unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.ff")
    assert ff.net[2].in_features == ff.net[0].proj.out_features // 2
    assert not any(p.is_meta for p in again.pipe.unet.parameters())


def test_an_unknown_or_malformed_edit_is_one_clear_error(tmp_path):
    path = _sliced_artifact(tmp_path)
    meta_path = path / "slimdiff.json"
    meta = json.loads(meta_path.read_text())
    bad = dict(meta, edits=[{"op": "prune.future", "component": "unet"}])
    meta_path.write_text(json.dumps(bad))
    with pytest.raises(UserError, match=r"edit 'prune\.future' is not one this slimdiff can"):
        load_model(str(path))
    bad = dict(meta, edits=[{**meta["edits"][0], "hidden": "many"}])
    meta_path.write_text(json.dumps(bad))
    with pytest.raises(UserError, match=r"edit 'test.slice_ffn' is malformed \(field 'hidden'"):
        load_model(str(path))
    bad = dict(meta, edits=[{**meta["edits"][0], "component": "transformer"}])
    meta_path.write_text(json.dumps(bad))
    with pytest.raises(UserError, match="names component 'transformer'"):
        load_model(str(path))


def test_a_pass_that_records_edits_must_restore_them():
    class NoRestore(_ScaleFFN):
        name = "test.no_restore"
        edits = (FFNSliced,)

    with pytest.raises(TypeError, match="define restore"):
        register_pass(NoRestore)


def test_contract_catches_a_pass_that_touches_frozen_modules():
    class Bad(_ScaleFFN):
        name = "test.bad"

        def apply(self, pipe, calib):
            with torch.no_grad():
                pipe.unet.conv_in.weight.add_(1.0)
            return PassReport(self.name)

    register_pass(Bad)
    try:
        contract = TestScaleFFNMeetsTheContract()
        contract.pass_name = "test.bad"
        contract.config = {}
        with pytest.raises(AssertionError, match="conv_in"):
            contract.test_frozen_modules_are_untouched()
    finally:
        unregister_pass("test.bad")


def test_slimdiff_load_rebuilds_an_artifact_with_its_edits(tmp_path):
    import slimdiff

    pipe = slimdiff.load(str(_sliced_artifact(tmp_path)))
    ff = pipe.unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.ff")
    assert ff.net[2].in_features == ff.net[0].proj.out_features // 2
