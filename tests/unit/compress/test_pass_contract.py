"""The contract mixin itself, exercised on a small real pass defined here."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from slimdiff.compress import Pass, PassConfig, PassReport, Stage, register_pass, unregister_pass

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


@pytest.fixture(autouse=True, scope="module")
def _registered():
    register_pass(_ScaleFFN)
    yield
    unregister_pass(_ScaleFFN.name)


class TestScaleFFNMeetsTheContract(PassContract):
    pass_name = "test.scale_ffn"
    config: ClassVar[dict] = {"scale": 0.25}
    family = "sdxl"


def test_contract_catches_a_pass_that_touches_never_compress_modules():
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
            contract.test_never_compress_modules_are_untouched()
    finally:
        unregister_pass("test.bad")
