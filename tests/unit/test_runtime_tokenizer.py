"""The runtime's tokenizer gives exactly the ids transformers' tokenizers give in pipelines.

diffusers calls `tokenizer(prompt, padding="max_length", max_length=N, truncation=True)`;
the runtime reads only the saved tokenizer.json with the `tokenizers` library.
"""

from __future__ import annotations

import numpy as np
import pytest
from slimdiff.runtime.tokenizer import PromptTokenizer

from slimdiff.errors import UserError
from slimdiff.models.tokenizer_files import make_clip_tokenizer, make_t5_tokenizer

LONG = " ".join(["a red cat with blue glasses over the mountain at sunset"] * 12)
PROMPTS = [
    "a red cat",
    "",
    "A Photo of a CAT, high-quality.   Two  spaces!",
    "unknownword zxqv 1234 émoji ☃",
    LONG,  # over 77 CLIP tokens and over 64 T5 tokens: truncated, closing special kept
]


def _reference(tok, prompts: list[str], max_length: int) -> np.ndarray:
    ids = tok(prompts, padding="max_length", max_length=max_length, truncation=True).input_ids
    return np.array(ids, dtype=np.int64)


def _runtime(tok, tmp_path, max_length: int) -> PromptTokenizer:
    tok.save_pretrained(tmp_path)
    return PromptTokenizer.from_file(tmp_path / "tokenizer.json", max_length, tok.pad_token_id)


@pytest.mark.parametrize(
    "pad_token",
    ["<|endoftext|>", "!"],  # CLIP-L pads with <|endoftext|>; SDXL/SD3's OpenCLIP-G with "!"
    ids=["clip", "clip_pad_bang"],
)
def test_clip_ids_match_transformers(tmp_path, pad_token):
    tok = make_clip_tokenizer(pad_token=pad_token)
    runtime = _runtime(tok, tmp_path, 77)
    ids = runtime(PROMPTS)
    assert ids.dtype == np.int64 and ids.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(ids, _reference(tok, PROMPTS, 77))
    # the long prompt is cut to 77 with <|endoftext|> last; short ones end in padding
    assert ids[4, -1] == tok.eos_token_id
    assert ids[0, 0] == tok.bos_token_id and ids[0, -1] == tok.pad_token_id


def test_sdxl_second_tokenizer_pads_with_bang(tmp_path):
    tok = make_clip_tokenizer(pad_token="!")
    runtime = _runtime(tok, tmp_path, 77)
    row = runtime(["a red cat"])[0]
    bang = tok.convert_tokens_to_ids("!")
    eos = int(np.flatnonzero(row == tok.eos_token_id)[0])
    assert runtime.pad_token_id == bang
    assert (row[eos + 1 :] == bang).all() and eos + 1 < 77


@pytest.mark.parametrize("max_length", [64, 256, 512])  # truncating, SD3 and FLUX lengths
def test_t5_ids_match_transformers(tmp_path, max_length):
    tok = make_t5_tokenizer(max_length)
    runtime = _runtime(tok, tmp_path, max_length)
    ids = runtime(PROMPTS)
    assert ids.shape == (len(PROMPTS), max_length)
    np.testing.assert_array_equal(ids, _reference(tok, PROMPTS, max_length))


def test_t5_long_prompt_is_truncated_keeping_eos(tmp_path):
    tok = make_t5_tokenizer(64)
    row = _runtime(tok, tmp_path, 64)([LONG])[0]
    assert row[-1] == tok.eos_token_id
    assert (row != tok.pad_token_id).all()


def test_unknown_pad_id_is_a_user_error(tmp_path):
    tok = make_clip_tokenizer()
    tok.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="pad_token_id 999999"):
        PromptTokenizer.from_file(tmp_path / "tokenizer.json", 77, 999999)


def test_unreadable_tokenizer_file_is_a_user_error(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match=r"not a readable tokenizer\.json"):
        PromptTokenizer.from_file(bad, 77, 0)


def test_a_prompt_cut_at_max_length_is_warned_about(tmp_path, caplog):
    from slimdiff.runtime.tokenizer import PromptTokenizer

    from slimdiff.models.tokenizer_files import make_clip_tokenizer

    tok = make_clip_tokenizer()
    tok.save_pretrained(tmp_path)
    runtime = PromptTokenizer.from_file(tmp_path / "tokenizer.json", 8, tok.pad_token_id)
    runtime(["a cat"])
    assert not caplog.records
    ids = runtime(["a red cat on the sky of a blue square photo", "a cat"])
    assert ids.shape == (2, 8)
    (record,) = caplog.records
    assert "longer than the 8 tokens this text encoder reads" in record.getMessage()
    # `cut` names the prompts a call cuts; warn=False leaves the warning to the caller
    long = "a red cat on the sky of a blue square photo"
    assert runtime.cut([long, "a cat"]) == [long]
    caplog.clear()
    assert (runtime([long], warn=False) == ids[:1]).all() and not caplog.records
