"""What identifies a model's weights and configs for caches: a hash of their every byte.

Caches (compress artifacts, calibration trajectories, bench references) are keyed by this,
not by the model argument's name, so a retrained local folder at the same path, or a hub id
whose snapshot moved, never reuses a stale result.

Every tensor contributes its name, shape, dtype and every byte of its values: an edit of
one row (a token's embedding), a few channels or a sparse merge is another model, and a
sample of the values missed such edits (a stale artifact was reused). Each tokenizer
contributes the files it saves (its vocabulary, merges or SentencePiece model): another
vocabulary feeds the same text encoder other token ids.

What hashing every byte costs: SHA-256 at hashlib's own rate, read in place from the
tensors' memory (a GPU's tensors are copied to the CPU 16 MiB at a time). Measured on
2026-12-07 on a 2-CPU KVM Xeon with SHA-NI whose load average was 5-6 from other users,
timing `module_digest(load_model("random:sd15").pipe.unet)` (3.44 GB of fp32 weights)
with time.perf_counter: 530-620 MB/s with one thread or two, the rate of one hashlib
stream over the same bytes (490-570 MB/s); the whole pipeline's `fingerprint` (4.3 GB)
took 7.9 s, tiny:sd15's UNet (13 MB) 22 ms. An SDXL pipeline (about 7 GB in fp16) costs
some 12 s at that rate. hashlib lets go of the GIL while it hashes, so the chunks are
spread over the CPUs this process may use (up to 8; SLIMDIFF_THREADS caps it): on that
busy 2-CPU machine two threads gained nothing; the gain on an idle many-core host was not
measured.

Example:
    >>> fingerprint(load_model("tiny:sdxl").pipe)["unet"]          # doctest: +SKIP
    '3f1c...'
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from slimdiff.threads import cpu_budget, threads_from_env

__all__ = ["fingerprint", "fingerprint_key", "module_digest", "tokenizer_digest"]

_CHUNK = 16 << 20  # bytes hashed per work item: big tensors split across threads
_MAX_THREADS = 8  # a bound on the pool, not a tuned value (measured only on 2 CPUs)


def module_digest(module: torch.nn.Module) -> str:
    """SHA-256 over a module's class, config and every tensor (name, shape, dtype, bytes).

    Each tensor's bytes are hashed in 16 MiB chunks and the chunk digests in order go into
    the module's hash, so threads can share the work; the result does not depend on how
    many ran.
    """
    h = hashlib.sha256(type(module).__name__.encode())
    config = getattr(module, "config", None)
    if config is not None:  # diffusers' FrozenDict, or a transformers PretrainedConfig
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        h.update(_config_json(as_dict).encode())
    state = module.state_dict()
    digests = _tensor_digests(list(state.values()))
    for (key, value), chunks in zip(state.items(), digests, strict=True):
        h.update(f"{key}{tuple(value.shape)}{value.dtype}".encode())
        h.update(b"".join(chunks))
    return h.hexdigest()


def _tensor_digests(tensors: list[torch.Tensor]) -> list[list[bytes]]:
    """Per tensor, the SHA-256 of each _CHUNK of its bytes (none for meta or empty ones).

    Tied weights (T5's shared and embed_tokens) share their storage: hashed once.
    """
    first: dict[tuple, int] = {}  # where the bytes lie -> the first such tensor's index
    same_as: dict[int, int] = {}
    owners: list[int] = []  # per chunk, its tensor's index
    chunks: list[torch.Tensor] = []  # flat bytes, _CHUNK or fewer each
    for i, value in enumerate(tensors):
        if value.device.type == "meta" or value.numel() == 0:
            continue
        where = (value.device, value.data_ptr(), value.nbytes, value.dtype, value.stride())
        if where in first:
            same_as[i] = first[where]
            continue
        first[where] = i
        flat = _flat_bytes(value)
        for start in range(0, len(flat), _CHUNK):
            owners.append(i)
            chunks.append(flat[start : start + _CHUNK])
    out: list[list[bytes]] = [[] for _ in tensors]
    for i, digest in zip(owners, _hash_chunks(chunks), strict=True):
        out[i].append(digest)
    for i, j in same_as.items():
        out[i] = out[j]
    return out


def _flat_bytes(value: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 tensor, on its device: a view where it is
    contiguous (a parameter always is), so nothing is copied."""
    flat = value.detach().contiguous().reshape(-1)
    if flat.is_quantized:  # torch's quantized dtypes have no byte view: their values
        flat = flat.dequantize()
    return flat.view(torch.uint8)


def _hash_chunks(chunks: list[torch.Tensor]) -> list[bytes]:
    """SHA-256 of each chunk, in order. hashlib lets go of the GIL while it hashes, so
    threads run side by side; a chunk on a GPU is copied to the CPU in its worker."""
    threads = min(_MAX_THREADS, threads_from_env() or cpu_budget(), len(chunks))
    if threads <= 1 or sum(c.numel() for c in chunks) < 2 * _CHUNK:
        return [_sha256(c) for c in chunks]
    batches = _batches(chunks)
    with ThreadPoolExecutor(threads, thread_name_prefix="slimdiff-hash") as pool:
        return [d for batch in pool.map(lambda b: [_sha256(c) for c in b], batches) for d in batch]


def _batches(chunks: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Chunks grouped up to _CHUNK bytes a batch: a thousand biases are one work item."""
    batches: list[list[torch.Tensor]] = []
    size = _CHUNK
    for chunk in chunks:
        if size + chunk.numel() > _CHUNK:
            batches.append([])
            size = 0
        batches[-1].append(chunk)
        size += chunk.numel()
    return batches


def _sha256(chunk: torch.Tensor) -> bytes:
    # numpy's view of the CPU bytes: hashlib reads the buffer in place, no copy
    return hashlib.sha256(chunk.cpu().numpy()).digest()


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
    from slimdiff.models.saving import save_tokenizer

    with tempfile.TemporaryDirectory(prefix="slimdiff-tokenizer-") as tmp:
        # without the padding and truncation of its last call, as artifacts and bundles
        # save it: the pipeline's first prompt does not change the digest
        save_tokenizer(tokenizer, tmp)
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
    }
)


def _config_dict(config: Any) -> dict[str, Any]:
    return {
        k: v for k, v in dict(config).items() if not k.startswith("_") and k not in _BOOKKEEPING
    }


def _config_json(config: dict[str, Any]) -> str:
    return json.dumps(_config_dict(config), sort_keys=True, default=str)
