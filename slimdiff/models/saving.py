"""Saving a pipeline as a diffusers folder that reloads as the one it was loaded from.

diffusers fills the keys a config file leaves out with the class's defaults and lists them
in the loaded config's `_use_default_values`; save_pretrained writes every key and drops
that list. A key the original left out then reads as set on purpose: SD1.5's VAE config
has no `force_upcast`, which defaults to True, and a saved copy says True, so the export
kept a compressed SD1.5's VAE in fp32 (export/bundle.py) where the hub folder's went fp16;
likewise a scheduler switch (`--scheduler`) carried a saved copy's defaulted spacing over.
`save_pipeline` leaves such keys out again, where their value is still the default (a pass
that changed one, e.g. blocks.remove's mid-block type, keeps it written).

Tokenizers are saved without the state of their last call: a fast tokenizer called with
padding and truncation (every diffusers pipeline call does) keeps them in its backend and
save_pretrained writes them into tokenizer.json, and a tokenizer loaded from such a file
adds max_length, padding_side and four more keys to its tokenizer_config.json. The same
recipe then gave other artifact and bundle bytes (another SHA-256) depending on whether
calibration had run the pipeline or come from its cache. `save_tokenizer` and
`save_pipeline` write every tokenizer as it was before any call (fingerprint.py leaves the
same state out of its digest); the runtime sets its own padding and truncation.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["save_pipeline", "save_tokenizer"]


def save_pipeline(pipe: Any, folder: str | Path) -> None:
    """`pipe.save_pretrained(folder)` in safetensors, each component's config without the
    keys its own source config left out (still at their defaults)."""
    folder = Path(folder)
    with _without_call_state(pipe.components.values()):
        pipe.save_pretrained(folder, safe_serialization=True)
    for name, component in pipe.components.items():
        config = getattr(component, "config", None)
        file = folder / name / str(getattr(component, "config_name", ""))
        defaulted = _still_default(component, config)
        if defaulted and file.is_file():
            data = json.loads(file.read_text(encoding="utf-8"))
            kept = {k: v for k, v in data.items() if k not in defaulted}
            file.write_text(json.dumps(kept, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_tokenizer(tokenizer: Any, folder: str | Path) -> None:
    """`tokenizer.save_pretrained(folder)`, without the padding and truncation of its last
    call: the same files whether or not a pipeline ran it before."""
    with _without_call_state([tokenizer]):
        tokenizer.save_pretrained(folder)


@contextlib.contextmanager
def _without_call_state(components: Iterable[Any]) -> Iterator[None]:
    """Within: the fast tokenizers among `components` with no padding or truncation set;
    after: each as it was (the caller's next call sets them again anyway)."""
    saved = []
    for component in components:
        # fast tokenizers hold it in their `tokenizers` backend; other components have none
        backend = getattr(component, "backend_tokenizer", None)
        if backend is None or not hasattr(backend, "no_padding"):
            continue
        saved.append((backend, backend.padding, backend.truncation))
        backend.no_padding()
        backend.no_truncation()
    try:
        yield
    finally:
        for backend, padding, truncation in saved:
            if padding is not None:
                backend.enable_padding(**padding)
            if truncation is not None:
                backend.enable_truncation(**truncation)


def _still_default(component: Any, config: Any) -> set[str]:
    """The keys of `config` its source left out whose value is still the class default."""
    names = config.get("_use_default_values", ()) if hasattr(config, "get") else ()
    if not names:
        return set()
    params = inspect.signature(type(component).__init__).parameters
    out = set()
    for key in names:
        default = params[key].default if key in params else inspect.Parameter.empty
        if default is not inspect.Parameter.empty and _same(config.get(key), default):
            out.add(key)
    return out


def _same(value: Any, default: Any) -> bool:
    # configs hold lists where signatures default to tuples
    if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):
        return list(value) == list(default)
    return value == default
