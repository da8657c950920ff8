"""Prompt tokenization for CLIP and T5 text encoders, from a bundle's `tokenizer.json`.

The diffusers pipelines call their tokenizers with `padding="max_length",
max_length=..., truncation=True`: the special tokens (CLIP's <|startoftext|> and
<|endoftext|>, T5's </s>) are added and count towards `max_length`, longer prompts are cut
before the closing special token, and shorter ones are padded with the pad token (CLIP-L:
<|endoftext|>, OpenCLIP bigG in SDXL and SD3: "!", T5: <pad>). `tokenizers` does all of
that from `tokenizer.json` alone, without transformers; tests/unit/test_runtime_tokenizer.py
checks the ids against transformers' CLIPTokenizer and T5Tokenizer.

Example:
    >>> tok = PromptTokenizer.from_file("bundle/tokenizer/tokenizer.json", 77, 49407)
    >>> tok(["a red cat"]).shape                                    # doctest: +SKIP
    (1, 77)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from slimdiff.runtime.manifest import FIX, BundleError
from tokenizers import Tokenizer

__all__ = ["PromptTokenizer", "shown"]

log = logging.getLogger(__name__)


class PromptTokenizer:
    """Pads and truncates prompts to a fixed length; returns int64 ids (B, max_length)."""

    def __init__(self, tokenizer: Tokenizer, max_length: int, pad_token_id: int) -> None:
        pad_token = tokenizer.id_to_token(pad_token_id)
        if pad_token is None:
            raise BundleError(
                f"pad_token_id {pad_token_id} is not in the tokenizer's vocabulary; {FIX}"
            )
        self.max_length = max_length
        self.pad_token_id = pad_token_id
        self._tokenizer = tokenizer
        # Settings stored in tokenizer.json (if any) are replaced: the manifest is what
        # the pipeline contract says, the file only carries the vocabulary and rules.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        tokenizer.enable_truncation(max_length=max_length)
        tokenizer.enable_padding(length=max_length, pad_id=pad_token_id, pad_token=pad_token)

    @classmethod
    def from_file(cls, path: str | Path, max_length: int, pad_token_id: int) -> PromptTokenizer:
        """Read a `tokenizer.json` (the file transformers' fast tokenizers save)."""
        return cls.from_bytes(Path(path).read_bytes(), max_length, pad_token_id, where=path)

    @classmethod
    def from_bytes(
        cls, data: bytes, max_length: int, pad_token_id: int, where: str | Path
    ) -> PromptTokenizer:
        """Build from a tokenizer.json's bytes: the runtime passes the bytes it hashed, so
        nothing is read twice. `where` names the file in errors.
        """
        try:
            tokenizer = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as err:  # tokenizers raises a bare Exception on parse errors
            reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise BundleError(f"{where}: not a readable tokenizer.json ({reason}); {FIX}") from None
        try:
            return cls(tokenizer, max_length, pad_token_id)
        except BundleError as err:
            raise BundleError(f"{where}: {err}") from None

    def cut(self, prompts: Sequence[str]) -> list[str]:
        """The `prompts` longer than max_length, which a call cuts."""
        encodings = self._tokenizer.encode_batch(list(prompts), add_special_tokens=True)
        return [p for p, e in zip(prompts, encodings, strict=True) if e.overflowing]

    def __call__(self, prompts: Sequence[str], warn: bool = True) -> np.ndarray:
        """Token ids, int64 (len(prompts), max_length), special tokens included. A prompt
        longer than max_length is cut, as the diffusers pipelines cut it, with a warning
        (`warn` False: the caller warns, e.g. once for a pipeline's several encoders)."""
        encodings = self._tokenizer.encode_batch(list(prompts), add_special_tokens=True)
        for prompt, encoding in zip(prompts, encodings, strict=True):
            if encoding.overflowing and warn:
                log.warning(
                    "prompt %r is longer than the %d tokens this text encoder reads; the "
                    "rest is ignored, as in diffusers",
                    shown(prompt),
                    self.max_length,
                )
        return np.array([e.ids for e in encodings], dtype=np.int64).reshape(
            len(prompts), self.max_length
        )


def shown(prompt: str) -> str:
    """`prompt` cut to 60 characters for a log line."""
    return prompt if len(prompt) <= 60 else prompt[:57] + "..."
