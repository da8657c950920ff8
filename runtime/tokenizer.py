"""Prompt tokenization for CLIP and T5 text encoders, from a bundle's `tokenizer.json`.

The diffusers pipelines call their tokenizers with `padding="max_length",
max_length=..., truncation=True`: the special tokens (CLIP's <|startoftext|> and
<|endoftext|>, T5's </s>) are added and count towards `max_length`, longer prompts are cut
before the closing special token, and shorter ones are padded with the pad token (CLIP-L:
<|endoftext|>, OpenCLIP bigG in SDXL and SD3: "!", T5: <pad>). `tokenizers` does all of
that from `tokenizer.json` alone, without transformers; tests/unit/test_runtime_tokenizer.py
checks the ids against transformers' CLIPTokenizer and T5Tokenizer.

A file that would feed the text encoder ids it has no row for (onnxruntime then fails in
its embedding Gather mid-run), or whose post-processor adds max_length special tokens or
more (no room for the prompt), is refused when it loads, so `slimdiff verify` says so.

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
    """Pads and truncates prompts to a fixed length; returns int64 ids (B, max_length).

    `vocab_size`: the text encoder's vocabulary (its embedding's rows), where known; every
    id the tokenizer can give must be below it. Unknown (None), the tokenizer's own count
    stands in: its N tokens must take the ids 0..N-1, as CLIP's and T5's files do.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        max_length: int,
        pad_token_id: int,
        vocab_size: int | None = None,
    ) -> None:
        pad_token = tokenizer.id_to_token(pad_token_id)
        if pad_token is None:
            raise BundleError(
                f"pad_token_id {pad_token_id} is not in the tokenizer's vocabulary; {FIX}"
            )
        special = tokenizer.num_special_tokens_to_add(is_pair=False)
        if special >= max_length:  # tokenizers then returns encodings longer than max_length
            raise BundleError(
                f"its post-processor adds {special} special tokens to every prompt, which "
                f"leaves no room in the {max_length} tokens the text encoder reads; {FIX}"
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
        _check_ids(tokenizer, vocab_size)

    @classmethod
    def from_file(
        cls, path: str | Path, max_length: int, pad_token_id: int, vocab_size: int | None = None
    ) -> PromptTokenizer:
        """Read a `tokenizer.json` (the file transformers' fast tokenizers save)."""
        data = Path(path).read_bytes()
        return cls.from_bytes(data, max_length, pad_token_id, where=path, vocab_size=vocab_size)

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        max_length: int,
        pad_token_id: int,
        where: str | Path,
        vocab_size: int | None = None,
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
            return cls(tokenizer, max_length, pad_token_id, vocab_size)
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


def _check_ids(tokenizer: Tokenizer, vocab_size: int | None) -> None:
    """BundleError for a token whose id the text encoder has no embedding for: the
    vocabulary's and added tokens' ids, and the special tokens the post-processor adds
    (read off an empty prompt: they need not be in the vocabulary)."""
    tokens = tokenizer.get_vocab(with_added_tokens=True)
    empty = tokenizer.encode("", add_special_tokens=True)
    tokens.update(zip(empty.tokens, empty.ids, strict=True))
    token, top = max(tokens.items(), key=lambda item: item[1], default=("", -1))
    if vocab_size is not None and top >= vocab_size:
        raise BundleError(
            f"token {token!r} has id {top}, past the text encoder's vocabulary of "
            f"{vocab_size} tokens; {FIX}"
        )
    count = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab_size is None and top >= count:
        raise BundleError(
            f"token {token!r} has id {top}, outside 0..{count - 1}, the ids of the tokenizer's "
            f"{count} tokens, which the text encoder's vocabulary matches; {FIX}"
        )


def shown(prompt: str) -> str:
    """`prompt` cut to 60 characters for a log line."""
    return prompt if len(prompt) <= 60 else prompt[:57] + "..."
