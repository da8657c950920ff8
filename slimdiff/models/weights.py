"""Where a lazy model's weights come from, one tensor at a time (slimdiff/models/lazy.py).

A `WeightSource` answers `tensor(key)` for a key of the module's state dict, holding at most
that tensor in memory: a FLUX transformer (12B parameters, 48 GB in fp32) is exported on a
24 GiB machine by asking for its weights one by one (export/streamed.py).

- `SafetensorsWeights`: a component folder's safetensors files (one file or a sharded set
  with its index), read by key without loading the rest (safetensors maps the file).
- `InitWeights`: seeded random weights for the `random:*` built-ins, drawn per tensor from a
  seed derived from the key, so a tensor is the same whichever order (or process) asks.
- `ModuleWeights`: tensors already in memory (a built-in tiny model made lazy, for tests).
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from slimdiff.errors import UserError

__all__ = [
    "InitWeights",
    "ModuleWeights",
    "SafetensorsWeights",
    "WeightSource",
    "check_weight_files",
    "checkpoint_renamer",
    "dtype_keyword",
    "held_weights",
    "init_rule",
    "open_safetensors",
    "refuse_pickles",
    "variants",
    "weight_files",
]


class WeightSource(Protocol):
    """One tensor of a module's state dict on request (on the CPU, in any float dtype)."""

    def tensor(self, key: str) -> torch.Tensor: ...

    def __contains__(self, key: str) -> bool: ...


class ModuleWeights:
    """Tensors held in memory, by state-dict key."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self._state = dict(state)

    @classmethod
    def of(cls, module: nn.Module) -> ModuleWeights:
        """`module`'s current parameters, under every name each has (tied ones too)."""
        return cls(dict(module.named_parameters(remove_duplicate=False)))

    def tensor(self, key: str) -> torch.Tensor:
        return self._state[key]

    def __contains__(self, key: str) -> bool:
        return key in self._state


class SafetensorsWeights:
    """A component folder's safetensors weights, read one tensor at a time.

    diffusers and transformers name their weights `<name>.safetensors`, or shards listed by
    `<name>.safetensors.index.json`; variants (`<name>.fp16.safetensors`) are used only when
    the folder has nothing else, as `from_pretrained` does without a `variant`. `name`: the
    weights name the module's class reads (diffusion_pytorch_model, model; None: either),
    so a file saved beside them (an EMA copy) is not read in their place.
    `rename` maps a file's key to the module's (transformers' renaming of checkpoints an
    older transformers saved: checkpoint_renamer); the keys asked for are the module's.

    Example:
        >>> SafetensorsWeights(Path("flux-dev/transformer")).tensor("x_embedder.weight").shape
        torch.Size([3072, 64])  # doctest: +SKIP
    """

    def __init__(
        self, folder: Path, rename: Callable[[str], str] | None = None, name: str | None = None
    ):
        self.folder = folder
        files = weight_files(folder, name)
        if not files:
            refuse_pickles([folder])  # the likelier reason, and its option
            raise UserError(
                f"{folder}: no .safetensors weights; save the model with "
                "save_pretrained(..., safe_serialization=True)"
            )
        self._where: dict[str, tuple[Path, str]] = {}  # module key -> (file, file key)
        for file in files:
            with open_safetensors(file) as handle:
                stored = handle.keys()  # a safe_open handle is no mapping
            for key in stored:
                self._where[rename(key) if rename else key] = (file, key)

    def tensor(self, key: str) -> torch.Tensor:
        file, stored = self._where[key]
        with open_safetensors(file) as handle:
            try:
                return handle.get_tensor(stored)  # its own storage: 64-byte aligned, file released
            except Exception as err:  # safetensors' errors: the file changed under us
                raise _unreadable(file, err) from None

    def __contains__(self, key: str) -> bool:
        return key in self._where


def dtype_keyword(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """from_pretrained's keyword for the dtype to load in: `dtype` where diffusers has
    renamed it (it then warns of `torch_dtype`), else `torch_dtype`."""
    from diffusers.utils import deprecation_utils

    renamed = hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE")
    return {"dtype" if renamed else "torch_dtype": dtype}


def checkpoint_renamer(module: nn.Module) -> Callable[[str], str] | None:
    """How transformers renames the keys of a checkpoint an older transformers saved when
    it loads one into `module` (transformers 5 keeps CLIPTextModel's layers without the
    `text_model.` prefix its hub files carry), as a function of the file's key; None for
    a module that is no transformers model, or whose conversions merge or split tensors
    (WeightConverter), which no key-by-key read can follow. transformers' own mapping and
    renaming functions are used, so a later version's conversions come with it."""
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # a transformers without conversion mappings renames nothing
        return None
    if not isinstance(module, PreTrainedModel):
        return None
    transforms = get_model_conversion_mapping(module)
    if any(isinstance(t, WeightConverter) for t in transforms):
        return None
    names = dict.fromkeys(module.state_dict())  # meta tensors: names only
    prefix = getattr(module, "base_model_prefix", None) or None

    def rename(key: str) -> str:
        return rename_source_key(key, transforms, [], prefix, names)[0]

    return rename


_PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def refuse_pickles(folders: list[Path]) -> None:
    """UserError when a component folder holds pickled weights and no safetensors, or
    pickled plain weights beside a variant's safetensors (from_pretrained reads the plain
    ones)."""
    for folder in folders:
        if not folder.is_dir():
            continue
        found = held_weights(folder)[1]
        pickled = [p for name in _WEIGHT_NAMES if (p := _pickled(folder, name))]
        if found and pickled and not weight_files(folder):
            variant = sorted(found)[0]
            raise UserError(
                f"{folder}: its plain weights are pickled ({pickled[0]}) and only its "
                f"{', '.join(sorted(found))} variant is in safetensors; from_pretrained loads "
                "the plain ones, which slimdiff unpickles only with --allow-pickle (if you "
                f"trust them): pass it, or remove {pickled[0]} to load the {variant} weights"
            )
        if any(folder.glob("*.safetensors")):
            continue
        pickled = sorted(p.name for pattern in _PICKLED for p in folder.glob(pattern))
        if pickled:
            raise UserError(
                f"{folder} has only pickled weights ({', '.join(pickled[:3])}), which slimdiff "
                "does not load by default: unpickling can run code. Convert them to "
                "safetensors (load and `save_pretrained(..., safe_serialization=True)` where "
                "you trust them), or pass --allow-pickle if you trust these files"
            )


def open_safetensors(file: Path):
    """safetensors' safe_open of `file` (a context manager); UserError naming the file when
    it is missing, damaged or cut short (an interrupted download or copy), where
    safetensors raises its own error, which names no file."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as err:
        raise _unreadable(file, err) from None


def _unreadable(file: Path, err: Exception) -> UserError:
    return UserError(
        f"{file}: not a readable safetensors file ({err}); it is damaged or incomplete (an "
        "interrupted download or copy?): download or copy it again"
    )


def check_weight_files(folders: list[Path]) -> None:
    """Open the .safetensors files from_pretrained reads in `folders` (headers only, mapped,
    not read): a damaged one is refused naming it, before from_pretrained fails on it
    without a name."""
    for folder in folders:
        for file in weight_files(folder) if folder.is_dir() else ():
            with open_safetensors(file):
                pass


def _shards(index: Path) -> set[str]:
    """The shard file names a `<name>.safetensors.index.json` lists; UserError for an index
    that is not one (cut short, or not the object save_pretrained writes)."""
    try:
        value = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{index}: unreadable ({err}); download or copy it again") from None
    weight_map = value.get("weight_map") if isinstance(value, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(n, str) and n and "/" not in n and "\\" not in n for n in weight_map.values()
    ):
        raise UserError(
            f"{index}: not a shard index (an object whose weight_map names the shard file of "
            "each weight); download or copy it again"
        )
    return set(weight_map.values())


_SHARD = re.compile(r"-\d{5}-of-\d{5}$")

# The weights from_pretrained looks for, by name: diffusers' models read
# diffusion_pytorch_model.*, transformers' model.*; other files in the folder (an EMA copy
# saved beside them) are not read. Each name's pickled file, which from_pretrained falls
# back to where it has no plain safetensors (and --allow-pickle lets it).
_WEIGHT_NAMES = {
    "diffusion_pytorch_model": "diffusion_pytorch_model.bin",
    "model": "pytorch_model.bin",
}


def _name_and_variant(file: Path) -> tuple[str, str | None]:
    """A .safetensors file's weights name and variant: diffusion_pytorch_model.fp16
    .safetensors and its shards (...fp16-00001-of-00002.safetensors) are
    ("diffusion_pytorch_model", "fp16"); the variant is None for plain ones."""
    name, _, variant = _SHARD.sub("", file.stem).partition(".")
    return name, variant or None


def _named_files(folder: Path, name: str) -> list[Path]:
    """The .safetensors files of weights name `name` in `folder`, plain or variant."""
    return sorted(f for f in folder.glob(f"{name}*.safetensors") if _name_and_variant(f)[0] == name)


def _pickled(folder: Path, name: str) -> str | None:
    """The plain pickled weights of `name` in `folder` (the file, or its shard index)."""
    pickled = _WEIGHT_NAMES.get(name)
    for file in (pickled, f"{pickled}.index.json") if pickled else ():
        if (folder / file).is_file():
            return file
    return None


def held_weights(folder: Path, name: str | None = None) -> tuple[bool, set[str]]:
    """(whether component folder `folder` holds plain weights, safetensors or pickled; the
    variants it holds safetensors weights of), for weights name `name` (None: either)."""
    plain, found = False, set()
    for stem in (name,) if name else _WEIGHT_NAMES:
        for file in _named_files(folder, stem):
            variant = _name_and_variant(file)[1]
            plain |= variant is None
            found |= {variant} - {None}
        plain |= (folder / f"{stem}.safetensors.index.json").is_file()
        plain |= _pickled(folder, stem) is not None
    return plain, found


def variants(folder: Path) -> set[str]:
    """The variants a component folder holds weights of, when it holds no plain ones
    (as a repo downloaded with `--include "*.fp16.*"`); empty otherwise: from_pretrained
    without a variant reads the plain ones, pickled ones too."""
    plain, found = held_weights(folder)
    return set() if plain else found


def weight_files(folder: Path, name: str | None = None) -> list[Path]:
    """The safetensors files from_pretrained reads in a component folder, of weights name
    `name` (None: diffusion_pytorch_model, else model): an index's shards, else the plain
    file, else (nothing else there) one variant's; [] for none, and where the plain weights
    are pickled (from_pretrained reads those). UserError for a folder of several variants
    and no plain weights (from_pretrained then needs to be told which, and refuses without),
    and for a stale shard index."""
    for stem in (name,) if name else _WEIGHT_NAMES:
        files = _files_of(folder, stem)
        if files:
            return files
    return []


def _files_of(folder: Path, name: str) -> list[Path]:
    index = folder / f"{name}.safetensors.index.json"
    if index.is_file():
        return _indexed(index, folder / f"{name}.safetensors")
    files = _named_files(folder, name)
    plain = [f for f in files if _name_and_variant(f)[1] is None]
    if plain or _pickled(folder, name):
        return plain
    found = {_name_and_variant(f)[1] for f in files}  # all variants here: no plain file
    if len(found) > 1:
        raise UserError(
            f"{folder}: holds weights of the variants {', '.join(sorted(found))} and none "
            "without a variant, so which to load is not known; keep one variant's files"
        )
    for variant in found:  # a variant's shard index: diffusers' name, then the older one
        for index in (
            f"{name}.safetensors.index.{variant}.json",
            f"{name}.{variant}.safetensors.index.json",
        ):
            if (folder / index).is_file():
                return _indexed(folder / index, None)
    return files


def _indexed(index: Path, plain: Path | None) -> list[Path]:
    """The shards `index` lists; UserError for a stale index: shards gone and the plain
    file beside it, as save_pretrained leaves a folder it saved sharded, then whole."""
    shards = sorted({index.parent / name for name in _shards(index)})
    missing = [s.name for s in shards if not s.is_file()]
    if missing and plain is not None and plain.is_file():
        raise UserError(
            f"{index}: a stale shard index: it lists shards that are not there ({missing[0]}"
            f"{', ...' if len(missing) > 1 else ''}) and {plain.name} is beside it (an "
            f"unsharded save over a sharded one leaves the index behind); remove {index.name} "
            f"if {plain.name} is the model, or copy the shards again"
        )
    return shards


class InitWeights:
    """Seeded random weights for `module`, drawn one tensor at a time.

    The distributions are torch's defaults for the layer that owns the tensor: weights and
    biases of linear and convolution layers uniform in +-1/sqrt(fan_in), embeddings N(0, 1),
    normalisation scales 1 and shifts 0. Each tensor has its own generator, seeded by
    `seed` and the key, so `random:flux` is the same model whether it is built in memory or
    streamed to disk tensor by tensor.
    """

    def __init__(self, module: nn.Module, seed: int = 0):
        self._seed = seed
        # What each draw needs, read once: the source must not hold the module (lazy.py
        # keys its registry weakly by module).
        self._specs: dict[str, tuple[tuple[int, ...], str, float]] = {}
        for owner_name, owner in module.named_modules():
            for attr, param in owner.named_parameters(recurse=False, remove_duplicate=False):
                key = f"{owner_name}.{attr}" if owner_name else attr
                self._specs[key] = (tuple(param.shape), *init_rule(owner, attr, param))

    def __contains__(self, key: str) -> bool:
        return key in self._specs

    def tensor(self, key: str) -> torch.Tensor:
        shape, rule, bound = self._specs[key]
        if rule in ("ones", "zeros"):
            return torch.ones(shape) if rule == "ones" else torch.zeros(shape)
        # CPU generators keep 32 bits of a seed: the seed goes into the hash with the key.
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self._seed}:{key}".encode()))
        out = torch.empty(shape)
        if rule == "normal":
            return out.normal_(generator=generator)
        return out.uniform_(-bound, bound, generator=generator)


def init_rule(owner: nn.Module, attr: str, param: torch.Tensor) -> tuple[str, float]:
    """(rule, bound) for one parameter, as torch initialises the layer that owns it."""
    if "Norm" in type(owner).__name__ and param.dim() == 1:
        return ("ones" if attr == "weight" else "zeros"), 0.0
    if isinstance(owner, nn.Embedding):
        return "normal", 0.0
    weight = getattr(owner, "weight", None)
    shape = weight.shape if attr != "weight" and isinstance(weight, torch.Tensor) else param.shape
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else (shape[0] if len(shape) else 1)
    return "uniform", 1 / math.sqrt(max(fan_in, 1))
