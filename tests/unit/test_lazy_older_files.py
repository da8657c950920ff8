"""Folders whose text encoders an older transformers saved (every hub SD1.5, SDXL and FLUX
folder: CLIPTextModel's keys under `text_model.`, T5's embedding only as `shared.weight`)
load lazily, tensor by tensor, to the weights from_pretrained gives them; so they stream
(`export --weights stream`) instead of being refused or loaded whole."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from slimdiff.cli import main
from slimdiff.models import load_model
from slimdiff.models.lazy import materialize


def _as_transformers_4_saved(folder, dtype: str):
    """CLIPTextModel's keys with the prefix transformers 4 wrote; T5's tied embedding
    under one name, as its save_pretrained deduplicated it; the configs' torch_dtype a
    half type, as the hub's SDXL (float16) and FLUX (bfloat16) configs say."""
    for name in ("text_encoder", "text_encoder_2"):
        file = folder / name / "model.safetensors"
        if not file.is_file():
            continue
        config = json.loads((folder / name / "config.json").read_text())
        config.pop("dtype", None)
        (folder / name / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}))
        state = load_file(file)
        if "embeddings.token_embedding.weight" in state:  # transformers 5's CLIPTextModel
            state = {f"text_model.{k}": v for k, v in state.items()}
        state.pop("encoder.embed_tokens.weight", None)
        save_file(state, file, metadata={"format": "pt"})


@pytest.fixture(scope="module", params=["sdxl", "flux"])
def older(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "pipe"
    load_model(f"tiny:{request.param}").pipe.save_pretrained(folder)
    _as_transformers_4_saved(folder, "float16" if request.param == "sdxl" else "bfloat16")
    return folder


def test_lazy_text_encoders_read_the_weights_from_pretrained_reads(older):
    lazy = load_model(str(older), weights="lazy").pipe
    eager = load_model(str(older)).pipe
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(eager, name, None) is None:
            continue
        got = materialize(getattr(lazy, name)).state_dict()
        want = getattr(eager, name).state_dict()
        assert {v.dtype for v in got.values() if v.is_floating_point()} == {torch.float32}
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[k], want[k]) for k in want), name


@pytest.mark.parametrize("older", ["flux"], indirect=True)  # CLIP and T5 both
@pytest.mark.parametrize("weights", ["stream", "auto"])
def test_such_a_folder_streams(older, tmp_path, weights):
    """The default (auto) and stream exports go lazy: the parity check of each graph
    runs the float32 torch model."""
    out = tmp_path / "b"
    args = ["export", str(older), "--out", str(out), "--weights", weights]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").is_file()
