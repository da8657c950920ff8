"""A tokenizer.json that would feed the text encoder ids it has no embedding for, or whose
post-processor leaves no room for the prompt, is refused in one line when it loads (so
`slimdiff verify` says so), not by an onnxruntime Gather or numpy traceback mid-run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from slimdiff.runtime.manifest import BundleError
from slimdiff.runtime.tokenizer import PromptTokenizer

from slimdiff.models.tokenizer_files import clip_vocab_size, make_clip_tokenizer, make_t5_tokenizer
from tests.unit.bundle_tampering import TOK

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@pytest.fixture(scope="module")
def clip_json(tmp_path_factory) -> dict:
    """The tiny CLIP tokenizer's tokenizer.json, as transformers saves it."""
    folder = tmp_path_factory.mktemp("clip")
    make_clip_tokenizer().save_pretrained(folder)
    return json.loads((folder / "tokenizer.json").read_text())


def _load(document: dict, max_length: int = 77, vocab_size: int | None = None):
    vocab = document["model"]["vocab"]
    data = json.dumps(document).encode()
    return PromptTokenizer.from_bytes(data, max_length, vocab[EOS], "tok.json", vocab_size)


def _template(specials: int, special_id: int) -> dict:
    """A post-processor adding `specials` copies of <|startoftext|> (id `special_id`)."""
    bos = {"SpecialToken": {"id": BOS, "type_id": 0}}
    return {
        "type": "TemplateProcessing",
        "single": [bos] * specials + [{"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
        "special_tokens": {BOS: {"id": BOS, "ids": [special_id], "tokens": [BOS]}},
    }


def test_the_tokenizers_slimdiff_exports_load(tmp_path, clip_json):
    assert _load(clip_json, vocab_size=clip_vocab_size())(["a cat"]).shape == (1, 77)
    # T5 as the hub ships it, its 100 sentinel tokens added after the vocabulary
    t5 = make_t5_tokenizer()
    t5.add_special_tokens({"additional_special_tokens": [f"<extra_id_{i}>" for i in range(100)]})
    t5.save_pretrained(tmp_path)
    runtime = PromptTokenizer.from_file(tmp_path / "tokenizer.json", 64, t5.pad_token_id)
    assert runtime(["a cat <extra_id_99>"]).shape == (1, 64)
    assert runtime(["<extra_id_99>"])[0, 0] == t5.convert_tokens_to_ids("<extra_id_99>")


def test_a_vocabulary_id_past_the_tokenizers_count_is_refused(clip_json):
    document = json.loads(json.dumps(clip_json))
    count = len(document["model"]["vocab"])
    document["model"]["vocab"]["a</w>"] = 5000
    with pytest.raises(BundleError) as caught:
        _load(document)
    assert str(caught.value).startswith(
        f"tok.json: token 'a</w>' has id 5000, outside 0..{count - 1}, the ids of the "
        f"tokenizer's {count} tokens, which the text encoder's vocabulary matches; export"
    )
    assert "\n" not in str(caught.value)


def test_an_id_past_the_text_encoders_vocabulary_is_refused(clip_json):
    # the tokenizer is consistent, but larger than the encoder it feeds
    with pytest.raises(BundleError, match=r"has id \d+, past the text encoder's vocabulary of 100"):
        _load(clip_json, vocab_size=100)


def test_a_post_processor_special_token_past_the_vocabulary_is_refused(clip_json):
    document = {**clip_json, "post_processor": _template(1, 99999)}
    with pytest.raises(BundleError, match=r"token '<\|startoftext\|>' has id 99999, outside"):
        _load(document)


def test_more_special_tokens_than_max_length_is_refused(clip_json):
    bos = clip_json["model"]["vocab"][BOS]
    document = {**clip_json, "post_processor": _template(500, bos)}
    with pytest.raises(BundleError) as caught:
        _load(document)
    assert str(caught.value).startswith(
        "tok.json: its post-processor adds 500 special tokens to every prompt, which leaves no "
        "room in the 77 tokens the text encoder reads; export"
    )
    with pytest.raises(BundleError, match="adds 77 special tokens"):
        _load({**clip_json, "post_processor": _template(77, bos)})


def test_one_token_short_of_max_length_still_gives_full_rows(clip_json):
    bos = clip_json["model"]["vocab"][BOS]
    tokenizer = _load({**clip_json, "post_processor": _template(76, bos)})
    ids = tokenizer(["", "a cat", "a red cat " * 40], warn=False)
    assert ids.shape == (3, 77)
    np.testing.assert_array_equal(ids[:, :76], bos)


# ---------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def bundle(shared_bundle, one_torch_thread) -> Path:
    return shared_bundle("sd15", optimize=False).out  # read only: tests edit copies


def _with_tokenizer(bundle: Path, tmp_path: Path, change) -> Path:
    """A copy of `bundle` whose tokenizer.json is changed by `change`, hashes fixed."""
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    path = copy / TOK
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"][TOK] = hashlib.sha256(path.read_bytes()).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda d: d["model"]["vocab"].__setitem__("a</w>", 5000), "token 'a</w>' has id 5000"),
        (lambda d: d.update(post_processor=_template(500, 0)), "adds 500 special tokens"),
    ],
    ids=["id-past-vocabulary", "special-tokens-past-max-length"],
)
@pytest.mark.parametrize("command", ["verify", "run"])
def test_cli_refuses_with_one_line_before_any_graph_runs(
    bundle, tmp_path, change, fragment, command
):
    copy = _with_tokenizer(bundle, tmp_path, change)
    out = tmp_path / "x.png"
    extra = ["--prompt", "a cat", "--out", str(out)] if command == "run" else []
    done = subprocess.run(
        [sys.executable, "-m", "slimdiff", command, str(copy), *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == "", done
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {copy / TOK}: "), done.stderr
    assert fragment in lines[0]
    assert not out.exists()


def test_the_manifest_records_the_encoders_vocabulary_and_the_runtime_checks_it(bundle, tmp_path):
    """export writes the text encoder's vocab_size; a tokenizer whose ids pass it is refused
    at open, naming the vocabulary (here the manifest's number is cut instead)."""
    from slimdiff.runtime import Text2ImagePipeline

    manifest = json.loads((bundle / "manifest.json").read_text())
    (record,) = manifest["pipeline"]["text_encoders"]
    assert record["vocab_size"] == clip_vocab_size()
    copy = tmp_path / "cut"
    shutil.copytree(bundle, copy)
    record["vocab_size"] = 100
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="past the text encoder's vocabulary of 100 tokens"):
        Text2ImagePipeline.from_bundle(copy)
