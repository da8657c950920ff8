"""What identifies a model's weights and configs for caches: a cheap, content-based hash.

Caches (compress artifacts, calibration trajectories, bench references) are keyed by this,
not by the model argument's name, so a retrained local folder at the same path, or a hub id
whose snapshot moved, never reuses a stale result.

Every tensor contributes its name, shape, dtype and a strided sample of its values (32 per
tensor): any training changes most values of every tensor it touches, and a pipeline's
state dicts are read from memory in well under a second even at SDXL size, where hashing
every byte would take tens of seconds. Each tokenizer contributes the files it saves (its
vocabulary, merges or SentencePiece model): another vocabulary feeds the same text encoder
other token ids.

Example:
    >>> fingerprint(load_model("tiny:sdxl").pipe)["unet"]          # doctest: +SKIP
    '3f1c...'
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["fingerprint", "fingerprint_key", "module_digest", "tokenizer_digest"]

_SAMPLES = 32  # values per tensor


def module_digest(module: torch.nn.Module) -> str:
    """SHA-256 over a module's class, config and every tensor (name, shape, dtype, sample)."""
    h = hashlib.sha256(type(module).__name__.encode())
    config = getattr(module, "config", None)
    if config is not None:  # diffusers' FrozenDict, or a transformers PretrainedConfig
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        h.update(_config_json(as_dict).encode())
    for key, value in module.state_dict().items():
        flat = value.detach().reshape(-1)
        h.update(f"{key}{tuple(value.shape)}{value.dtype}".encode())
        if flat.device.type == "meta" or flat.numel() == 0:
            continue
        sample = flat[:: max(1, flat.numel() // _SAMPLES)][:_SAMPLES].float().cpu().numpy()
        h.update(sample.tobytes())
    return h.hexdigest()


def fingerprint(pipe: Any, components: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The pipeline class, scheduler config and a digest per model component.

    `components`: the pipeline attributes to digest (default: every nn.Module component).
    """
    # Private config keys go: diffusers' `_use_default_values` is a list in set order,
    # which changes from process to process (string hash randomisation).
    scheduler = getattr(pipe, "scheduler", None)
    out: dict[str, Any] = {
        "pipeline": type(pipe).__name__,
        "scheduler": _config_dict(scheduler.config) if scheduler is not None else None,
        # the class too: Euler and Euler ancestral can share one config
        "scheduler_class": type(scheduler).__name__ if scheduler is not None else None,
    }
    names = components or tuple(getattr(pipe, "components", {}))
    for name in names:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            out[name] = module_digest(module)
        elif _is_tokenizer(module):
            out[name] = tokenizer_digest(module)
    return out


def _is_tokenizer(obj: Any) -> bool:
    from transformers import PreTrainedTokenizerBase

    return isinstance(obj, PreTrainedTokenizerBase)


def tokenizer_digest(tokenizer: Any) -> str:
    """SHA-256 over every file the tokenizer saves, in name order: its vocabulary and merges
    (or SentencePiece model) decide the token ids the text encoder sees, so another
    tokenizer with the same encoder is another model. JSON files are hashed by content
    without the keys that record where or with what they were saved (the same tokenizer
    from another folder, or another transformers, hashes alike)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    with tempfile.TemporaryDirectory(prefix="slimdiff-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if not path.is_file():
                continue
            data = path.read_bytes()
            if path.suffix == ".json":
                value = json.loads(data)
                if isinstance(value, dict):
                    value = {k: v for k, v in value.items() if k not in _SAVED_WHERE}
                data = json.dumps(value, sort_keys=True).encode()
            h.update(f"{path.relative_to(tmp).as_posix()}:{len(data)}:".encode())
            h.update(data)
    return h.hexdigest()


def fingerprint_key(pipe: Any, **settings: Any) -> str:
    """16 hex digits over the fingerprint and `settings`: a cache folder's name."""
    blob = json.dumps({"model": fingerprint(pipe), **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Config keys that record how or where a model was saved, not what it computes: transformers'
# save_pretrained adds `architectures` and `dtype`, and the library versions differ by host.
_BOOKKEEPING = frozenset({"architectures", "dtype", "torch_dtype", "transformers_version"})
# What a saved tokenizer's JSON may record about where and how it was loaded, not its
# tokens: transformers saves the from_pretrained keywords it was loaded with (a tokenizer
# read from a local folder saves "is_local": true and "local_files_only").
_SAVED_WHERE = frozenset(
    {
        "name_or_path",
        "_name_or_path",
        "_commit_hash",
        "transformers_version",
        "is_local",
        "local_files_only",
        "cache_dir",
        "revision",
        "subfolder",
        "token",
        "force_download",
        "proxies",
        "trust_remote_code",
        # tokenizer.json's state of the last call: a fast tokenizer called with padding or
        # truncation keeps them and saves them (the pipeline's first prompt changed the
        # digest, and a resumed calibration missed its cache)
        "padding",
        "truncation",
    }
)


def _config_dict(config: Any) -> dict[str, Any]:
    return {
        k: v for k, v in dict(config).items() if not k.startswith("_") and k not in _BOOKKEEPING
    }


def _config_json(config: dict[str, Any]) -> str:
    return json.dumps(_config_dict(config), sort_keys=True, default=str)
