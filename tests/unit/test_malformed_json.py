"""A model folder's JSON that is readable but not what save_pretrained writes (a string
for model_index.json, a number for _class_name, a shard index cut short or a list) is
refused in one line naming the file, not an AttributeError or JSONDecodeError."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from slimdiff.cli import main
from slimdiff.models import load_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved") / "pipe"
    load_model("tiny:sd15").pipe.save_pretrained(root)
    # the UNet as two shards and their index, as save_pretrained(max_shard_size=...) writes
    unet = root / "unet"
    state = load_file(unet / "diffusion_pytorch_model.safetensors")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(state)
    halves = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2 :]}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, unet / name)
    weight_map = {k: name for name, part in halves.items() for k in part}
    index = {"metadata": {}, "weight_map": weight_map}
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return root


def test_the_sharded_folder_loads(saved):
    for weights in ("memory", "lazy"):
        assert load_model(str(saved), weights=weights).arch.family == "sd15"


@pytest.mark.parametrize(
    ("file", "text", "fragment"),
    [
        ("model_index.json", '"hello"', "model_index.json: holds a JSON str, not an object"),
        ("model_index.json", None, "_class_name is 5, not a diffusers pipeline class"),
        ("unet/diffusion_pytorch_model.safetensors.index.json", '{"weight_map": ', "unreadable"),
        ("unet/diffusion_pytorch_model.safetensors.index.json", "[]", "not a shard index"),
        (
            "unet/diffusion_pytorch_model.safetensors.index.json",
            '{"weight_map": {"a": "../x"}}',
            "not a shard index",
        ),
    ],
)
@pytest.mark.parametrize("command", ["inspect", "export-stream"])
def test_malformed_json_is_one_line(saved, tmp_path, file, text, fragment, command):
    folder = tmp_path / "pipe"
    shutil.copytree(saved, folder)
    if text is None:
        index = json.loads((folder / file).read_text())
        text = json.dumps({**index, "_class_name": 5})
    (folder / file).write_text(text)
    args = (
        ["inspect", str(folder)]
        if command == "inspect"
        else ["export", str(folder), "--out", str(tmp_path / "b"), "--weights", "stream"]
    )
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output
