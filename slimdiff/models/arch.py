"""ArchSpec: everything slimdiff knows about one model family, as data.

One record per family (sd15, sdxl, sd3, flux; families.py). Code elsewhere reads these
fields instead of branching on the family: the exporter takes IO names, dynamic axes and
its ORT fusion plan from here, the bundle writer the pipeline constants and the `KindSpec`
the runtime drives the denoiser with, `inspect` the conditioning shapes, and compression
passes the structure (attention heads and the projections that share them, FFN neurons,
the layers that carry time information, what must stay untouched or unquantized).

Module-name globs (`blocks`, `never_touch`, ...) match dotted names one part at a time:
"*" matches within one part, "**" any number of parts ("**.attn1"); and a glob that matches
a module covers its submodules (see `glob_match` and `matches`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Literal

from slimdiff.models.kinds import KindSpec, is_inpainting

__all__ = [
    "ArchSpec",
    "AttentionSpec",
    "FFNSpec",
    "OnnxPlan",
    "TensorSpec",
    "TextEncoderSpec",
    "glob_match",
    "matches",
]

# What a text encoder's exported graph returns. The names are the ONNX output names.
#   last_hidden_state        (B, S, D)  final layer, after the final norm (SD1.5, T5)
#   penultimate_hidden_state (B, S, D)  hidden_states[-2] (SDXL, SD3 CLIP encoders)
#   text_embeds              (B, P)     pooled output through the projection (SDXL enc 2, SD3)
#   pooler_output            (B, D)     pooled output without projection (FLUX CLIP)
TextOutput = Literal[
    "last_hidden_state", "penultimate_hidden_state", "text_embeds", "pooler_output"
]
HIDDEN_OUTPUTS = ("last_hidden_state", "penultimate_hidden_state")
POOLED_OUTPUTS = ("text_embeds", "pooler_output")


@dataclass(frozen=True)
class OnnxPlan:
    """How one component goes through onnxruntime's transformer optimizer on export.

    model_type: onnxruntime.transformers model type ("unet", "vae", "clip", "t5", "mmdit").
    attention: "classic" exports diffusers models with `AttnProcessor()` (explicit
        MatMul/Softmax, the pattern ORT's UNet attention fusion matches, as ORT's tooling and
        TensorRT demoDiffusion do); "native" keeps the model's own SDPA processors.
    on_cpu: whether CPU bundles run the optimizer at all (GPU bundles always do).
    opt_level: ORT graph level run before the Python fusions (0 = fusions only).
    shape_inference: ORT's symbolic shape inference during CPU fusions (see export/optimize).
    """

    model_type: str
    attention: Literal["classic", "native"] = "native"
    on_cpu: bool = False
    opt_level: int = 0
    shape_inference: bool = False


# Measured on this repo's random: (full-width) models, ORT 1.32 CPU EP, 2 threads, fp32.
# CLIP: SkipLayerNorm + QuickGelu, no attention (ORT's CLIP attention fusion matches neither
# the SDPA nor the eager export of transformers 5): CLIP-L at batch 2 runs 357 ms unfused,
# 360 ms fused. T5: SkipSimplifiedLayerNorm + FastGelu only, likewise.
CLIP_ONNX = OnnxPlan("clip")
T5_ONNX = OnnxPlan("t5")
# VAE: its fusions are GroupNorm/NhwcConv (CUDA only); ORT 1.32's VAE attention fusion
# crashes on the classic export and does not match the SDPA one.
VAE_ONNX = OnnxPlan("vae")


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a pipeline and how the pipeline uses it.

    The denoiser's `encoder_hidden_states` joins the encoders' hidden outputs: those in the
    same `segment` side by side on the feature axis, then the segments one after the other
    on the token axis, each zero-padded to the widest (SD3: CLIP-L + CLIP-G in segment 0,
    T5 in segment 1). The pooled embedding joins every pooled output on the feature axis.
    """

    name: str  # pipeline attribute, e.g. "text_encoder_2"
    tokenizer: str  # pipeline attribute of its tokenizer, e.g. "tokenizer_2"
    kind: Literal["clip", "t5"]
    outputs: tuple[TextOutput, ...]
    max_length: int = 77  # tokens; the pipelines pad and truncate to this
    segment: int = 0
    onnx: OnnxPlan = CLIP_ONNX
    # The family's pipeline also runs without this encoder (diffusers: SD3's
    # `text_encoder_3=None`); its segment is then max_length zero tokens at the denoiser's
    # text width (slimdiff/models/text_encoders.py).
    optional: bool = False

    @property
    def hidden_output(self) -> str | None:
        return next((o for o in self.outputs if o in HIDDEN_OUTPUTS), None)


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its name, dtype and symbolic shape.

    A shape entry is an int (fixed) or a string naming an axis: run-time sizes ("B", "H",
    "W", "L", "S") or widths the denoiser's config fixes (ArchSpec.config_axes).
    `arg` is the denoiser's keyword for it when that is not the name, dotted into a dict
    argument ("added_cond_kwargs.time_ids"); `when` names a config flag without which the
    denoiser has no such input (FLUX.1-schnell has no `guidance`).
    """

    name: str
    dtype: Literal["float32", "int64", "int32", "float16"]
    shape: tuple[int | str, ...]
    arg: str | None = None
    when: str | None = None


@dataclass(frozen=True)
class AttentionSpec:
    """Attention modules whose heads a pass may mask or remove, as names relative to each
    module `glob` matches (the "site"). `module` is the diffusers Attention (its `heads`).

    Rows of `qkv` (and of the context stream's `context_qkv`: SD3/FLUX joint attention
    shares its heads across both streams) and input columns of `out` / `context_out` group
    by head. `out_columns="first"`: the attention's heads are the first columns of `out`
    and the rest belong to something else (FLUX single blocks' fused proj_out, whose input
    is [attention output, MLP hidden]). Absent submodules are skipped (SD3's last block has
    no context output).
    """

    glob: str
    module: str = ""
    qkv: tuple[str, ...] = ("to_q", "to_k", "to_v")
    out: tuple[str, ...] = ("to_out.0",)
    context_qkv: tuple[str, ...] = ()
    context_out: tuple[str, ...] = ()
    out_columns: Literal["all", "first"] = "all"


@dataclass(frozen=True)
class FFNSpec:
    """Feed-forward blocks whose hidden neurons a pass may mask or remove, relative to each
    module `glob` matches. Rows of `up` and input columns of `down` group by neuron;
    `gated` (GEGLU): `up` has 2 x hidden rows, [value; gate], sliced consistently.
    `activation` is the module whose output is the neurons' activations (where a mask
    multiplies). `down_columns="last"`: the neurons are the last columns of `down` (FLUX
    single blocks' proj_out, after the attention's)."""

    glob: str
    up: str = "net.0.proj"
    down: str = "net.2"
    activation: str = "net.0"
    gated: bool = False
    down_columns: Literal["all", "last"] = "all"


def glob_match(name: str, glob: str) -> bool:
    """Whether dotted module `name` matches `glob`, part by part ("*" within a part, "**"
    for any number of parts, fnmatch rules otherwise).

    Example:
        >>> glob_match("down_blocks.1.attentions.0.transformer_blocks.0.attn1", "**.attn1")
        True
        >>> glob_match("down_blocks.0.resnets.0", "down_blocks.*")
        False
    """
    return _match(name.split(".") if name else [], glob.split("."))


def _match(parts: list[str], pattern: list[str]) -> bool:
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_match(parts[i:], rest) for i in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], head) and _match(parts[1:], rest)


def matches(name: str, globs: Iterable[str]) -> bool:
    """Whether module `name` or one of its parents matches one of `globs`.

    Example:
        >>> matches("time_embedding.linear_1", ("time_embedding",))
        True
        >>> matches("down_blocks.0.resnets.1.time_emb_proj", ("**.time_emb_proj",))
        True
    """
    parts = name.split(".") if name else []
    return any(_match(parts[: i + 1], g.split(".")) for i in range(len(parts)) for g in globs)


ConfigAxis = str | Callable[[Any], int]


@dataclass(frozen=True)
class ArchSpec:
    """A model family: components, denoiser IO and structure, and pipeline constants."""

    family: Literal["sd15", "sdxl", "sd3", "flux"]
    pipeline_classes: tuple[str, ...]  # diffusers class names that identify the family
    denoiser: Literal["unet", "transformer"]  # pipeline attribute of the denoiser
    # The diffusers class of the denoiser, and config values that tell this family's from
    # another family's with the same class (a lone component folder has only its config).
    denoiser_class: str
    text_encoders: tuple[TextEncoderSpec, ...]
    denoiser_inputs: tuple[TensorSpec, ...]
    kind: KindSpec
    default_size: tuple[int, int]  # (height, width) in pixels
    default_steps: int
    default_guidance: float
    uses_cfg: bool  # classifier-free guidance batches (uncond, cond) into one call
    denoiser_onnx: OnnxPlan
    # `strength` when a run gives none: the defaults of the family's diffusers image-to-
    # image and inpaint pipelines (0.42), then of its ControlNet ones (None: the same).
    default_strength: tuple[float, float] = (0.8, 1.0)
    controlnet_strength: tuple[float, float] | None = None
    # Trained as a rectified flow (SD3, FLUX): sampled by flow-matching schedulers; the
    # others are VP (or EDM) diffusions.
    flow_matching: bool = False
    # The pipeline decodes latents * latents_std / scaling_factor + latents_mean when the
    # VAE config has per-channel statistics (StableDiffusionXLPipeline: Playground v2.5).
    vae_latent_stats: bool = False
    # The pipeline decodes latents / scaling_factor + the VAE's shift_factor (SD3, FLUX);
    # SD1.5/SDXL pipelines ignore a shift_factor in the VAE config (a FLUX VAE swapped in).
    vae_shift: bool = False
    # Widths fixed by the denoiser's config: axis name -> config key, or a function of it.
    config_axes: Mapping[str, ConfigAxis] = field(default_factory=dict)
    config_match: Mapping[str, Any] = field(default_factory=dict)
    # SD3 patchifies 2x2 in the model: the token patch is this config key's value.
    token_patch_key: str | None = None
    # ---- structure, for passes and `inspect` (module-name globs, see `matches`)
    blocks: tuple[str, ...] = ()  # the denoiser's blocks, one row each in `inspect`
    attention: tuple[AttentionSpec, ...] = ()
    ffn: tuple[FFNSpec, ...] = ()
    # Modules no pass changes: the latent's way in and out and the output norm.
    never_touch: tuple[str, ...] = ()
    # Layers that carry time information (QuEST finetunes them): the global time/condition
    # embedders, and the per-block projections of the time embedding (UNet ResNets'
    # time_emb_proj; DiT blocks' AdaLN modulation, the transformer's analogue).
    time_embedders: tuple[str, ...] = ()
    time_projections: tuple[str, ...] = ()
    # The first and last layers (QuEST keeps them at 8 bit), and what quantization leaves in
    # full precision however low the recipe goes (from ModelOpt's filter_func_default, less
    # the time and first/last layers, which QuEST quantizes). never_quantize wins.
    io_layers: tuple[str, ...] = ()
    never_quantize: tuple[str, ...] = ()
    # Layers whose weights are quantized but whose inputs stay float: UNet ResNets'
    # conv_shortcut, whose input in the up path is the concatenation of the hidden state and
    # the skip connection, two ranges apart. ModelOpt leaves the layer float; QuEST (after
    # Q-Diffusion) quantizes its weights and splits its input's quantizer at the
    # concatenation, which no integer kernel takes; so: the weights (bytes), not the input.
    weight_only: tuple[str, ...] = ()
    # EcoDiff's initial mask logit (its configs: SDXL and FLUX 3, SD3 4, SD2 2.5): where
    # hard-concrete masks start, sigmoid(3) = 0.95 open.
    mask_init_logit: float = 3.0
    # Components the runtime needs, besides the text encoders.
    vae_decoder_inputs: tuple[TensorSpec, ...] = (
        TensorSpec("latent_sample", "float32", ("B", "C", "h", "w")),
    )

    # ------------------------------------------------------------ derived

    @property
    def text_encoder_names(self) -> tuple[str, ...]:
        return tuple(te.name for te in self.text_encoders)

    @property
    def components(self) -> tuple[str, ...]:
        """Exported components, in the order the runtime runs them."""
        return (*self.text_encoder_names, self.denoiser, "vae_decoder")

    @property
    def frozen(self) -> tuple[str, ...]:
        """What structural and pruning passes leave bit-identical: never_touch and the
        global time embedders (the per-block time projections they may retrain)."""
        return (*self.never_touch, *self.time_embedders)

    @property
    def time_layers(self) -> tuple[str, ...]:
        return (*self.time_embedders, *self.time_projections)

    def text_length(self) -> int:
        """Tokens in the denoiser's encoder_hidden_states: per segment the longest encoder,
        summed over segments (SD3: 77 + 256; FLUX: T5's 512; UNets: 77). An optional
        encoder a pipeline runs without still counts: its zeros have its length."""
        lengths: dict[int, int] = {}
        for te in self.text_encoders:
            if te.hidden_output is not None:
                lengths[te.segment] = max(lengths.get(te.segment, 0), te.max_length)
        return sum(lengths.values())

    def present_inputs(self, config: Any) -> tuple[TensorSpec, ...]:
        """denoiser_inputs minus those whose `when` flag this denoiser's config lacks."""
        return tuple(s for s in self.denoiser_inputs if s.when is None or config.get(s.when))

    def kind_for(self, config: Any) -> KindSpec:
        """The KindSpec filled in for one denoiser: its optional inputs, its token patch,
        the width of its guidance embedding (an LCM UNet's timestep_cond)."""
        present = {s.name: s for s in self.present_inputs(config)}
        extra = tuple(n for n in self.kind.extra_inputs if n in present)
        patch = int(config.get(self.token_patch_key) or 1) if self.token_patch_key else None
        update: dict[str, Any] = {
            "extra_inputs": extra,
            "token_patch": patch or self.kind.token_patch,
        }
        if "timestep_cond" in present:
            width = present["timestep_cond"].shape[-1]
            if isinstance(width, str):
                width = self.config_axis(width, config)
            update["guidance_embedding_dim"] = int(width)
        if is_inpainting(config):
            update["inpainting"] = True
        return self.kind.model_copy(update=update)

    def uses_cfg_for(self, config: Any) -> bool:
        """Whether this denoiser's pipeline batches (uncond, cond) for guidance: the
        family's way, unless the denoiser takes the guidance scale as an input (an
        LCM-distilled UNet), as diffusers' pipelines decide it."""
        return self.uses_cfg and not self.kind_for(config).embeds_guidance

    def axis_sizes(
        self, config: Any, *, batch: int, lat_h: int, lat_w: int, text_len: int
    ) -> dict[str, int]:
        """A size for every axis name in denoiser_inputs, for latents of lat_h x lat_w."""
        p = self.kind.latent_packing
        sizes = {"B": batch, "H": lat_h, "W": lat_w, "S": text_len}
        sizes["L"] = (lat_h // p) * (lat_w // p)
        for axis in self.config_axes:
            sizes[axis] = self.config_axis(axis, config)
        return sizes

    def config_axis(self, axis: str, config: Any) -> int:
        """The width `config` fixes for a config axis ("D": the text states' width)."""
        source = self.config_axes[axis]
        return int(source(config) if callable(source) else config[source])

    def matches_config(self, class_name: str, config: Mapping[str, Any]) -> bool:
        """Whether a denoiser of `class_name` with `config` belongs to this family."""
        if class_name != self.denoiser_class:
            return False
        return all(config.get(k) == v for k, v in self.config_match.items())
