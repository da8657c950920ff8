"""Write a diffusers SD3 or FLUX pipeline as one original-layout ("single-file") checkpoint.

The MMDiT counterpart of tests/ldm_checkpoint.py (SD1.5/SDXL): the key layout Stability's
sd3_medium_incl_clips(_t5xxlfp8).safetensors and Black Forest Labs' flux1-dev.safetensors
ship in, which diffusers' `from_single_file` converts from. diffusers ships only that
direction, so each function here inverts one of its converters in
diffusers/loaders/single_file_utils.py, key for key:

- `sd3_transformer_state`: `convert_sd3_transformer_checkpoint_to_diffusers` (q, k, v
  joined into one `qkv`; the last block's context `adaLN_modulation` and the final
  layer's in SD3's (shift, scale) order, which the converter swaps to diffusers' (scale,
  shift); SD3.5's `ln_q`/`ln_k` and `attn2`);
- `flux_transformer_state`: `convert_flux_transformer_checkpoint_to_diffusers` (a single
  block's q, k, v and MLP-in joined into `linear1`; the final layer swapped as for SD3);
- the VAE under `first_stage_model.`: `convert_ldm_vae_checkpoint` (tests.ldm_checkpoint);
- CLIP-L, CLIP-G and T5 under `text_encoders.{clip_l,clip_g,t5xxl}.transformer.`: in
  transformers' own names, which `create_diffusers_clip_model_from_ldm` and
  `create_diffusers_t5_model_from_checkpoint` only strip the prefix from.

What `infer_diffusers_model_type` makes of a file goes by tensor sizes: "sd3" and
"sd35_medium" need a full-width transformer (adaLN bias of 9216 = 6 x 1536 and a pos_embed
of 192^2 or 384^2 rows), "sd35_large" a 38th joint block; a tiny SD3 transformer reads as
"v1" (its fall-through), and the file loads only with an explicit `config`. FLUX is told by
key names alone ("flux-dev" with guidance_in, else "flux-schnell"). Test code only.
"""

from __future__ import annotations

import copy
import inspect
import textwrap
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.ldm_checkpoint import _vae

SD3_TEXT_ENCODERS = ("clip_l", "clip_g", "t5")
COMFY_PREFIX = "model.diffusion_model."


class _Keys:
    """Pops diffusers keys into original ones; `left()` names any the mapping missed."""

    def __init__(self, state: Mapping[str, torch.Tensor]):
        self.src = dict(state)
        self.out: dict[str, torch.Tensor] = {}

    def has(self, key: str) -> bool:
        return key in self.src

    def take(self, key: str) -> torch.Tensor:
        return self.src.pop(key)

    def put(self, new: str, old: str) -> None:
        self.out[new] = self.take(old)

    def linear(self, new: str, old: str, *, swap: bool = False) -> None:
        """`old`.weight/.bias as `new`.weight/.bias; `swap`: halves exchanged (see
        diffusers' swap_scale_shift, its own inverse)."""
        for part in ("weight", "bias"):
            value = self.take(f"{old}.{part}")
            if swap:
                first, second = value.chunk(2, dim=0)
                value = torch.cat([second, first], dim=0)
            self.out[f"{new}.{part}"] = value

    def joined(self, new: str, olds: list[str]) -> None:
        """Linears `olds` stacked along the output rows as one `new` linear."""
        for part in ("weight", "bias"):
            self.out[f"{new}.{part}"] = torch.cat([self.take(f"{o}.{part}") for o in olds])

    def done(self) -> dict[str, torch.Tensor]:
        if self.src:
            raise KeyError(f"no original-layout name for: {sorted(self.src)}")
        return self.out


def sd3_transformer_state(state: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """An SD3Transformer2DModel state dict in SD3's MMDiT names (no prefix): the inverse of
    diffusers' `convert_sd3_transformer_checkpoint_to_diffusers`. Covers SD3.5's qk norms
    (`ln_q`/`ln_k`) and dual-attention `attn2` blocks. Works on meta tensors too."""
    k = _Keys(state)
    k.put("pos_embed", "pos_embed.pos_embed")
    k.linear("x_embedder.proj", "pos_embed.proj")
    k.linear("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    k.linear("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    k.linear("context_embedder", "context_embedder")
    k.linear("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
    k.linear("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")
    n = config["num_layers"]
    for i in range(n):
        d, j = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        x, c = j + "x_block.", j + "context_block."
        last = i == n - 1  # context_pre_only: no context output projection or MLP
        k.joined(x + "attn.qkv", [d + f"attn.to_{q}" for q in "qkv"])
        k.joined(c + "attn.qkv", [d + f"attn.add_{q}_proj" for q in "qkv"])
        if k.has(d + "attn.norm_q.weight"):
            k.put(x + "attn.ln_q.weight", d + "attn.norm_q.weight")
            k.put(x + "attn.ln_k.weight", d + "attn.norm_k.weight")
            k.put(c + "attn.ln_q.weight", d + "attn.norm_added_q.weight")
            k.put(c + "attn.ln_k.weight", d + "attn.norm_added_k.weight")
        k.linear(x + "attn.proj", d + "attn.to_out.0")
        if not last:
            k.linear(c + "attn.proj", d + "attn.to_add_out")
        if k.has(d + "attn2.to_q.weight"):  # SD3.5 medium's dual_attention_layers
            k.joined(x + "attn2.qkv", [d + f"attn2.to_{q}" for q in "qkv"])
            if k.has(d + "attn2.norm_q.weight"):
                k.put(x + "attn2.ln_q.weight", d + "attn2.norm_q.weight")
                k.put(x + "attn2.ln_k.weight", d + "attn2.norm_k.weight")
            k.linear(x + "attn2.proj", d + "attn2.to_out.0")
        k.linear(x + "adaLN_modulation.1", d + "norm1.linear")
        k.linear(c + "adaLN_modulation.1", d + "norm1_context.linear", swap=last)
        k.linear(x + "mlp.fc1", d + "ff.net.0.proj")
        k.linear(x + "mlp.fc2", d + "ff.net.2")
        if not last:
            k.linear(c + "mlp.fc1", d + "ff_context.net.0.proj")
            k.linear(c + "mlp.fc2", d + "ff_context.net.2")
    k.linear("final_layer.linear", "proj_out")
    k.linear("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    return k.done()


def flux_transformer_state(state: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A FluxTransformer2DModel state dict in BFL's names (no prefix): the inverse of
    diffusers' `convert_flux_transformer_checkpoint_to_diffusers`. Works on meta tensors."""
    k = _Keys(state)
    k.linear("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    k.linear("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    k.linear("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    k.linear("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    if k.has("time_text_embed.guidance_embedder.linear_1.weight"):  # guidance_embeds (dev)
        k.linear("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
        k.linear("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    k.linear("txt_in", "context_embedder")
    k.linear("img_in", "x_embedder")
    for i in range(config["num_layers"]):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        k.linear(b + "img_mod.lin", d + "norm1.linear")
        k.linear(b + "txt_mod.lin", d + "norm1_context.linear")
        k.joined(b + "img_attn.qkv", [d + f"attn.to_{q}" for q in "qkv"])
        k.joined(b + "txt_attn.qkv", [d + f"attn.add_{q}_proj" for q in "qkv"])
        k.put(b + "img_attn.norm.query_norm.scale", d + "attn.norm_q.weight")
        k.put(b + "img_attn.norm.key_norm.scale", d + "attn.norm_k.weight")
        k.put(b + "txt_attn.norm.query_norm.scale", d + "attn.norm_added_q.weight")
        k.put(b + "txt_attn.norm.key_norm.scale", d + "attn.norm_added_k.weight")
        k.linear(b + "img_mlp.0", d + "ff.net.0.proj")
        k.linear(b + "img_mlp.2", d + "ff.net.2")
        k.linear(b + "txt_mlp.0", d + "ff_context.net.0.proj")
        k.linear(b + "txt_mlp.2", d + "ff_context.net.2")
        k.linear(b + "img_attn.proj", d + "attn.to_out.0")
        k.linear(b + "txt_attn.proj", d + "attn.to_add_out")
    for i in range(config["num_single_layers"]):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        k.linear(b + "modulation.lin", d + "norm.linear")
        k.joined(b + "linear1", [d + f"attn.to_{q}" for q in "qkv"] + [d + "proj_mlp"])
        k.put(b + "norm.query_norm.scale", d + "attn.norm_q.weight")
        k.put(b + "norm.key_norm.scale", d + "attn.norm_k.weight")
        k.linear(b + "linear2", d + "proj_out")
    k.linear("final_layer.linear", "proj_out")
    k.linear("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    return k.done()


def _hf_clip(state: Mapping[str, torch.Tensor], prefix: str, projection: bool) -> dict:
    """A CLIPTextModel(WithProjection) under `prefix` in transformers' wrapped names
    (`text_model.`..., as transformers >= 5.6 no longer nests CLIPTextModel's)."""
    out = {}
    for key, value in state.items():
        if key == "text_projection.weight":
            if projection:
                out[prefix + key] = value
            continue
        out[prefix + "text_model." + key.removeprefix("text_model.")] = value
    return out


def _save(state: dict, path: Path) -> None:
    # clone: T5's shared.weight and encoder.embed_tokens.weight are one (tied) tensor,
    # which safetensors refuses to write twice
    tensors = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(path))


def write_sd3_single_file(
    pipe,
    path: Path,
    *,
    text_encoders: tuple[str, ...] = SD3_TEXT_ENCODERS,
    vae: bool = True,
) -> None:
    """`pipe` (a diffusers StableDiffusion3Pipeline) as one file in the layout of
    Stability's sd3_medium_incl_clips_t5xxlfp8.safetensors (float32 here):

    - the transformer under `model.diffusion_model.` (`sd3_transformer_state`, the inverse
      of `convert_sd3_transformer_checkpoint_to_diffusers`);
    - with `vae`, the VAE under `first_stage_model.` in LDM names (inverse of
      `convert_ldm_vae_checkpoint`);
    - of `text_encoders`, "clip_l" (text_encoder) under `text_encoders.clip_l.transformer.`,
      "clip_g" (text_encoder_2) under `text_encoders.clip_g.transformer.` and "t5"
      (text_encoder_3) under `text_encoders.t5xxl.transformer.`, each in transformers' names
      (diffusers' create_diffusers_clip_model_from_ldm / create_diffusers_t5_model_from_
      checkpoint strip the prefix). T5's tied `shared.weight` (diffusers' is_t5_in_single_file
      looks for it) and `encoder.embed_tokens.weight` are both written.

    `text_encoders=()` and `vae=False`: the transformer alone (`pipe` may then be a bare
    SD3Transformer2DModel); the components' from_single_file read such files, but
    StableDiffusion3Pipeline.from_single_file needs every component in the file (it will not
    take transformers models' weights from a config folder: SingleFileComponentError).

    CLIP-L is written without `text_projection.weight`: SD3's CLIP-L projects with the
    identity and diffusers loads `torch.eye` in its place whatever the file holds, so a
    CLIP-L whose projection is not the identity raises ValueError (it could not round-trip).
    diffusers tells CLIP-L from CLIP-G by hidden width alone (position_embedding's), trying
    clip_l first: with equal widths (tiny:sd3's, 32 and 32) StableDiffusion3Pipeline.
    from_single_file loads CLIP-L's weights as text_encoder_2.
    """
    unknown = set(text_encoders) - set(SD3_TEXT_ENCODERS)
    if unknown:
        raise ValueError(f"text_encoders: {sorted(unknown)} not among {SD3_TEXT_ENCODERS}")
    transformer = getattr(pipe, "transformer", pipe)
    names = sd3_transformer_state(transformer.state_dict(), transformer.config)
    state = {COMFY_PREFIX + key: value for key, value in names.items()}
    if vae:
        state.update(_vae(pipe.vae.state_dict(), pipe.vae.config))
    if "clip_l" in text_encoders:
        clip_l = pipe.text_encoder.state_dict()
        projection = clip_l.get("text_projection.weight")
        if projection is not None and not torch.equal(
            projection, torch.eye(projection.shape[0], dtype=projection.dtype)
        ):
            raise ValueError(
                "SD3's single file has no CLIP-L text_projection (diffusers loads the "
                "identity): set pipe.text_encoder.text_projection.weight to torch.eye first"
            )
        state.update(_hf_clip(clip_l, "text_encoders.clip_l.transformer.", projection=False))
    if "clip_g" in text_encoders:
        clip_g = pipe.text_encoder_2.state_dict()
        state.update(_hf_clip(clip_g, "text_encoders.clip_g.transformer.", projection=True))
    if "t5" in text_encoders:
        t5 = pipe.text_encoder_3.state_dict()
        state.update({"text_encoders.t5xxl.transformer." + k: v for k, v in t5.items()})
    _save(state, path)


def write_flux_single_file(pipe, path: Path, *, prefix: str = "") -> None:
    """`pipe`'s FLUX transformer (a FluxPipeline's, or a bare FluxTransformer2DModel) as one
    file in the layout of BFL's flux1-dev/flux1-schnell.safetensors: top-level `img_in`,
    `txt_in`, `time_in`, `vector_in`, `guidance_in` (when the config has guidance_embeds),
    `double_blocks.N.`, `single_blocks.N.`, `final_layer.` (`flux_transformer_state`, the
    inverse of `convert_flux_transformer_checkpoint_to_diffusers`). `prefix`
    "model.diffusion_model." gives ComfyUI's saved-checkpoint layout; the converter strips it.

    Note diffusers' converter hard-codes FLUX.1's width (inner_dim 3072, MLP ratio 4) to
    split `linear1`, so a narrower transformer's file loads only through a converter that
    reads the width from the file (tests/unit/test_single_file_mmdit.py patches that in).
    """
    transformer = getattr(pipe, "transformer", pipe)
    state = flux_transformer_state(transformer.state_dict(), transformer.config)
    _save({prefix + key: value for key, value in state.items()}, path)


# ---------------------------------------------------------------- what the tests share


def same_weights(original: torch.nn.Module, loaded: torch.nn.Module) -> None:
    """Assert two modules hold the same keys, dtypes and exact values."""
    left, right = original.state_dict(), loaded.state_dict()
    assert left.keys() == right.keys()
    for key, value in left.items():
        assert right[key].dtype == value.dtype and torch.equal(value, right[key]), key


def _clip(like, **sizes):
    config = like.config.to_dict() | sizes
    return type(like)(type(like.config)(**config)).eval()


def tuned_sd3(root: Path):
    """(a "fine-tune" of a tiny SD3 pipeline, the base's diffusers folder under `root`):
    every weight differs from the folder's, so what loads back from a file can only have
    come from the file.

    Its CLIPs are remade as SD3's are told apart by diffusers: CLIP-L narrower than CLIP-G
    (diffusers picks by hidden width) with an identity projection (diffusers loads
    torch.eye for it); still a consistent pipeline: pooled 24 + 40 = the transformer's 64,
    hidden 24 + 32 zero-padded to T5's 64."""
    from diffusers import StableDiffusion3Pipeline

    from slimdiff.models import load_model

    base = load_model("tiny:sd3").pipe
    torch.manual_seed(0)
    clip_l = _clip(base.text_encoder, hidden_size=24, intermediate_size=48, projection_dim=24)
    with torch.no_grad():
        clip_l.text_projection.weight.copy_(torch.eye(24))
    clip_g = _clip(base.text_encoder_2, projection_dim=40)
    pipe = StableDiffusion3Pipeline(
        **{**base.components, "text_encoder": clip_l, "text_encoder_2": clip_g}
    )
    pipe.save_pretrained(root / "base")
    tuned = copy.deepcopy(pipe)
    with torch.no_grad():
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            for key, weight in getattr(tuned, name).named_parameters():
                if key != "text_projection.weight" or name != "text_encoder":
                    weight.add_(0.5)
    return tuned, root / "base"


def flux_converter_for_any_width():
    """diffusers' FLUX converter, its hard-coded FLUX.1 width (`inner_dim = 3072`, used to
    split single blocks' linear1) read from the file's img_in instead; the rest verbatim.
    Tiny FLUX transformers need it; FLUX.1 and its fine-tunes are 3072 wide."""
    from diffusers.loaders import single_file_utils as sfu

    convert = sfu.convert_flux_transformer_checkpoint_to_diffusers
    source = textwrap.dedent(inspect.getsource(convert))
    if "inner_dim = 3072" not in source:  # a later diffusers may read it itself
        return convert
    source = source.replace("inner_dim = 3072", 'inner_dim = checkpoint["img_in.weight"].shape[0]')
    namespace = dict(vars(sfu))
    exec(compile(source, sfu.__file__, "exec"), namespace)
    return namespace[convert.__name__]


def patch_flux_width(monkeypatch) -> None:
    """Make diffusers' FluxTransformer2DModel.from_single_file take any width."""
    from diffusers.loaders import single_file_model

    mapping = single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]
    monkeypatch.setitem(mapping, "checkpoint_mapping_fn", flux_converter_for_any_width())
