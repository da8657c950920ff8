"""A text encoder as the pipeline uses it: tokenizer + exported graph, prompts in, arrays out.

Example:
    >>> enc = TextEncoder.from_manifest(bundle_dir, manifest, entry, backend)  # doctest: +SKIP
    >>> enc(["a red cat", ""])["penultimate_hidden_state"].shape               # doctest: +SKIP
    (2, 77, 768)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from slimdiff.runtime.backends import Backend, Session
from slimdiff.runtime.manifest import BundleError, Manifest
from slimdiff.runtime.tokenizer import PromptTokenizer

__all__ = ["TextEncoder"]

# Output names that are per-token hidden states (B, S, D), as opposed to pooled (B, P).
HIDDEN_OUTPUTS = ("penultimate_hidden_state", "last_hidden_state")


@dataclass
class TextEncoder:
    """One text encoder: `kind` ("clip" | "t5"), the outputs the pipeline uses, in order."""

    name: str
    kind: str
    outputs: tuple[str, ...]
    tokenizer: PromptTokenizer
    session: Session
    dynamic_batch: bool  # False when the graph was exported for batch 1 only

    @classmethod
    def from_manifest(
        cls, root: Path, manifest: Manifest, entry: dict[str, Any], backend: Backend
    ) -> TextEncoder:
        """Build from one `pipeline["text_encoders"]` entry of a verified bundle."""
        name = entry["name"]
        component = manifest.components.get(name)
        if component is None:
            raise BundleError(f"{root}: text encoder {name} has no component entry; export again")
        exported = {o["name"] for o in component.outputs}
        missing = [o for o in entry["outputs"] if o not in exported]
        if missing:
            raise BundleError(
                f"{root}: {name} does not output {', '.join(missing)} "
                f"(it has {', '.join(sorted(exported))}); export the bundle again"
            )
        tokenizer = PromptTokenizer.from_file(
            root / entry["tokenizer"] / "tokenizer.json", entry["max_length"], entry["pad_token_id"]
        )
        ids = next((i for i in component.inputs if i["name"] == "input_ids"), None)
        dynamic = ids is None or not isinstance(ids["shape"][0], int)
        return cls(
            name=name,
            kind=entry["kind"],
            outputs=tuple(entry["outputs"]),
            tokenizer=tokenizer,
            session=backend.load(root / component.path),
            dynamic_batch=dynamic,
        )

    @property
    def hidden_output(self) -> str:
        """The per-token output the pipeline uses: the first hidden state listed."""
        for name in self.outputs:
            if name in HIDDEN_OUTPUTS:
                return name
        raise BundleError(f"text encoder {self.name} lists no hidden-state output")

    def __call__(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """Encode `prompts` in one batch (or one by one for a batch-1 graph)."""
        ids = self.tokenizer(prompts)  # (B, max_length) int64
        if self.dynamic_batch or len(prompts) == 1:
            out = self.session.run({"input_ids": ids})
        else:
            parts = [self.session.run({"input_ids": ids[i : i + 1]}) for i in range(len(ids))]
            out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return {k: out[k].astype(np.float32, copy=False) for k in self.outputs}
