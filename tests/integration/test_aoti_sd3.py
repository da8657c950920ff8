"""AOTInductor target for SD3 (tiny:sd3): the transformer as a .pt2 package with dynamic
batch, text length and sides in whole patches (export/aoti.py: the positional crop as
narrow(), contiguous inputs after the joint attention's split). Its compile takes ~20 s."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers.models.embeddings import PatchEmbed
from slimdiff.export import export_bundle
from slimdiff.export.aoti import _narrow_crop
from slimdiff.export.components import plan_components
from slimdiff.export.dummy_inputs import Sizes
from slimdiff.runtime import Text2ImagePipeline
from slimdiff.runtime.backends.aoti import AotiBackend

from slimdiff.errors import UserError
from slimdiff.metrics import psnr
from slimdiff.models import load_model
from tests.onnx_check import package_vs_eager, rel_err

# pyproject.toml's 300 s per test catches hangs; an AOTInductor compile takes 60 s on a quiet
# 2-core host, and 2-3x that on a loaded one
pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.timeout(900),
]

SIDES = {"min": 4, "max": 62, "multiple": 2}  # tiny:sd3: 32 positions of 2 latent px


@pytest.fixture(scope="module")
def aoti(tmp_path_factory, quick_inductor):
    model = load_model("tiny:sd3")
    out = tmp_path_factory.mktemp("aoti-sd3") / "bundle"
    manifest = export_bundle(model, out, target="aoti")
    return model, out, manifest


def test_the_transformer_is_a_package_with_sides_in_whole_patches(aoti):
    model, out, manifest = aoti
    entry = manifest.components["transformer"]
    assert (entry.path, entry.format) == ("transformer/model.pt2", "aoti")
    assert entry.parity["passed"] and entry.parity["rel_err"] < 1e-4
    io = json.loads((out / "transformer" / "io.json").read_text())
    assert io["axes"] == {
        "B": {"min": 1, "max": 32},
        "H": SIDES,
        "W": SIDES,
        "S": {"min": 1, "max": 512},
    }
    # The model is left as found: no instance crop, no hooks on its Linears.
    transformer = model.pipe.transformer
    assert "cropped_pos_embed" not in vars(transformer.pos_embed)
    assert not any(m._forward_pre_hooks for m in transformer.modules())


def test_package_matches_eager_diffusers_across_its_range(aoti):
    """Batch 1 and 3, one text token and 512, both ends of the side range, none the
    trace's sizes: against the eager transformer with diffusers' own crop."""
    model, out, _ = aoti
    component = next(c for c in plan_components(model) if c.name == "transformer")
    session = AotiBackend(device="cpu").load(out / "transformer" / "model.pt2")
    for sizes in (Sizes(1, 4, 62, 1, seed=1), Sizes(3, 62, 4, 512, seed=2), Sizes(1, 10, 30, 77)):
        got, ref = package_vs_eager(component, session, sizes)
        assert got.shape == ref.shape == (sizes.batch, 16, sizes.height, sizes.width)
        assert rel_err(got, ref) < 1e-4, sizes


@pytest.mark.parametrize(("side", "why"), [(5, "in steps of 2"), (64, "outside the 4..62")])
def test_a_side_the_package_does_not_take_is_a_user_error(aoti, side, why):
    model, out, _ = aoti
    component = next(c for c in plan_components(model) if c.name == "transformer")
    session = AotiBackend(device="cpu").load(out / "transformer" / "model.pt2")
    feeds = {k: v.numpy() for k, v in component.make_inputs(Sizes(1, 8, side, 7)).items()}
    with pytest.raises(UserError, match=rf"axis W of hidden_states is {side}, .*{why}"):
        session.run(feeds)


def test_image_matches_the_onnx_bundle(aoti, shared_bundle):
    _, out, _ = aoti
    onnx = shared_bundle("sd3", optimize=False)
    images = {}
    for name, bundle, backend in (("aoti", out, "aoti"), ("onnx", onnx.out, "ort-cpu")):
        pipe = Text2ImagePipeline.from_bundle(bundle, backend=backend)
        images[name] = pipe("a red circle", steps=4, seed=3).image
    assert psnr(images["aoti"], images["onnx"]) >= 40


def test_narrow_crop_is_diffusers_crop():
    embed = PatchEmbed(
        height=16, width=16, patch_size=2, in_channels=4, embed_dim=8, pos_embed_max_size=12
    )
    for height, width in ((2, 2), (4, 24), (24, 24), (10, 6), (7, 9)):
        want = embed.cropped_pos_embed(height, width)
        got = _narrow_crop(embed, height, width)
        assert got.shape == want.shape == (1, (height // 2) * (width // 2), 8)
        assert torch.equal(got, want)
