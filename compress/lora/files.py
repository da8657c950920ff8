"""A LoRA file read and vetted before diffusers sees it.

diffusers' loaders read the diffusers/PEFT, kohya-ss and A1111 layouts, but they drop or
misread some of what such files hold without a word: kohya/LyCORIS DoRA magnitudes
(`dora_scale`) are filtered out, leaving a plain LoRA; LyCORIS's other factorizations fail
with an empty key list; a layer missing its `lora_up` fails with a bare key name; and the
SD1.5/SDXL kohya converter gives every attention layer the file's most common alpha
(`_get_alpha_name` keeps `to_q_lora.down.weight` in attention alpha names, so the
per-layer entries match no module). So the file is read here first: what its keys say it
is, whether every layer is whole and finite, and each kohya layer's alpha folded into its
`lora_down` weight (alpha / rank), after which diffusers sees alpha = rank everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from slimdiff.errors import UserError

if TYPE_CHECKING:  # torch is imported where a file is read: recipes validate without it
    import torch

__all__ = ["read_lora"]

# LyCORIS's and kohya's network types besides plain LoRA, by how their keys end or what they
# hold; none of them is read by diffusers' LoRA loaders for these families.
_LYCORIS = (
    ("LyCORIS LoHa", "hada_* keys", lambda k: ".hada_" in k),
    ("LyCORIS LoKr", "lokr_* keys", lambda k: ".lokr_" in k),
    ("LyCORIS (IA)^3", ".on_input keys", lambda k: k.endswith(".on_input")),
    ("LyCORIS full (diff)", ".diff keys", lambda k: k.endswith((".diff", ".diff_b"))),
    ("LyCORIS OFT/BOFT", "oft_* keys", lambda k: ".oft_" in k or ".boft_" in k),
    ("LyCORIS GLoRA", ".a1/.a2/.b1/.b2 keys", lambda k: k.endswith((".a1.weight", ".b1.weight"))),
    ("LyCORIS Tucker", "lora_mid keys", lambda k: ".lora_mid." in k),
    ("LyCORIS norm", ".w_norm/.b_norm keys", lambda k: k.endswith((".w_norm", ".b_norm"))),
    (
        "LoRA bias",
        "lora_up.bias or bias_* keys",
        lambda k: k.endswith((".lora_up.bias", ".lora_down.bias", ".bias_indices")),
    ),
)
# A layer's two factors: kohya's lora_down/lora_up, PEFT's lora_A/lora_B, and the .down/.up
# of the older diffusers and XLabs layouts (under a module whose name says lora)
_PARTNER = {"lora_down": "lora_up", "lora_A": "lora_B", "down": "up"}
_PARTNER.update({up: down for down, up in list(_PARTNER.items())})


def read_lora(file: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensors of LoRA `file`, vetted, with kohya alphas folded into the weights; and
    whether any was (then diffusers must get these tensors, not the file).

    UserError, one line, for a file that is not safetensors, holds no tensors, is a DoRA in
    kohya/LyCORIS layout or another LyCORIS type, lacks half of a layer, or holds NaN/inf.
    """
    from safetensors.torch import load_file

    try:
        state = load_file(str(file))
    except Exception as err:  # safetensors' own errors for a damaged or foreign file
        raise UserError(f"lora.fuse: {file} is not a readable safetensors file ({err})") from None
    if not state:
        raise UserError(f"lora.fuse: {file} holds no tensors; is it a LoRA file?")
    _refuse_other_networks(file, list(state))
    _refuse_damaged(file, state)
    return _fold_alphas(file, state)


def _refuse_other_networks(file: Path, keys: list[str]) -> None:
    if any(key.endswith(".dora_scale") for key in keys):
        raise UserError(
            f"lora.fuse: {file} is a DoRA in kohya/LyCORIS layout (dora_scale keys): "
            "diffusers drops the DoRA magnitudes and would fuse it as a plain LoRA; merge it "
            "into the model with kohya's or LyCORIS's tools, or save it in PEFT layout "
            "(lora_magnitude_vector keys), which is fused as a DoRA"
        )
    found = [(kind, how) for kind, how, test in _LYCORIS if any(test(key) for key in keys)]
    if found:
        kinds = " and ".join(f"{kind} layers ({how})" for kind, how in found)
        raise UserError(
            f"lora.fuse: {file} holds {kinds}, which diffusers' LoRA loaders do not read; "
            "merge it into the model with LyCORIS's tools, or use a plain LoRA"
        )


def _refuse_damaged(file: Path, state: dict[str, torch.Tensor]) -> None:
    """Every layer has both factors, of one rank, and no tensor holds NaN or inf."""
    import torch

    unpaired, ranks = [], []
    for key, tensor in state.items():
        parts = key.rsplit(".", 2)
        if len(parts) != 3 or parts[2] != "weight" or parts[1] not in _PARTNER:
            continue
        module, kind, _ = parts
        if kind in ("down", "up") and "lora" not in module:
            continue
        partner = state.get(f"{module}.{_PARTNER[kind]}.weight")
        if partner is None:
            unpaired.append(f"{module} has {kind} but no {_PARTNER[kind]}")
            continue
        down, up = _rank(tensor), _rank(partner, 1)
        if kind in ("lora_down", "lora_A", "down") and down and up and down != up:
            ranks.append(f"{module}'s {kind} has rank {down}, its {_PARTNER[kind]} {up}")
    problems = unpaired + ranks
    if problems:
        more = f" ({len(problems)} layers in all)" if len(problems) > 1 else ""
        raise UserError(
            f"lora.fuse: {file} is damaged: {problems[0]}{more}; download or export it again"
        )
    for key, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            what = "NaN" if torch.isnan(tensor).any() else "inf"
            raise UserError(
                f"lora.fuse: {file} is damaged: {key} holds {what} values; download or "
                "export it again"
            )


def _rank(tensor: torch.Tensor, dim: int = 0) -> int | None:
    """A factor's rank: lora_down's first dimension, lora_up's second (None for a vector)."""
    return tensor.shape[dim] if tensor.dim() > 1 else None


def _fold_alphas(file: Path, state: dict[str, torch.Tensor]) -> tuple[dict, bool]:
    """kohya-ss's layout stores an alpha per layer and applies (alpha / rank) B A; diffusers
    honours only the file's most common alpha on SD1.5/SDXL attention layers. Folding each
    alpha into its lora_down (in float32, so an fp16 file loses nothing) leaves diffusers
    alpha = rank everywhere: exact for every layer and family. A layer without an alpha
    keeps alpha = rank, kohya's rule and diffusers'."""
    folded, changed = dict(state), False
    for key, alpha in state.items():
        module = key.removesuffix(".alpha")
        down = state.get(f"{module}.lora_down.weight")
        if module == key or down is None:
            continue
        if alpha.numel() != 1:
            raise UserError(
                f"lora.fuse: {file} is damaged: {key} holds {alpha.numel()} numbers, not one "
                "alpha; download or export it again"
            )
        value, rank = float(alpha.reshape(-1)[0].float()), down.shape[0]
        del folded[key]
        if value != rank:
            folded[f"{module}.lora_down.weight"] = down.float() * (value / rank)
        changed = True
    return folded, changed
