"""Bundle layout: pipeline constants, tokenizers, scheduler config, hashes, manifest.

    manifest.json                        written last (see runtime/manifest.py)
    <component>/model.onnx[.data]        one folder per graph
    tokenizer*/tokenizer.json            + tokenizer_config.json, from save_pretrained
    scheduler/scheduler_config.json      from scheduler.save_config

The `pipeline` record holds what the runtime needs to drive the graphs without diffusers:
every value is read from the model's ArchSpec or its component configs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from slimdiff.runtime.manifest import MANIFEST_NAME, sha256_file

from slimdiff.errors import UserError
from slimdiff.models.loading import LoadedModel

__all__ = [
    "SCHEDULER_CONFIG",
    "check_out_dir",
    "component_precisions",
    "hash_files",
    "make_readable",
    "pipeline_constants",
    "write_support_files",
]

SCHEDULER_CONFIG = "scheduler/scheduler_config.json"

# diffusers marks VAEs that overflow in fp16 with `force_upcast` (the SDXL VAE: NaN/black
# images; the fp16-fix VAE sets it False). ORT's optimize_pipeline and demoDiffusion keep
# that VAE fp32, so a fp16 export does too unless vae_precision says otherwise.
_VAE_FP32_FLAG = "force_upcast"


def check_out_dir(out: Path) -> None:
    """Refuse to replace anything at `out` but an earlier bundle (atomic_dir would delete it)."""
    if out.is_file():
        raise UserError(f"--out {out} is a file; pass a folder path for the bundle")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise UserError(
            f"--out {out} exists and is not a slimdiff bundle (no {MANIFEST_NAME}); "
            "pass a new folder, or remove this one first"
        )


def component_precisions(model: LoadedModel, precision: str, vae_precision: str | None) -> dict:
    """Precision of each component: `precision`, except the VAE decoder (see _VAE_FP32_FLAG)."""
    if vae_precision is None:
        vae_precision = "fp32" if model.pipe.vae.config.get(_VAE_FP32_FLAG, False) else precision
    names = model.arch.components
    return {name: (vae_precision if name == "vae_decoder" else precision) for name in names}


def pipeline_constants(model: LoadedModel) -> dict[str, Any]:
    """The manifest's `pipeline` record: what the runtime's denoising loop needs.

    Example:
        >>> pipeline_constants(load_model("tiny:sdxl"))["vae_scale_factor"]  # doctest: +SKIP
        8
    """
    arch, pipe = model.arch, model.pipe
    vae, den = pipe.vae.config, model.denoiser.config
    scale = 2 ** (len(vae.block_out_channels) - 1)
    shift = vae.get("shift_factor")
    return {
        "denoiser": arch.denoiser,
        "denoiser_kind": arch.denoiser_kind,
        "uses_cfg": arch.uses_cfg,
        "default_size": list(model.default_size),
        "default_steps": arch.default_steps,
        "default_guidance": arch.default_guidance,
        "vae_scale_factor": scale,
        "latent_channels": vae.latent_channels,
        "vae_scaling_factor": float(vae.scaling_factor),
        "vae_shift_factor": None if shift is None else float(shift),
        # SDXL's pipeline config carries it; other pipelines have no such option.
        "force_zeros_for_empty_prompt": bool(
            pipe.config.get("force_zeros_for_empty_prompt", False)
        ),
        "has_time_ids": arch.has_time_ids,
        "guidance_embeds": bool(den.get("guidance_embeds", False)),
        "patch_size": den.get("patch_size") or 1,
        "text_encoders": [_text_encoder_record(pipe, spec) for spec in arch.text_encoders],
        "scheduler": SCHEDULER_CONFIG,
    }


def _text_encoder_record(pipe, spec) -> dict[str, Any]:
    tok, cfg = getattr(pipe, spec.tokenizer), getattr(pipe, spec.name).config
    return {
        "name": spec.name,
        "tokenizer": spec.tokenizer,
        "kind": spec.kind,
        "max_length": spec.max_length,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
        "outputs": list(spec.outputs),
        "hidden_size": int(cfg.hidden_size),  # T5Config maps hidden_size to d_model
    }


def write_support_files(model: LoadedModel, root: Path) -> None:
    """Tokenizers (tokenizer.json, read by the `tokenizers` library) and scheduler config."""
    for spec in model.arch.text_encoders:
        getattr(model.pipe, spec.tokenizer).save_pretrained(root / spec.tokenizer)
    model.pipe.scheduler.save_config(root / Path(SCHEDULER_CONFIG).parent)


def make_readable(root: Path) -> None:
    """Give the bundle a plain copy's permissions (0755 folders, 0644 files under umask 022).

    The temp folder (mkdtemp), onnx's external data and atomically written files are all
    created private (0700/0600); a bundle is meant to be deployed and read by other users.
    """
    mask = os.umask(0)
    os.umask(mask)
    for p in (root, *root.rglob("*")):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def hash_files(root: Path) -> dict[str, str]:
    """SHA-256 of every file under `root` but the manifest, keyed by POSIX relative path."""
    files = (p for p in sorted(root.rglob("*")) if p.is_file())
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in files
        if p.relative_to(root).as_posix() != MANIFEST_NAME
    }
