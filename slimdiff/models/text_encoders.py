"""Which text encoders a pipeline has, and dropping the ones its family runs without.

SD3's pipeline runs without T5 (diffusers: `text_encoder_3=None, tokenizer_3=None`, the
documented way to save memory): `_get_t5_prompt_embeds` then returns zeros of
(batch, max_sequence_length = 256, transformer.config.joint_attention_dim) (diffusers 0.42;
0.29 used 77 tokens), which join the CLIP states on the token axis where T5's would. The
denoiser's input shape stays the same, and its graph too; the bundle loses T5-XXL, 4.7B
parameters (9.5 GB in fp16), more than SD3 Medium's transformer (2B). Prompt adherence
drops, most for long prompts and text in the image (the SD3 paper; diffusers' SD3 guide);
`slimdiff bench` measures it per recipe.

A TextEncoderSpec with `optional` may be absent; every other one must be there
(slimdiff/models/loading.py refuses a pipeline without it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from slimdiff.errors import UserError
from slimdiff.models.arch import ArchSpec, TextEncoderSpec

__all__ = [
    "absent_text_encoders",
    "check_droppable",
    "drop_text_encoders",
    "present_text_encoders",
    "zero_text",
]


def present_text_encoders(arch: ArchSpec, pipe: Any) -> tuple[TextEncoderSpec, ...]:
    """The family's text encoders that `pipe` has (all of them for a lone denoiser)."""
    if pipe is None:
        return arch.text_encoders
    return tuple(s for s in arch.text_encoders if getattr(pipe, s.name, None) is not None)


def absent_text_encoders(arch: ArchSpec, pipe: Any) -> tuple[TextEncoderSpec, ...]:
    """The optional encoders `pipe` runs without (SD3 without T5); none for a lone denoiser."""
    present = set(present_text_encoders(arch, pipe))
    return tuple(s for s in arch.text_encoders if s not in present)


def zero_text(arch: ArchSpec, pipe: Any) -> list[dict[str, Any]]:
    """The manifest's `zero_text` records: per absent encoder its segment, length and width
    (the denoiser's text width, as diffusers fills it: joint_attention_dim)."""
    denoiser = getattr(pipe, arch.denoiser)
    return [
        {
            "name": spec.name,
            "segment": spec.segment,
            "max_length": spec.max_length,
            "hidden_size": arch.config_axis("D", denoiser.config),
        }
        for spec in absent_text_encoders(arch, pipe)
    ]


def check_droppable(arch: ArchSpec, names: Iterable[str] | None) -> list[str]:
    """`names` (None: every optional encoder of the family), checked: UserError for a name
    that is not one of the family's encoders, or one its pipeline cannot run without,
    naming the ones it can."""
    optional = [s.name for s in arch.text_encoders if s.optional]
    wanted = list(optional if names is None else names)
    specs = {s.name: s for s in arch.text_encoders}
    if not optional:
        raise UserError(
            f"cannot drop {', '.join(wanted) or 'a text encoder'}: {arch.family}'s pipeline "
            "needs every one of its text encoders; only SD3's text_encoder_3 (T5) can be dropped"
        )
    for name in wanted:
        if name not in specs:
            raise UserError(
                f"cannot drop {name!r}: {arch.family} has no such text encoder (it has "
                f"{', '.join(specs)}); only {', '.join(optional)} can be dropped"
            )
        if not specs[name].optional:
            raise UserError(
                f"cannot drop {name}: {arch.family}'s pipeline needs it; only "
                f"{', '.join(optional)} can be dropped"
            )
    return wanted


def drop_text_encoders(pipe: Any, arch: ArchSpec, names: Iterable[str] | None) -> dict[str, int]:
    """Remove text encoders (and their tokenizers) from `pipe`: `names`, or None for every
    optional one (checked by check_droppable). Returns the parameters each removed encoder
    had (0: already absent).

    Example:
        >>> drop_text_encoders(load_model("tiny:sd3").pipe, get_arch("sd3"), None)  # doctest: +SKIP
        {'text_encoder_3': 96704}
    """
    specs = {s.name: s for s in arch.text_encoders}
    removed = {}
    for name in check_droppable(arch, names):
        encoder = getattr(pipe, name, None)
        removed[name] = 0 if encoder is None else sum(p.numel() for p in encoder.parameters())
        # register_modules, not setattr: it also writes model_index.json's [null, null].
        pipe.register_modules(**{name: None, specs[name].tokenizer: None})
    return removed
