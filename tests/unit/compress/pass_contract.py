"""The contract every compression pass meets; a pass's tests inherit it.

    class TestRemoveBlocks(PassContract):
        pass_name = "blocks.remove"
        config = {"preset": "ssd-1b"}
        family = "sdxl"

Each check runs on a tiny pipeline built in code (no download), in seconds.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pydantic
import pytest
import torch
import yaml
from slimdiff.compress import PassReport, get_pass

from slimdiff.models import load_model
from slimdiff.models.arch import matches

SIZE = (128, 128)


def _final_latents(pipe, seed: int = 0) -> torch.Tensor:
    g = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        out = pipe(
            "a red circle on the left",
            num_inference_steps=2,
            height=SIZE[0],
            width=SIZE[1],
            generator=g,
            output_type="latent",
        )
    return out.images


class PassContract:
    pass_name: ClassVar[str]
    config: ClassVar[dict[str, Any]] = {}
    family: ClassVar[str] = "sdxl"

    def make(self):
        cls = get_pass(self.pass_name)
        return cls(cls.Config.model_validate(self.config))

    def calibration(self, model):
        from slimdiff.calib import Calibration
        from slimdiff.recipe import CalibrationSpec

        spec = CalibrationSpec(num_prompts=2, steps=2, size=SIZE)
        return Calibration(model.pipe, model.arch, spec)

    def _apply(self, model) -> PassReport:
        p = self.make()
        calib = self.calibration(model) if p.needs_calibration else None
        return p.apply(model.pipe, calib)

    def test_config_rejects_unknown_keys(self):
        cls = get_pass(self.pass_name)
        with pytest.raises(pydantic.ValidationError):
            cls.Config.model_validate({**self.config, "no_such_key_xyz": 1})

    def test_config_round_trips_through_yaml(self):
        cfg = self.make().config
        dumped = yaml.safe_dump(cfg.model_dump(mode="json"))
        assert type(cfg).model_validate(yaml.safe_load(dumped)) == cfg

    def test_apply_keeps_output_shape_and_reports(self):
        model = load_model(f"tiny:{self.family}")
        model.pipe.set_progress_bar_config(disable=True)
        before = _final_latents(model.pipe)
        report = self._apply(model)
        after = _final_latents(model.pipe)
        assert isinstance(report, PassReport) and report.name == self.pass_name
        assert after.shape == before.shape
        assert torch.isfinite(after).all()

    def test_frozen_modules_are_untouched(self):
        model = load_model(f"tiny:{self.family}")
        reference = load_model(f"tiny:{self.family}")
        self._apply(model)
        params = dict(model.denoiser.named_parameters())
        checked = 0
        for name, ref in reference.denoiser.named_parameters():
            if matches(name.rsplit(".", 1)[0], model.arch.frozen):
                assert name in params and torch.equal(params[name], ref), name
                checked += 1
        assert checked > 0

    def test_artifact_reloads_with_identical_outputs(self, tmp_path):
        """Save then load (slimdiff.load: configs, replayed edits, safetensors) gives the
        same weights and bit-identical outputs."""
        from slimdiff.artifact import save_artifact

        model = load_model(f"tiny:{self.family}")
        model.pipe.set_progress_bar_config(disable=True)
        report = self._apply(model)
        save_artifact(model.pipe, tmp_path / "a", source=model.source, reports=[report])
        again = load_model(str(tmp_path / "a"))  # what slimdiff.load does
        again.pipe.set_progress_bar_config(disable=True)
        saved = again.denoiser.state_dict()
        for name, value in model.denoiser.state_dict().items():
            assert torch.equal(saved[name], value), name  # weights round-trip bit for bit
        assert torch.equal(_final_latents(again.pipe), _final_latents(model.pipe))
