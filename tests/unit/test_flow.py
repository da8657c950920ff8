"""The compress-then-export flow caches by what the model is, not by its name."""

from __future__ import annotations

import pytest
import torch

from slimdiff.app.flow import compress_and_export
from slimdiff.models import load_model
from slimdiff.recipe import validate_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_retrained_folder_at_the_same_path_is_compressed_again(tmp_path):
    folder = tmp_path / "model"
    load_model("tiny:sd3").pipe.save_pretrained(folder, safe_serialization=True)
    recipe = validate_recipe({"model": str(folder), "export": {"optimize": False}})
    first = compress_and_export(recipe, tmp_path / "out")
    assert first.reused == []
    again = compress_and_export(recipe, tmp_path / "out")
    assert again.reused == ["compress", "export:onnx"]
    retrained = load_model(str(folder))
    with torch.no_grad():
        retrained.pipe.transformer.proj_out.bias.add_(1e-3)
    retrained.pipe.save_pretrained(folder, safe_serialization=True)  # same path, new weights
    third = compress_and_export(recipe, tmp_path / "out")
    assert third.reused == []
    artifact = load_model(str(third.artifact)).pipe.transformer.proj_out.bias
    torch.testing.assert_close(artifact, retrained.pipe.transformer.proj_out.bias, rtol=0, atol=0)
