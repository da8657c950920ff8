"""Whether a loaded pipeline's parts are the ones its family runs: diffusers loads whatever
classes and configs a folder names (an SD1.5 pipeline around an SDXL UNet, SDXL's second
text encoder without its projection, a UNet taking 5 channels), and each fails only deep
inside an export or a trace. Checked once, where every load is wrapped
(loading._wrap), from configs alone: lazy (meta) models pass through the same check.

Example:
    >>> check_fits(get_arch("sd15"), pipe, "my-folder")   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from slimdiff.errors import UserError
from slimdiff.models.arch import ArchSpec

__all__ = ["check_fits"]

_FIX = "the folder mixes models: save the pipeline again with save_pretrained"


def check_fits(arch: ArchSpec, pipe: Any, source: str) -> None:
    """UserError naming the first part of `pipe` that is not what `arch`'s pipeline runs:
    the denoiser's class and family-telling config, its input channels, the text
    encoders' classes."""
    from slimdiff.models.families import family_of_denoiser, why_no_family

    denoiser = getattr(pipe, arch.denoiser)
    name = type(denoiser).__name__
    config = dict(denoiser.config)
    found = family_of_denoiser(name, config)
    if found != arch.family:
        why = why_no_family(name, config)
        if why and not found:
            raise UserError(
                f"{source}: its {arch.denoiser} ({name}) is {why}, which slimdiff does not run"
            )
        what = f"a {found} {name}" if found else f"a {name} of no family slimdiff knows"
        raise UserError(
            f"{source}: its {arch.denoiser} is {what} (by its config), not the {arch.family} "
            f"one its {type(pipe).__name__} runs; {_FIX}"
        )
    _check_channels(arch, pipe, config, source)
    for spec in arch.text_encoders:
        encoder = getattr(pipe, spec.name, None)
        if encoder is not None and not _encoder_fits(spec, type(encoder).__name__):
            raise UserError(
                f"{source}: its {spec.name} is a {type(encoder).__name__}, which cannot give "
                f"what a {arch.family} pipeline reads from it ({', '.join(spec.outputs)}); "
                f"{_FIX}"
            )
    _check_text_widths(arch, pipe, config, source)
    _check_text_lengths(arch, pipe, source)


def _check_channels(arch: ArchSpec, pipe: Any, config: dict, source: str) -> None:
    latent = int(pipe.vae.config.latent_channels)
    packed = latent * arch.kind.latent_packing**2  # FLUX packs 2x2 latent pixels per token
    allowed = {packed}
    if arch.denoiser == "unet":
        allowed.add(2 * latent + 1)  # inpainting UNets: latents, mask, masked image
    given = config.get("in_channels")
    if given not in allowed:
        takes = " or ".join(str(n) for n in sorted(allowed))
        raise UserError(
            f"{source}: its {arch.denoiser} takes {given} input channels, and a {arch.family} "
            f"pipeline with this VAE ({latent} latent channels) feeds {takes} (text-to-image "
            "or inpainting); a denoiser trained for other inputs is not one slimdiff runs"
        )


def _check_text_widths(arch: ArchSpec, pipe: Any, config: dict, source: str) -> None:
    """The text encoders' widths against what the denoiser's config takes: the hidden
    states side by side within a segment (each segment zero-padded to the widest, so none
    may be wider than the denoiser's text width, and with every encoder present the widest
    is it), the pooled outputs side by side."""
    hidden: dict[int, list[tuple[str, int]]] = {}
    pooled: list[tuple[str, int]] = []
    complete = True
    for spec in arch.text_encoders:
        encoder = getattr(pipe, spec.name, None)
        if encoder is None:
            complete = False
            continue
        cfg = encoder.config
        width = int(getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", 0))
        if spec.hidden_output is not None:
            hidden.setdefault(spec.segment, []).append((spec.name, width))
        if "text_embeds" in spec.outputs:
            pooled.append((spec.name, int(cfg.projection_dim)))
        elif "pooler_output" in spec.outputs:
            pooled.append((spec.name, width))
    takes = arch.config_axis("D", config)
    sums = [sum(w for _, w in parts) for parts in hidden.values()]
    if sums and (max(sums) > takes or (complete and max(sums) != takes)):
        parts = ", ".join(f"{n} {w}" for group in hidden.values() for n, w in group)
        raise UserError(
            f"{source}: its text encoders give states {max(sums)} wide ({parts}), but its "
            f"{arch.denoiser} takes text {takes} wide; {_FIX}"
        )
    if pooled and "P" in arch.config_axes:
        want = arch.config_axis("P", config)
        if sum(w for _, w in pooled) != want:
            parts = ", ".join(f"{n} {w}" for n, w in pooled)
            raise UserError(
                f"{source}: its text encoders' pooled embedding is {sum(w for _, w in pooled)} "
                f"wide ({parts}), but its {arch.denoiser} takes {want}; {_FIX}"
            )


def _check_text_lengths(arch: ArchSpec, pipe: Any, source: str) -> None:
    """diffusers' SD/SDXL pipelines pad and cut CLIP prompts to the tokenizer's
    model_max_length, which long-context CLIPs (Long-CLIP: 248) raise and a tokenizer saved
    with a shorter one (64) lowers; the bundles here read 77 tokens (the families' fixed
    text axis), so such a model would draw otherwise than in diffusers. A length beyond the
    encoder's positions (a tokenizer saved without one reads as 1e30) is no length diffusers
    could run either, and is left alone."""
    for spec in arch.text_encoders:
        tokenizer, encoder = getattr(pipe, spec.tokenizer, None), getattr(pipe, spec.name, None)
        if spec.kind != "clip" or tokenizer is None or encoder is None:
            continue
        length = int(getattr(tokenizer, "model_max_length", spec.max_length))
        positions = int(getattr(encoder.config, "max_position_embeddings", spec.max_length))
        if length != spec.max_length and length <= positions:
            longer = length > spec.max_length
            what = "a long-context CLIP such as Long-CLIP" if longer else "shorter than CLIP's"
            raise UserError(
                f"{source}: its {spec.tokenizer} reads {length}-token prompts (model_max_length: "
                f"{what}), where slimdiff's {arch.family} bundles read {spec.max_length}; to "
                f"export it at {spec.max_length} tokens ({'the rest cut, ' if longer else ''}as "
                f"its diffusers pipeline would then read them), set model_max_length to "
                f"{spec.max_length} in {spec.tokenizer}/tokenizer_config.json"
            )


def _encoder_fits(spec: Any, class_name: str) -> bool:
    if spec.kind == "t5":
        return class_name.startswith("T5")
    if not class_name.startswith("CLIPTextModel"):
        return False
    projected = class_name.endswith("WithProjection")
    if "text_embeds" in spec.outputs:
        return projected
    if "pooler_output" in spec.outputs:
        return not projected
    return True
