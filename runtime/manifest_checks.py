"""Cross-field checks of a manifest: what would otherwise fail later, inside onnxruntime or
numpy, or run and draw a wrong image.

Each field of the schema (manifest.py) is valid on its own; these check that they agree:
the pipeline needs exactly the components listed, the denoiser takes what the `kind`
record feeds, channels and text widths agree between the graphs where a graph fixes them,
and every file the runtime opens is listed in `files` (so it is hashed before use). Each
check raises ValueError("field.path: what is wrong"); parse_manifest turns it into one
BundleError line.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from slimdiff.runtime.manifest import (
    DENOISER_OUTPUT,
    HIDDEN_OUTPUTS,
    MANIFEST_NAME,
    POOLED_OUTPUTS,
    TEXT_INPUT,
    VAE_DECODER,
    VAE_ENCODER,
    VAE_ENCODER_INPUT,
    VAE_ENCODER_OUTPUTS,
    VAE_INPUT,
    VAE_OUTPUT,
    ComponentEntry,
    IOSpec,
)

from slimdiff.limits import MAX_SIDE
from slimdiff.models.kinds import CONTROL_GUESS, CONTROL_IMAGE, CONTROL_ROWS, CONTROL_SCALE

if TYPE_CHECKING:
    from slimdiff.runtime.manifest import Manifest, PipelineSpec

__all__ = ["check_manifest", "check_pipeline"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,127}")
_FLOATS = ("float32", "float16", "bfloat16")
_INTS = ("int64", "int32")


def _fail(field: str, message: str) -> None:
    raise ValueError(f"{field}: {message}")


def _fixed(spec: IOSpec, axis: int) -> int | None:
    """The fixed size of `spec`'s axis, or None when the axis is dynamic."""
    dim = spec["shape"][axis]
    return dim if isinstance(dim, int) else None


# ---------------------------------------------------------------- pipeline record


def check_pipeline(p: PipelineSpec) -> None:
    """Checks within the `pipeline` record alone."""
    kind = p.kind
    names = [kind.sample_input, "timestep", "encoder_hidden_states", *kind.extra_inputs]
    names += [kind.pooled_input] if kind.pooled_input else []
    for name in names:
        if not _NAME.fullmatch(name):
            _fail("kind", f"{name[:40]!r} is not a tensor name")
    if len(set(names)) != len(names):
        _fail("kind", f"denoiser input names collide ({', '.join(names)})")
    if len(kind.name) > 64 or kind.timestep_divisor > 1e6:
        _fail("kind", "name longer than 64 or timestep_divisor above 1e6")
    if kind.shift is not None:
        s = kind.shift
        if not 1 <= s.base_image_seq_len < s.max_image_seq_len <= 1 << 24:
            _fail("kind.shift", "needs 1 <= base_image_seq_len < max_image_seq_len")
        if max(abs(s.base_shift), abs(s.max_shift)) > 100:
            _fail("kind.shift", "base_shift and max_shift must be within +-100")
    if kind.pooled_input == "":
        _fail("kind.pooled_input", "empty; null when the denoiser takes no pooled embedding")
    if ("timestep_cond" in kind.extra_inputs) != (kind.guidance_embedding_dim is not None):
        _fail("kind.guidance_embedding_dim", "set with the timestep_cond input, and only then")
    stats = (p.vae_latents_mean, p.vae_latents_std)
    if (stats[0] is None) != (stats[1] is None):
        _fail("vae_latents_mean", "and vae_latents_std come together, or neither")
    if stats[0] is not None and not len(stats[0]) == len(stats[1]) == p.latent_channels:
        _fail("vae_latents_mean", f"and vae_latents_std need {p.latent_channels} values each")
    if kind.embeds_guidance and p.uses_cfg:
        _fail("uses_cfg", "true for a denoiser that takes the guidance scale as an input")
    if p.vae_scale_factor & (p.vae_scale_factor - 1):
        _fail("vae_scale_factor", f"{p.vae_scale_factor} is not a power of two")
    grid = kind.size_multiple(p.vae_scale_factor)
    if p.size_multiple % grid:
        _fail(
            "size_multiple",
            f"{p.size_multiple} is not a multiple of the latent grid's {grid} pixels",
        )
    if any(v % p.size_multiple for v in p.default_size):
        _fail("default_size", f"not a multiple of size_multiple {p.size_multiple}")
    top = min(MAX_SIDE, p.max_side or MAX_SIDE)  # what a run takes (runtime/pipeline.py)
    if max(p.default_size) > top:
        _fail("default_size", f"a side above {top} pixels, which no run takes")

    encoders = p.text_encoders
    zeros = p.zero_text or ()
    if len({e.name for e in (*encoders, *zeros)}) != len(encoders) + len(zeros):
        _fail("text_encoders", "two records (or a zero_text one) name the same encoder")
    if not any(e.hidden_output for e in encoders):
        _fail("text_encoders", "no encoder outputs per-token hidden states")
    for z in zeros:  # a zero segment stands for a whole encoder's: it shares it with none
        if any(e.segment == z.segment and e.hidden_output for e in encoders):
            _fail("zero_text", f"{z.name}'s segment {z.segment} also holds an encoder's states")
    for segment in {e.segment for e in encoders if e.hidden_output} | {z.segment for z in zeros}:
        lengths = {e.max_length for e in encoders if e.hidden_output and e.segment == segment}
        lengths |= {z.max_length for z in zeros if z.segment == segment}
        if len(lengths) > 1:
            _fail(
                "text_encoders",
                f"segment {segment} joins hidden states of different max_length {sorted(lengths)}",
            )
    if kind.pooled_input and not any(set(e.outputs) & set(POOLED_OUTPUTS) for e in encoders):
        _fail(
            "text_encoders",
            f"the denoiser takes {kind.pooled_input} but no encoder outputs a pooled embedding",
        )


# ---------------------------------------------------------------- whole manifest


def check_manifest(m: Manifest) -> None:
    """Checks between the pipeline record, the components and the file list."""
    p = m.pipeline
    needed = [*(e.name for e in p.text_encoders), p.denoiser, VAE_DECODER]
    if len(set(needed)) != len(needed):
        _fail("pipeline", f"components named twice among {', '.join(needed)}")
    for name in needed:
        if name not in m.components:
            _fail("components", f"no {name} entry, which the pipeline needs")
    for name in m.components:
        if name not in needed and name != VAE_ENCODER:  # the encoder is optional (img2img)
            _fail(f"components.{name}", "not a component this pipeline uses")
    if MANIFEST_NAME in m.files:
        _fail("files", f"lists {MANIFEST_NAME}, which cannot hold its own hash")

    for name, entry in m.components.items():
        if entry.path.split("/")[0] != name or "/" not in entry.path:
            _fail(f"components.{name}.path", f"{entry.path} is not inside the {name}/ folder")
        _listed(m, f"components.{name}.path", entry.path)
    for i, record in enumerate(p.text_encoders):
        _listed(m, f"pipeline.text_encoders.{i}.tokenizer", record.tokenizer_file)
    _listed(m, "pipeline.scheduler", p.scheduler)

    text_len, width, pooled = _check_text_encoders(m)
    _check_denoiser(m, text_len, width, pooled)
    _check_vae(m)
    if VAE_ENCODER in m.components:
        _check_vae_encoder(m)


def _listed(m: Manifest, field: str, path: str) -> None:
    if path not in m.files:
        _fail(field, f"{path} is not listed in {MANIFEST_NAME} files")


def _check_io(field: str, spec: IOSpec | None, rank: int, dtypes: tuple[str, ...]) -> IOSpec:
    if spec is None:
        _fail(field, "missing")
    if len(spec["shape"]) != rank:
        _fail(field, f"has rank {len(spec['shape'])}, the pipeline needs {rank}")
    if spec["dtype"] not in dtypes:
        _fail(field, f"has dtype {spec['dtype']}, the pipeline needs one of {', '.join(dtypes)}")
    return spec


def _check_text_encoders(m: Manifest) -> tuple[int, int, int | None]:
    """Check each encoder's graph against its record; return the joined text states'
    (length, width) and the pooled width (None if some graph leaves it dynamic)."""
    lengths: dict[int, int] = {}
    widths: dict[int, int] = {}
    pooled: int | None = 0
    for record in m.pipeline.text_encoders:
        entry: ComponentEntry = m.components[record.name]
        field = f"components.{record.name}"
        if [i["name"] for i in entry.inputs] != [TEXT_INPUT]:
            _fail(f"{field}.inputs", f"must be exactly [{TEXT_INPUT}]")
        _check_io(f"{field}.inputs.{TEXT_INPUT}", entry.inputs[0], 2, _INTS)
        declared = {o["name"] for o in entry.outputs}
        for out in record.outputs:
            if out not in declared:
                _fail(f"{field}.outputs", f"has no {out}, which pipeline.text_encoders names")
        for out in record.outputs:
            spec = entry.io(out, outputs=True)
            if out in HIDDEN_OUTPUTS:
                _check_io(f"{field}.outputs.{out}", spec, 3, _FLOATS)
                if _fixed(spec, 2) not in (None, record.hidden_size):
                    _fail(
                        f"{field}.outputs.{out}", f"width is not hidden_size {record.hidden_size}"
                    )
                if _fixed(spec, 1) not in (None, record.max_length):
                    _fail(f"{field}.outputs.{out}", f"length is not max_length {record.max_length}")
                lengths[record.segment] = record.max_length
                widths[record.segment] = widths.get(record.segment, 0) + record.hidden_size
            else:
                _check_io(f"{field}.outputs.{out}", spec, 2, _FLOATS)
                dim = _fixed(spec, 1)
                pooled = None if pooled is None or dim is None else pooled + dim
    for zero in m.pipeline.zero_text or ():
        lengths[zero.segment] = zero.max_length
        widths[zero.segment] = zero.hidden_size
    return sum(lengths.values()), max(widths.values()), pooled


def _check_denoiser(m: Manifest, text_len: int, width: int, pooled: int | None) -> None:
    p = m.pipeline
    kind = p.kind
    entry = m.components[p.denoiser]
    field = f"components.{p.denoiser}"
    declared = {i["name"] for i in entry.inputs}
    expected = kind.input_names()
    if p.controlnet is not None:
        expected = expected | {CONTROL_IMAGE, CONTROL_SCALE}
        if CONTROL_ROWS in declared:  # guess mode's (bundles exported before it lack them)
            expected = expected | {CONTROL_ROWS, CONTROL_GUESS}
    if declared != expected:
        _fail(
            f"{field}.inputs",
            f"{', '.join(sorted(declared))} is not what a {kind.name} pipeline feeds "
            f"({', '.join(sorted(expected))})",
        )
    packing = kind.latent_packing
    sample = _check_io(
        f"{field}.inputs.{kind.sample_input}",
        entry.io(kind.sample_input),
        4 if packing == 1 else 3,
        _FLOATS,
    )
    channels = p.latent_channels * packing * packing
    axis = 1 if packing == 1 else 2
    if kind.inpainting and packing != 1:
        _fail("pipeline.kind.inpainting", "needs unpacked latents (latent_packing 1)")
    # an inpainting UNet takes the latents, the mask and the masked image's latents
    taken = 2 * channels + 1 if kind.inpainting else channels
    if _fixed(sample, axis) not in (None, taken):
        _fail(
            f"{field}.inputs.{kind.sample_input}",
            f"channels are not {taken} (latent_channels {p.latent_channels}, packing {packing}"
            + (", inpainting)" if kind.inpainting else ")"),
        )
    out = _check_io(
        f"{field}.outputs.{DENOISER_OUTPUT}",
        entry.io(DENOISER_OUTPUT, True),
        len(sample["shape"]),
        _FLOATS,
    )
    expected_out = list(sample["shape"])
    if kind.inpainting:
        expected_out[axis] = channels if _fixed(sample, axis) is not None else out["shape"][axis]
    if out["shape"] != expected_out:
        _fail(f"{field}.outputs.{DENOISER_OUTPUT}", f"shape differs from {kind.sample_input}'s")
    _check_io(f"{field}.inputs.timestep", entry.io("timestep"), 1, _FLOATS)
    states = _check_io(
        f"{field}.inputs.encoder_hidden_states", entry.io("encoder_hidden_states"), 3, _FLOATS
    )
    if _fixed(states, 1) not in (None, text_len):
        _fail(
            f"{field}.inputs.encoder_hidden_states",
            f"length {_fixed(states, 1)} is not the text encoders' {text_len} tokens "
            "(pipeline.text_encoders max_length)",
        )
    if _fixed(states, 2) not in (None, width):
        _fail(
            f"{field}.inputs.encoder_hidden_states",
            f"width {_fixed(states, 2)} is not the text encoders' {width}",
        )
    if kind.pooled_input:
        spec = _check_io(
            f"{field}.inputs.{kind.pooled_input}", entry.io(kind.pooled_input), 2, _FLOATS
        )
        if None not in (pooled, _fixed(spec, 1)) and pooled != _fixed(spec, 1):
            _fail(
                f"{field}.inputs.{kind.pooled_input}",
                f"width {_fixed(spec, 1)} is not the pooled outputs' {pooled}",
            )
    if "txt_ids" in expected:
        ids = _check_io(f"{field}.inputs.txt_ids", entry.io("txt_ids"), 2, _FLOATS)
        if _fixed(ids, 0) not in (None, text_len):
            _fail(f"{field}.inputs.txt_ids", f"length is not the text's {text_len} tokens")
    if p.controlnet is not None:
        _check_control(p, entry, field)
    for name in kind.extra_inputs:
        where = f"{field}.inputs.{name}"
        spec = _check_io(where, entry.io(name), 1 if name == "guidance" else 2, _FLOATS)
        width = _fixed(spec, 1) if name == "timestep_cond" else None
        if width not in (None, kind.guidance_embedding_dim):
            _fail(
                where,
                f"width {width} is not pipeline.kind.guidance_embedding_dim "
                f"{kind.guidance_embedding_dim}",
            )


def _check_control(p: PipelineSpec, entry: ComponentEntry, field: str) -> None:
    """The ControlNets' inputs: the control images (count, B, channels, H, W) and the
    scales (count,)."""
    record, where = p.controlnet, f"{field}.inputs.{CONTROL_IMAGE}"
    image = _check_io(where, entry.io(CONTROL_IMAGE), 5, _FLOATS)
    if image["shape"][0] != record.count:
        _fail(where, f"must stack pipeline.controlnet.count ({record.count}) images first")
    if _fixed(image, 2) not in (None, record.conditioning_channels):
        _fail(where, f"channels are not {record.conditioning_channels}")
    scale = _check_io(f"{field}.inputs.{CONTROL_SCALE}", entry.io(CONTROL_SCALE), 1, _FLOATS)
    if scale["shape"] != [record.count]:
        _fail(f"{field}.inputs.{CONTROL_SCALE}", f"must have shape [{record.count}]")
    if entry.io(CONTROL_ROWS) is not None:  # guess mode: a weight per row, and its switch
        _check_io(f"{field}.inputs.{CONTROL_ROWS}", entry.io(CONTROL_ROWS), 1, _FLOATS)
        guess = _check_io(f"{field}.inputs.{CONTROL_GUESS}", entry.io(CONTROL_GUESS), 1, _FLOATS)
        if guess["shape"] != [1]:
            _fail(f"{field}.inputs.{CONTROL_GUESS}", "must have shape [1]")


def _check_vae(m: Manifest) -> None:
    entry, field = m.components[VAE_DECODER], f"components.{VAE_DECODER}"
    _only_input(entry, field, VAE_INPUT)
    _check_latent(m, f"{field}.inputs.{VAE_INPUT}", entry.inputs[0])
    _check_image(f"{field}.outputs.{VAE_OUTPUT}", entry.io(VAE_OUTPUT, True))


def _check_vae_encoder(m: Manifest) -> None:
    entry, field = m.components[VAE_ENCODER], f"components.{VAE_ENCODER}"
    _only_input(entry, field, VAE_ENCODER_INPUT)
    _check_image(f"{field}.inputs.{VAE_ENCODER_INPUT}", entry.inputs[0])
    for name in VAE_ENCODER_OUTPUTS:
        _check_latent(m, f"{field}.outputs.{name}", entry.io(name, True))


def _only_input(entry: ComponentEntry, field: str, name: str) -> None:
    if [i["name"] for i in entry.inputs] != [name]:
        _fail(f"{field}.inputs", f"must be exactly [{name}]")


def _check_latent(m: Manifest, field: str, spec: IOSpec | None) -> None:
    """A VAE's latents: (B, C, h, w) floats, C the pipeline's latent_channels if fixed."""
    latent = _check_io(field, spec, 4, _FLOATS)
    if _fixed(latent, 1) not in (None, m.pipeline.latent_channels):
        _fail(
            field,
            f"has {_fixed(latent, 1)} channels, pipeline.latent_channels says "
            f"{m.pipeline.latent_channels}",
        )


def _check_image(field: str, spec: IOSpec | None) -> None:
    """A VAE's pixels: (B, 3, H, W) floats."""
    if _fixed(_check_io(field, spec, 4, _FLOATS), 1) not in (None, 3):
        _fail(field, "must have 3 (RGB) channels")
