"""The bundle manifest: a strict schema for what an exported bundle holds and how to run it.

A bundle is a folder:

    manifest.json                      this schema (SCHEMA_VERSION), written last
    text_encoder/model.onnx            one folder per component (+ model.onnx.data when
    text_encoder_2/model.onnx          the weights are stored as ONNX external data)
    unet/model.onnx | transformer/model.onnx
    vae_decoder/model.onnx
    tokenizer/tokenizer.json, tokenizer_2/...   read with the `tokenizers` library
    scheduler/scheduler_config.json    diffusers' scheduler config

The exporter builds a `Manifest` and writes `Manifest.to_json()`; the runtime reads it back
with `parse_manifest`, which validates the JSON text strictly (`extra="forbid"`, no "1" for
1 or `true` for 1, arrays where arrays belong, every number bounded, finite floats) and then
checks the fields against each other (manifest_checks.py), so a bundle that would fail
later inside onnxruntime or numpy, or holds a value no export writes (a zero VAE scaling
factor, latent channels the graphs disagree with), is refused up front with one line naming
the file, the field and the fix. `files` maps every file's relative path to its SHA-256;
runtime/bundle_files.py keeps paths inside the bundle and checks the hashes.

A manifest edited to other valid values still validates; what guards against that is the
bundle's identity, the SHA-256 of manifest.json's bytes, which pins every file through
`files` (`slimdiff export` prints it, `slimdiff verify` and `slimdiff run --expect-sha256`
check it). This module imports only the standard library, pydantic and the torch-free
slimdiff.models.kinds.

Example:
    >>> manifest = read_manifest("out/bundle")          # doctest: +SKIP
    >>> manifest.pipeline.kind.sample_input             # doctest: +SKIP
    'sample'
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import AfterValidator, ConfigDict, Field
from slimdiff.runtime import strict_json
from typing_extensions import TypedDict

from slimdiff.errors import UserError
from slimdiff.models.kinds import (
    KIND_WRITTEN_WHEN_SET,
    KindSpec,
    drop_unset,
)

__all__ = [
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "BundleError",
    "ComponentEntry",
    "IOSpec",
    "Manifest",
    "PipelineSpec",
    "ShapeProfile",
    "TextEncoderRecord",
    "ZeroTextRecord",
    "check_relative_path",
    "load_json_bytes",
    "parse_manifest",
    "read_manifest",
    "sha256_file",
]

MANIFEST_NAME = "manifest.json"
# 2: `pipeline.kind` (a KindSpec) replaced denoiser_kind/has_time_ids/guidance_embeds/
# patch_size; text encoder records gained max_positions; the schema became strict.
SCHEMA_VERSION = 2
MAX_MANIFEST_BYTES = 4 << 20  # a tiny bundle's is 7 kB, one with 10k files under 1 MB
MAX_JSON_DEPTH = 32  # the schema nests 6 deep
_CHUNK = 1 << 20
FIX = "export the bundle again with this slimdiff (`slimdiff export`)"

# Tensor names the denoising loop feeds and reads.
TEXT_INPUT = "input_ids"
DENOISER_OUTPUT = "out_sample"
VAE_DECODER = "vae_decoder"
VAE_INPUT, VAE_OUTPUT = "latent_sample", "sample"
# Optional (`export --vae-encoder`): image -> the posterior's mean and std, for img2img.
VAE_ENCODER = "vae_encoder"
VAE_ENCODER_INPUT = "image"
VAE_ENCODER_OUTPUTS = ("latent_mean", "latent_std")
# Optional (`export --controlnet`): the denoiser graph holds N ControlNets and takes their
# control images and scales besides (slimdiff/models/kinds.py: CONTROL_IMAGE, CONTROL_SCALE).
# Text encoder outputs: per-token hidden states (B, S, D), and pooled ones (B, P).
HIDDEN_OUTPUTS = ("penultimate_hidden_state", "last_hidden_state")
POOLED_OUTPUTS = ("text_embeds", "pooler_output")


class BundleError(UserError):
    """A bundle that is missing, incomplete, tampered with or from another slimdiff version."""


# ---------------------------------------------------------------- field types


def check_relative_path(value: str) -> str:
    """`value` if it is a safe bundle path: relative POSIX, no "." / ".." / empty parts, no
    backslash, colon, NUL or control characters; raises ValueError saying why otherwise.

    Example:
        >>> check_relative_path("unet/model.onnx")
        'unet/model.onnx'
    """
    if value.startswith("/"):
        raise ValueError(f"{value!r} is absolute; bundle paths are relative to the bundle")
    bad = sorted({c for c in value if c in "\\:" or ord(c) < 0x20 or ord(c) == 0x7F})
    if bad:
        raise ValueError(f"{value!r} contains {''.join(bad)!r}; bundle paths are POSIX paths")
    parts = value.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{value!r} has an empty, '.' or '..' part; it must stay in the bundle")
    if any(len(p.encode()) > 255 for p in parts):
        raise ValueError(f"{value!r} has a part longer than 255 bytes")
    return value


BundlePath = Annotated[
    str, Field(min_length=1, max_length=1024), AfterValidator(check_relative_path)
]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Label = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")]
ComponentName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
TensorName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.]{0,127}$")]
AxisName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_]{1,32}$")]
Dim = Annotated[int, Field(ge=1, le=2**31 - 1)] | AxisName
Dtype = Literal[
    "float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool"
]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
TextOutput = Literal[
    "penultimate_hidden_state", "last_hidden_state", "text_embeds", "pooler_output"
]
Count = Annotated[int, Field(ge=0, le=2**31 - 1)]
Error = Annotated[float, Field(ge=0)]

_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)


def _unique(values: list[str] | tuple[str, ...], what: str) -> None:
    dupes = sorted({v for v in values if list(values).count(v) > 1})
    if dupes:
        raise ValueError(f"{what} lists {', '.join(dupes)} more than once")


# ---------------------------------------------------------------- records


@pydantic.with_config(_CONFIG)
class IOSpec(TypedDict):
    """One graph input or output: {"name", "dtype", "shape"}; a shape entry is a fixed size
    (int >= 1) or the name of a dynamic axis ("B", "H", "8h", ...)."""

    name: TensorName
    dtype: Dtype
    shape: Annotated[list[Dim], Field(max_length=8)]


@pydantic.with_config(_CONFIG)
class Parity(TypedDict, total=False):
    """The exporter's check against torch (empty when export ran with check=False)."""

    rel_err: Error
    max_abs_err: Error
    tolerance: Annotated[float, Field(gt=0, le=1)]
    passed: bool
    inputs: Annotated[
        dict[TensorName, Annotated[list[Count], Field(max_length=8)]], Field(max_length=64)
    ]


@pydantic.with_config(_CONFIG)
class QuantExtra(TypedDict, total=False):
    """A quantized graph: the node types ORT's CPU EP runs it with (its optimized graph),
    how many int4 weight constants are packed, how timestep-aware scales were lowered, and the
    Q/DQ dialect (slimdiff/lowbit.py): "ort" (asymmetric uint8) or "tensorrt" (symmetric)."""

    kernels: Annotated[dict[TensorName, Count], Field(max_length=64)]
    int4_packed_weights: Count
    activation_scales: Literal["merged"]
    qdq_form: Literal["ort", "tensorrt"]


@pydantic.with_config(_CONFIG)
class OnnxExtra(TypedDict, total=False):
    """How an ONNX graph was produced; informational, the runtime does not read it."""

    opset: Annotated[int, Field(ge=7, le=64)]
    ort_fusions: Annotated[dict[TensorName, Count], Field(max_length=256)]
    attention: Literal["classic", "native"]
    external_data: bool
    quantization: QuantExtra
    # "streamed": exported from a model larger than memory, its weights written one tensor
    # at a time (export/streamed.py); parity_skipped says why no parity check ran.
    weights: Literal["memory", "streamed"]
    parity_skipped: Annotated[str, Field(max_length=500)]
    # why ORT's fusions did not run (the optimizer would not fit in memory)
    fusions_skipped: Annotated[str, Field(max_length=500)]


Shape = Annotated[list[Annotated[int, Field(ge=1, le=2**31 - 1)]], Field(max_length=8)]


@pydantic.with_config(_CONFIG)
class ShapeProfile(TypedDict):
    """Concrete input shapes at the smallest, the default and the largest run the bundle is
    built for (export's size and batch range): TensorRT's optimization profile per input,
    and the range a static-shape backend checks feeds against."""

    min: Annotated[dict[TensorName, Shape], Field(max_length=64)]
    opt: Annotated[dict[TensorName, Shape], Field(max_length=64)]
    max: Annotated[dict[TensorName, Shape], Field(max_length=64)]


def _check_profile(inputs: list[IOSpec], profile: ShapeProfile) -> None:
    """Every input at every point, shaped as its IOSpec (fixed sizes equal), min <= opt <=
    max per axis."""
    names = [i["name"] for i in inputs]
    for point in ("min", "opt", "max"):
        if sorted(profile[point]) != sorted(names):
            raise ValueError(f"profile.{point} must list the inputs {names}")
    for spec in inputs:
        name = spec["name"]
        shapes = [profile[p][name] for p in ("min", "opt", "max")]
        for shape in shapes:
            if len(shape) != len(spec["shape"]) or any(
                isinstance(d, int) and d != n for d, n in zip(spec["shape"], shape, strict=True)
            ):
                raise ValueError(f"profile shape {shape} of {name} does not fit {spec['shape']}")
        if any(not a <= b <= c for a, b, c in zip(*shapes, strict=True)):
            raise ValueError(f"profile of {name}: min {shapes[0]} <= opt <= max fails")


class ComponentEntry(pydantic.BaseModel):
    """One exported component: a graph file inside the component's own folder, its IO."""

    model_config = _CONFIG

    path: BundlePath  # relative to the bundle root, e.g. "unet/model.onnx"
    # onnx: an ONNX graph (ORT backends, TensorRT's parser); aoti: an AOTInductor .pt2
    # package (the aoti backend, which also runs a bundle's ONNX components)
    format: Literal["onnx", "aoti"]
    precision: Literal["fp32", "fp16", "bf16", "int8", "int4"]
    inputs: Annotated[list[IOSpec], Field(min_length=1, max_length=64)]
    outputs: Annotated[list[IOSpec], Field(min_length=1, max_length=64)]
    parity: Parity  # {} when export ran with check=False
    extra: OnnxExtra
    profile: ShapeProfile | None = None  # None: written by a slimdiff before profiles

    @pydantic.model_validator(mode="after")
    def _names_unique(self) -> ComponentEntry:
        _unique([i["name"] for i in self.inputs], "inputs")
        _unique([o["name"] for o in self.outputs], "outputs")
        if self.profile is not None:
            _check_profile(self.inputs, self.profile)
        return self

    def io(self, name: str, outputs: bool = False) -> IOSpec | None:
        """The input (or output) called `name`, if there is one."""
        return next(
            (s for s in (self.outputs if outputs else self.inputs) if s["name"] == name), None
        )


class TextEncoderRecord(pydantic.BaseModel):
    """How the pipeline uses one text encoder: its tokenizer folder, padding, outputs, and
    the `segment` of the denoiser's text states its hidden output goes to (see
    slimdiff.models.arch.TextEncoderSpec)."""

    model_config = _CONFIG

    name: ComponentName
    tokenizer: BundlePath  # a folder holding tokenizer.json
    kind: Literal["clip", "t5"]
    max_length: Annotated[int, Field(ge=1, le=4096)]
    # The encoder's position embeddings (CLIP: 77); None for relative positions (T5).
    max_positions: Annotated[int, Field(ge=1, le=1 << 20)] | None
    pad_token_id: TokenId
    eos_token_id: TokenId | None
    bos_token_id: TokenId | None
    outputs: Annotated[tuple[TextOutput, ...], Field(min_length=1, max_length=4)]
    segment: Annotated[int, Field(ge=0, le=7)]
    hidden_size: Annotated[int, Field(ge=1, le=1 << 16)]
    # The encoder's vocabulary (its token embedding's rows): the tokenizer's ids are checked
    # against it at load. None in bundles written before 0.2.
    vocab_size: Annotated[int, Field(ge=1, le=1 << 24)] | None = None

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> TextEncoderRecord:
        _unique(self.outputs, "outputs")
        if sum(o in HIDDEN_OUTPUTS for o in self.outputs) > 1:
            raise ValueError("outputs: at most one per-token hidden state may be used")
        if self.max_positions is not None and self.max_length > self.max_positions:
            raise ValueError(
                f"max_length {self.max_length} exceeds the encoder's {self.max_positions} positions"
            )
        return self

    @property
    def hidden_output(self) -> str | None:
        return next((o for o in self.outputs if o in HIDDEN_OUTPUTS), None)

    @property
    def tokenizer_file(self) -> str:
        return f"{self.tokenizer}/tokenizer.json"


class ZeroTextRecord(pydantic.BaseModel):
    """A text encoder the pipeline runs without (SD3 without T5: diffusers'
    `text_encoder_3=None`): its `segment` of the denoiser's text states is `max_length`
    zero tokens of width `hidden_size` (slimdiff/models/text_encoders.py)."""

    model_config = _CONFIG

    name: ComponentName  # the encoder it stands for, e.g. "text_encoder_3"
    segment: Annotated[int, Field(ge=0, le=7)]
    max_length: Annotated[int, Field(ge=1, le=4096)]
    hidden_size: Annotated[int, Field(ge=1, le=1 << 16)]


class ControlNetRecord(pydantic.BaseModel):
    """The ControlNets inside the denoiser graph (`export --controlnet`): `count` of them,
    their control images stacked (count, B, conditioning_channels, H, W), RGB at the
    image's size, fed unnormalised in [0, 1] as diffusers' ControlNet pipelines feed them,
    and one conditioning scale each."""

    model_config = _CONFIG

    count: Annotated[int, Field(ge=1, le=8)]
    conditioning_channels: Literal[3]
    # The first ControlNet pools its conditions (the shuffle ControlNet's config): diffusers
    # then runs guess mode always, and so does the runtime. Written only when set.
    global_pool_conditions: Literal[True] | None = None

    @pydantic.model_serializer(mode="wrap")
    def _omit_unset(self, handler: Any) -> dict[str, Any]:
        return drop_unset(handler(self), ("global_pool_conditions",))


class StrengthRecord(pydantic.BaseModel):
    """The `strength` a run takes when it gives none: image-to-image's and inpainting's,
    the defaults of the diffusers pipelines that run this bundle's model."""

    model_config = _CONFIG

    image: Annotated[float, Field(gt=0, le=1)]
    inpaint: Annotated[float, Field(gt=0, le=1)]


class PipelineSpec(pydantic.BaseModel):
    """Constants the runtime's denoising loop needs (written by export/bundle.py)."""

    model_config = _CONFIG

    denoiser: ComponentName  # "unet" | "transformer"
    kind: KindSpec  # how the loop drives this denoiser (slimdiff/models/kinds.py)
    uses_cfg: bool
    default_size: tuple[
        Annotated[int, Field(ge=8, le=16384)], Annotated[int, Field(ge=8, le=16384)]
    ]  # (height, width)
    default_steps: Annotated[int, Field(ge=1, le=1000)]
    default_guidance: Annotated[float, Field(ge=0, le=100)]
    vae_scale_factor: Annotated[int, Field(ge=1, le=64)]  # a power of two (checked)
    size_multiple: Annotated[int, Field(ge=1, le=1024)]
    latent_channels: Annotated[int, Field(ge=1, le=64)]
    vae_scaling_factor: Annotated[float, Field(gt=0, le=1000)]
    vae_shift_factor: Annotated[float, Field(ge=-1000, le=1000)] | None
    # Per-channel latent statistics SDXL's pipeline decodes with (Playground v2.5):
    # latents * std / vae_scaling_factor + mean. Written only when the VAE has them.
    vae_latents_mean: tuple[Annotated[float, Field(ge=-1000, le=1000)], ...] | None = None
    vae_latents_std: tuple[Annotated[float, Field(gt=0, le=1000)], ...] | None = None
    force_zeros_for_empty_prompt: bool
    text_encoders: Annotated[tuple[TextEncoderRecord, ...], Field(min_length=1, max_length=8)]
    scheduler: BundlePath  # diffusers' scheduler_config.json
    # Encoders the pipeline runs without, zeros in their place; written only when there
    # are some, so other manifests read as before.
    zero_text: Annotated[tuple[ZeroTextRecord, ...], Field(min_length=1, max_length=8)] | None = (
        None
    )
    # Written only for a bundle whose denoiser holds a ControlNet.
    controlnet: ControlNetRecord | None = None
    # Absent in bundles exported before it: 0.8 then (0.3 for the SDXL refiner).
    default_strength: StrengthRecord | None = None
    # The largest side the denoiser takes (SD3's positional embedding); written only then.
    max_side: Annotated[int, Field(ge=8, le=1 << 20)] | None = None

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> PipelineSpec:
        from slimdiff.runtime.manifest_checks import check_pipeline

        check_pipeline(self)
        return self

    @pydantic.model_serializer(mode="wrap")
    def _omit_absent_stats(self, handler: Any) -> dict[str, Any]:
        return drop_unset(
            handler(self),
            (
                "vae_latents_mean",
                "vae_latents_std",
                "zero_text",
                "controlnet",
                "default_strength",
                "max_side",
            ),
        )


class Manifest(pydantic.BaseModel):
    """A bundle's manifest.json, as data. `sha256` is the identity of the bytes it was read
    from or written as (None for one built in memory and never written)."""

    model_config = _CONFIG

    schema_version: int
    slimdiff_version: Annotated[str, Field(max_length=64, pattern=r"^[A-Za-z0-9.+_-]*$")]
    family: Label  # a label ("sdxl"); nothing in the runtime branches on it
    source: Annotated[dict[Label, Annotated[str, Field(max_length=1024)]], Field(max_length=32)]
    pipeline: PipelineSpec
    components: Annotated[dict[ComponentName, ComponentEntry], Field(min_length=1, max_length=16)]
    files: Annotated[dict[BundlePath, Sha256], Field(min_length=1, max_length=100_000)]
    _sha256: str | None = pydantic.PrivateAttr(default=None)

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> Manifest:
        from slimdiff.runtime.manifest_checks import check_manifest

        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"schema_version must be {SCHEMA_VERSION}")
        check_manifest(self)
        return self

    @property
    def sha256(self) -> str | None:
        return self._sha256

    def to_json(self) -> str:
        """The manifest.json text: deterministic (field order, then insertion order)."""
        data = self.model_dump(mode="json")
        return json.dumps(data, indent=2, ensure_ascii=True, allow_nan=False) + "\n"

    def to_bytes(self) -> bytes:
        return self.to_json().encode("ascii")


# ---------------------------------------------------------------- reading


def sha256_file(path: Path) -> str:
    """SHA-256 hex of a file, read in 1 MiB chunks (bundle files can be 10 GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def load_json_bytes(data: bytes, where: str, infinities: bool = False) -> Any:
    """Parse a bundle's JSON file strictly (see strict_json.loads, and its `infinities`);
    BundleError if not."""
    try:
        return strict_json.loads(data, MAX_JSON_DEPTH, infinities)
    except strict_json.StrictJSONError as err:
        raise BundleError(f"{where}: {err}; {FIX}") from None


def parse_manifest(data: bytes, where: str | Path) -> Manifest:
    """Validate manifest.json's bytes (already read: no second read to race with) strictly.

    `where` names the file in error messages. Raises BundleError, one line, on anything but
    a manifest this slimdiff writes.
    """
    where = str(where)
    value = load_json_bytes(data, where)
    if not isinstance(value, dict):
        raise BundleError(
            f"{where}: the top level is a JSON {strict_json.kind(value)}, not an object; {FIX}"
        )
    version = value.get("schema_version")
    if type(version) is not int:
        raise BundleError(f"{where}: schema_version is missing or not an integer; {FIX}")
    if version != SCHEMA_VERSION:
        older = version < SCHEMA_VERSION
        raise BundleError(
            f"{where}: manifest schema version {version} is from "
            f"{'an older' if older else 'a newer'} slimdiff; this one reads version "
            f"{SCHEMA_VERSION}: "
            + (FIX if older else "upgrade slimdiff, or export the bundle again with this one")
        )
    pipeline = value.get("pipeline")
    kind = pipeline.get("kind") if isinstance(pipeline, dict) else None
    required = set(KindSpec.model_fields) - KIND_WRITTEN_WHEN_SET
    missing = sorted(required - set(kind)) if isinstance(kind, dict) else []
    if missing:
        # KindSpec has defaults for the Python API; a manifest spells out every field, so a
        # deleted "sigmas" or "shift" cannot silently change a FLUX schedule. (The fields
        # written only when set are checked against the inputs that need them instead.)
        raise BundleError(f"{where}: field 'pipeline.kind': {', '.join(missing)} missing; {FIX}")
    try:
        manifest = Manifest.model_validate_json(data, strict=True)
    except pydantic.ValidationError as err:
        raise BundleError(
            f"{where}: {strict_json.describe(err, value)}; {_fix_for(err, value)}"
        ) from None
    manifest._sha256 = hashlib.sha256(data).hexdigest()
    return manifest


def _fix_for(err: pydantic.ValidationError, value: dict) -> str:
    """FIX, unless a newer slimdiff wrote fields this one does not know (optional fields
    are added within a schema version): then the fix is to upgrade."""
    import slimdiff

    unknown = any(e["type"] == "extra_forbidden" for e in err.errors())
    writer = value.get("slimdiff_version")
    if unknown and isinstance(writer, str) and _version(writer) > _version(slimdiff.__version__):
        return (
            f"it was written by slimdiff {writer[:32]}, newer than this {slimdiff.__version__}: "
            "upgrade slimdiff (pip install -U slimdiff), or export the bundle again with this one"
        )
    return FIX


def _version(text: str) -> tuple[int, ...]:
    """Leading numeric release parts ("0.2.1rc1" -> (0, 2, 1)); () when there are none."""
    parts = []
    for part in text.split("."):
        digits = part[: len(part) - len(part.lstrip("0123456789"))]
        if not digits:
            break
        parts.append(int(digits))
        if digits != part:
            break
    return tuple(parts)


def read_manifest(
    bundle: str | Path, verify: bool = True, expect_sha256: str | None = None
) -> Manifest:
    """Read `bundle/manifest.json`; with `verify` (the default), check everything a run
    would first: every path stays inside the bundle, every file matches its SHA-256.

    Example:
        >>> read_manifest("out/bundle").pipeline.default_steps   # doctest: +SKIP
        30
    """
    from slimdiff.runtime.bundle_files import open_bundle, read_manifest_bytes

    if verify:
        return open_bundle(bundle, expect_sha256=expect_sha256).manifest
    root, data = read_manifest_bytes(bundle, expect_sha256)
    return parse_manifest(data, root / MANIFEST_NAME)
