"""Write a diffusers SD1.5 or SDXL pipeline as one original-layout ("single-file") checkpoint.

What A1111, ComfyUI and Civitai distribute: the UNet under `model.diffusion_model.`, the
VAE under `first_stage_model.` and CLIP under `cond_stage_model.transformer.`, in the
CompVis names. Tests need one to load through diffusers' `from_single_file`, and no hub
file can be fetched here; diffusers ships only the other direction (LDM -> diffusers), so
this is the inverse of its converter, after diffusers' scripts/
convert_diffusers_to_original_stable_diffusion.py, generalised to the config's block
counts (tiny VAEs have one resnet per block). Test code only: slimdiff never writes these.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

_RESNET = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]


def _unet_prefixes(config) -> list[tuple[str, str]]:
    """(LDM prefix, diffusers prefix) for SD's UNet: 4 levels, attention where the block
    types say, layers_per_block resnets down and one more up."""
    n = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    down_attn = ["CrossAttn" in t for t in config["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    pairs = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
        ("middle_block.1.", "mid_block.attentions.0."),
        ("middle_block.0.", "mid_block.resnets.0."),
        ("middle_block.2.", "mid_block.resnets.1."),
    ]
    for i in range(levels):
        for j in range(n):
            pairs.append(
                (f"input_blocks.{(n + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}.")
            )
            if down_attn[i]:
                pairs.append(
                    (f"input_blocks.{(n + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}.")
                )
        for j in range(n + 1):
            pairs.append((f"output_blocks.{(n + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if up_attn[i]:
                pairs.append(
                    (f"output_blocks.{(n + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}.")
                )
        if i < levels - 1:
            pairs.append(
                (f"input_blocks.{(n + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv.")
            )
            at = 1 if not up_attn[i] else 2
            pairs.append((f"output_blocks.{(n + 1) * i + n}.{at}.", f"up_blocks.{i}.upsamplers.0."))
    return pairs


def _rename(key: str, prefixes: list[tuple[str, str]], inner: list[tuple[str, str]]) -> str:
    for ldm, hf in sorted(prefixes, key=lambda p: -len(p[1])):
        if key.startswith(hf):
            rest = key[len(hf) :]
            if "resnets" in hf:
                for a, b in inner:
                    rest = rest.replace(b, a)
            return ldm + rest
    raise KeyError(key)


def _vae(state: dict, config) -> dict:
    n = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    prefixes = [
        ("encoder.mid.attn_1.", "encoder.mid_block.attentions.0."),
        ("decoder.mid.attn_1.", "decoder.mid_block.attentions.0."),
        ("encoder.norm_out.", "encoder.conv_norm_out."),
        ("decoder.norm_out.", "decoder.conv_norm_out."),
        ("encoder.conv_in.", "encoder.conv_in."),
        ("encoder.conv_out.", "encoder.conv_out."),
        ("decoder.conv_in.", "decoder.conv_in."),
        ("decoder.conv_out.", "decoder.conv_out."),
        ("quant_conv.", "quant_conv."),
        ("post_quant_conv.", "post_quant_conv."),
    ]
    for part in ("encoder", "decoder"):
        for j in range(2):
            prefixes.append((f"{part}.mid.block_{j + 1}.", f"{part}.mid_block.resnets.{j}."))
    for i in range(levels):
        for j in range(n):
            prefixes.append(
                (f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.")
            )
        for j in range(n + 1):
            prefixes.append(
                (f"decoder.up.{levels - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.")
            )
        if i < levels - 1:
            prefixes.append(
                (f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0.")
            )
            prefixes.append(
                (f"decoder.up.{levels - 1 - i}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0.")
            )
    attn = [
        ("norm.", "group_norm."),
        ("q.", "to_q."),
        ("k.", "to_k."),
        ("v.", "to_v."),
        ("proj_out.", "to_out.0."),
    ]
    out = {}
    for key, value in state.items():
        name = _rename(key, prefixes, [("nin_shortcut", "conv_shortcut")])
        if "attn_1." in name:
            head, _, rest = name.partition("attn_1.")
            for a, b in attn:
                if rest.startswith(b):
                    rest = a + rest[len(b) :]
                    break
            name = head + "attn_1." + rest
            if value.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        out["first_stage_model." + name] = value
    return out


def _open_clip(state: dict, prefix: str) -> dict:
    """CLIPTextModelWithProjection (SDXL's text_encoder_2) in OpenCLIP's names: the inverse
    of diffusers' convert_open_clip_checkpoint (q, k, v joined into in_proj)."""
    out = {}
    renames = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), (".fc1.", ".c_fc."),
               (".fc2.", ".c_proj."), (".self_attn.", ".attn.")]  # fmt: skip
    top = {
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    for key, value in state.items():
        if key in top:
            out[prefix + top[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif ".self_attn." in key and any(f"{x}_proj." in key for x in "qkv"):
            if "q_proj." not in key:
                continue  # joined with q below
            kind = key.rsplit(".", 1)[1]  # weight | bias
            joined = torch.cat([state[key.replace("q_proj.", f"{x}_proj.")] for x in "qkv"])
            block = key.split(".self_attn.")[0].replace("text_model.encoder.layers.", "resblocks.")
            out[f"{prefix}transformer.{block}.attn.in_proj_{kind}"] = joined
        else:
            name = key.replace("text_model.encoder.layers.", "resblocks.")
            for a, b in renames:
                name = name.replace(a, b)
            out[prefix + "transformer." + name] = value
    return out


def _unet_and_vae(pipe) -> dict:
    unet_prefixes = _unet_prefixes(pipe.unet.config)
    state = {}
    for key, value in pipe.unet.state_dict().items():
        if key.startswith("add_embedding.linear_"):  # SDXL's: LDM's label_emb.0.{0,2}
            name = key.replace("add_embedding.linear_1.", "label_emb.0.0.")
            name = name.replace("add_embedding.linear_2.", "label_emb.0.2.")
        else:
            name = _rename(key, unet_prefixes, _RESNET)
        state["model.diffusion_model." + name] = value
    state.update(_vae(pipe.vae.state_dict(), pipe.vae.config))
    return state


def _clip(state: dict, prefix: str) -> dict:
    return {prefix + "text_model." + k.removeprefix("text_model."): v for k, v in state.items()}


def _save(state: dict, path: Path) -> None:
    save_file({k: v.detach().contiguous().to(torch.float32) for k, v in state.items()}, str(path))


def write_sd15_single_file(pipe, path: Path) -> None:
    """`pipe` (a diffusers StableDiffusionPipeline) as one LDM-layout safetensors file."""
    state = _unet_and_vae(pipe)
    state.update(_clip(pipe.text_encoder.state_dict(), "cond_stage_model.transformer."))
    _save(state, path)


def write_sdxl_single_file(pipe, path: Path) -> None:
    """`pipe` (a StableDiffusionXLPipeline) as one SGM-layout file, as SDXL fine-tunes ship:
    CLIP-L under conditioner.embedders.0, OpenCLIP bigG under conditioner.embedders.1."""
    state = _unet_and_vae(pipe)
    state.update(_clip(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer."))
    state.update(_open_clip(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    _save(state, path)


def write_sdxl_refiner_single_file(pipe, path: Path) -> None:
    """`pipe` (the SDXL refiner's StableDiffusionXLImg2ImgPipeline) as one SGM-layout file,
    as sd_xl_refiner_1.0.safetensors ships: OpenCLIP bigG alone, under conditioner.embedders.0."""
    state = _unet_and_vae(pipe)
    state.update(_open_clip(pipe.text_encoder_2.state_dict(), "conditioner.embedders.0.model."))
    _save(state, path)
