"""A text encoder as the pipeline uses it: tokenizer + exported graph, prompts in, arrays out.

Example:
    >>> tok = bundle_tokenizer(bundle, record)                             # doctest: +SKIP
    >>> enc = TextEncoder.from_bundle(bundle, record, tok, session)        # doctest: +SKIP
    >>> enc(["a red cat", ""])["penultimate_hidden_state"].shape           # doctest: +SKIP
    (2, 77, 768)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from slimdiff.runtime.backends import Session
from slimdiff.runtime.bundle_files import Bundle
from slimdiff.runtime.manifest import HIDDEN_OUTPUTS, POOLED_OUTPUTS, TEXT_INPUT, TextEncoderRecord
from slimdiff.runtime.tokenizer import PromptTokenizer

__all__ = ["TextEncoder", "bundle_tokenizer"]


def bundle_tokenizer(bundle: Bundle, record: TextEncoderRecord) -> PromptTokenizer:
    """The record's tokenizer, from the tokenizer.json bytes the bundle hashed."""
    return PromptTokenizer.from_bytes(
        bundle.read_bytes(record.tokenizer_file),
        record.max_length,
        record.pad_token_id,
        where=bundle.root / record.tokenizer_file,
        vocab_size=record.vocab_size,
    )


@dataclass
class TextEncoder:
    """One text encoder: `kind` ("clip" | "t5"), the outputs the pipeline uses, in order,
    and the `segment` of the denoiser's text states its hidden output goes to."""

    name: str
    kind: str
    outputs: tuple[str, ...]
    tokenizer: PromptTokenizer
    session: Session
    dynamic_batch: bool  # False when the graph was exported for batch 1 only
    segment: int = 0

    @classmethod
    def from_bundle(
        cls, bundle: Bundle, record: TextEncoderRecord, tokenizer: PromptTokenizer, session: Session
    ) -> TextEncoder:
        """Build from one `pipeline.text_encoders` record of a verified bundle, its tokenizer
        (`bundle_tokenizer`) and its loaded graph; the manifest's schema has checked that the
        component exists and outputs what the record names."""
        ids = bundle.manifest.components[record.name].io(TEXT_INPUT)
        return cls(
            name=record.name,
            kind=record.kind,
            outputs=record.outputs,
            tokenizer=tokenizer,
            session=session,
            dynamic_batch=ids is None or not isinstance(ids["shape"][0], int),
            segment=record.segment,
        )

    @property
    def hidden_output(self) -> str | None:
        """The per-token output the pipeline uses (the first listed), if any."""
        return next((name for name in self.outputs if name in HIDDEN_OUTPUTS), None)

    @property
    def pooled_outputs(self) -> tuple[str, ...]:
        return tuple(name for name in self.outputs if name in POOLED_OUTPUTS)

    @property
    def max_length(self) -> int:
        """The tokens this encoder reads; a longer prompt is cut."""
        return self.tokenizer.max_length

    def cut(self, prompts: Sequence[str]) -> list[str]:
        """The `prompts` longer than this encoder reads, which its tokenizer cuts."""
        return self.tokenizer.cut(prompts)

    def __call__(self, prompts: Sequence[str], warn: bool = True) -> dict[str, np.ndarray]:
        """Encode `prompts` in one batch (or one by one for a batch-1 graph); `warn`: of a
        prompt the tokenizer cuts (Conditioning.encode warns once for all encoders)."""
        ids = self.tokenizer(prompts, warn=warn)  # (B, max_length) int64
        if self.dynamic_batch or len(prompts) == 1:
            out = self.session.run({TEXT_INPUT: ids})
        else:
            parts = [self.session.run({TEXT_INPUT: ids[i : i + 1]}) for i in range(len(ids))]
            out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return {k: out[k].astype(np.float32, copy=False) for k in self.outputs}
