"""`vae.replace`: swap the pipeline's VAE for another one of the same latent space.

    - pass: vae.replace
      path: vae/taesdxl        # a diffusers VAE folder, or a pipeline folder (its vae/), or
                               # a single .safetensors VAE file in the original layout

Two swaps are common in deployment, and both change only the decode at the end of a run:

- **A tiny decoder** (diffusers' AutoencoderTiny: TAESD for SD1.5, TAESDXL, TAESD3,
  TAEF1; madebyollin/taesd*): 1.22M decoder parameters against the SDXL VAE's 49.49M
  (diffusers' default AutoencoderTiny config, TAESD's), trading detail for a much cheaper
  decode (18x less arithmetic and 18x faster on ORT-CPU at 512x512: docs/BENCHMARKS.md),
  which matters most in few-step runs where the VAE is a large part of the time.
  `slimdiff bench` measures what it costs in fidelity: its reference keeps the original
  VAE.
- **An fp16-safe VAE** (madebyollin/sdxl-vae-fp16-fix): SDXL's own VAE overflows in fp16
  and is marked `force_upcast`, so fp16 bundles keep it in fp32; the fixed one has the
  flag off and exports in fp16 (half the bytes, faster on GPUs).

The replacement must decode the denoiser's latents: the same latent channels and pixels
per latent pixel are checked before anything slow runs. Its own config then says how the
runtime unscales the latents (scaling_factor, shift_factor), as diffusers' pipelines read
`pipe.vae.config`; TAESD-family decoders take the scaled latents as they are (factor 1).
An AutoencoderKL whose scaling differs from the model's VAE is probably for another
family: a warning says so. Weights load from safetensors only; a hub id is not fetched
(download it first, `hf download ID --local-dir DIR`), so the folder's files key the
compress cache (PassConfig.input_files).

A single VAE file in the original (LDM) layout, as A1111 and ComfyUI users keep them
(vae-ft-mse-840000-ema-pruned.safetensors for SD1.5, sdxl_vae.safetensors, the fp16-fix's
sdxl.vae.safetensors), is read by diffusers' from_single_file into the model's own
AutoencoderKL architecture and config (its scaling factor and force_upcast flag: set
`export.vae_precision: fp16` for an fp16-safe file).

A components pass: it runs before calibration, and the passes after it never use the VAE.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import pydantic
from slimdiff.compress.base import Pass, PassConfig, PassReport, Stage, register_pass

from slimdiff.errors import UserError, first_line
from slimdiff.lowbit import parameter_count
from slimdiff.models.hub import local_path, looks_like_hub_id
from slimdiff.models.vae import VAE_CLASSES, decoder_params, vae_scale_factor

__all__ = ["ReplaceVaePass", "read_vae", "vae_folder"]

log = logging.getLogger(__name__)

_STATS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")


class ReplaceVaeConfig(PassConfig):
    path: Annotated[str, pydantic.Field(min_length=1)]

    def input_files(self) -> tuple[str, ...]:
        if local_path(self.path).is_file():
            return (str(local_path(self.path)),)
        folder = vae_folder(self.path)
        if folder is None:  # check_input_files names the file it looked for
            return (str(local_path(self.path) / "config.json"),)
        return (*(str(p) for p in _weight_files(folder)), str(folder / "config.json"))


@register_pass
class ReplaceVaePass(Pass):
    """Replace the pipeline's VAE with the one in `path`.

    Example:
        >>> config = ReplaceVaeConfig(path="vae/taesdxl")
        >>> report = ReplaceVaePass(config).apply(pipe, None)  # doctest: +SKIP
        >>> report.summary["class"], report.summary["decoder_params"]  # doctest: +SKIP
        ('AutoencoderTiny', 1_222_531)
    """

    name = "vae.replace"
    stage = Stage.COMPONENTS
    Config = ReplaceVaeConfig

    def preflight(self, pipe: Any, calib: Any | None) -> None:
        where, config = read_vae(self.config.path)
        if config is None:
            _check_single_file(where, pipe.vae)
        else:
            _check_fits(config, pipe.vae.config, where)

    def apply(self, pipe: Any, calib: Any | None) -> PassReport:
        import diffusers

        from slimdiff.models.index import refuse_missing
        from slimdiff.models.weights import dtype_keyword

        # preflight ran already (the runner, bench, export --vae): no second check, whose
        # scaling warning would be said twice
        where, config = read_vae(self.config.path)
        old = pipe.vae
        try:
            if config is None:
                vae = _from_single_file(where, old)
            else:
                cls = getattr(diffusers, config["_class_name"])
                vae = cls.from_pretrained(where, use_safetensors=True, **dtype_keyword(old.dtype))
        except (OSError, ValueError, KeyError, RuntimeError) as err:  # diffusers, safetensors
            detail = first_line(err)
            raise UserError(
                f"vae.replace: could not load {where} ({detail}); is it a VAE for this "
                "model family?"
            ) from None
        refuse_missing({"vae": vae}, where)
        # A lazily loaded pipeline (export) has its VAE on the meta device: the new one,
        # a few hundred MB at most, stays in memory and exports from there.
        device = old.device if old.device.type != "meta" else "cpu"
        pipe.vae = vae.to(device).eval().requires_grad_(False)  # updates model_index too
        return PassReport(
            self.name,
            summary={
                "path": self.config.path,
                "class": type(vae).__name__,
                "format": "single file" if config is None else "diffusers folder",
                "decoder_params_before": decoder_params(old),
                "decoder_params": decoder_params(vae),
                "params_before": parameter_count(old),
                "params": parameter_count(vae),
            },
        )


def vae_folder(path: str) -> Path | None:
    """The VAE folder `path` names: itself (config.json), or a pipeline folder's vae/;
    None when neither exists."""
    root = local_path(path)
    if (root / "model_index.json").is_file() and (root / "vae" / "config.json").is_file():
        return root / "vae"
    if (root / "config.json").is_file():
        return root
    return None


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def read_vae(path: str) -> tuple[Path, dict | None]:
    """(folder, config) of the VAE at `path`, or (file, None) for a single .safetensors
    file; UserError naming the fix otherwise."""
    file = local_path(path)
    if file.is_file():
        if file.suffix.lower() in (".pt", ".pth", ".ckpt", ".bin"):
            raise UserError(
                f"vae.replace: {path} is a pickled file; pickled VAE files (.pt, .ckpt, .bin) "
                "are not loaded (unpickling can run code): convert it to safetensors"
            )
        if file.suffix.lower() != ".safetensors":
            raise UserError(
                f"vae.replace: {path} is not a VAE: pass a .safetensors file or a diffusers "
                "VAE folder"
            )
        return file, None
    folder = vae_folder(path)
    if folder is None:
        hint = (
            f"; a hub id is not fetched: run `hf download {path} --local-dir DIR` and pass DIR"
            if looks_like_hub_id(path) and not Path(path).exists()
            else " (paths are relative to the current directory)"
        )
        raise UserError(
            f"vae.replace: {path} is not a diffusers VAE folder (config.json and safetensors "
            f"weights) or a pipeline folder with vae/{hint}"
        )
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"vae.replace: {folder}/config.json is not readable JSON ({err})") from None
    if not isinstance(config, dict) or config.get("_class_name") not in VAE_CLASSES:
        found = config.get("_class_name") if isinstance(config, dict) else None
        raise UserError(
            f"vae.replace: {folder} holds a {found or 'component without _class_name'}, not a "
            f"VAE slimdiff exports ({' or '.join(VAE_CLASSES)})"
        )
    if not _weight_files(folder):
        pickled = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".ckpt")]
        what = f"only pickled weights ({', '.join(sorted(pickled))})" if pickled else "no weights"
        raise UserError(
            f"vae.replace: {folder} has {what}; slimdiff loads safetensors only (unpickling "
            "can run code): save it with save_pretrained(folder, safe_serialization=True)"
        )
    return folder, config


def _check_single_file(file: Path, old: Any) -> None:
    """A single file loads into the model's own AutoencoderKL: refuse another VAE class,
    an unreadable file, or one without a VAE decoder's keys, before anything slow."""
    from safetensors import safe_open

    if type(old).__name__ != "AutoencoderKL":
        raise UserError(
            f"vae.replace: a single VAE file loads into the model's own AutoencoderKL "
            f"architecture, and this model's VAE is {type(old).__name__}; pass a diffusers "
            "VAE folder"
        )
    try:
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
    except Exception as err:  # safetensors' own errors for a damaged or foreign file
        raise UserError(f"vae.replace: {file} is not a readable safetensors file ({err})") from None
    if not any(k.removeprefix("first_stage_model.").startswith("decoder.conv_in") for k in keys):
        raise UserError(
            f"vae.replace: {file} holds no VAE decoder (no decoder.conv_in weights): a "
            "checkpoint or LoRA rather than a VAE? (a full checkpoint converts with "
            "`slimdiff convert`)"
        )


def _from_single_file(file: Path, old: Any) -> Any:
    """diffusers' from_single_file with the model's own VAE config (saved to a temporary
    folder: diffusers reads a config from a folder or the hub, never from memory)."""
    import tempfile

    from diffusers import AutoencoderKL

    from slimdiff.models.weights import dtype_keyword

    with tempfile.TemporaryDirectory(prefix="slimdiff-vae-") as config_dir:
        old.save_config(config_dir)
        return AutoencoderKL.from_single_file(
            str(file), config=config_dir, **dtype_keyword(old.dtype), local_files_only=True
        )


def _check_fits(new: dict, old: Any, folder: Path) -> None:
    """UserError unless the new VAE decodes the old one's latents (channels, scale); a
    warning when an AutoencoderKL scales them differently (another family's VAE)."""
    want = (int(old["latent_channels"]), vae_scale_factor(old))
    try:
        got = (int(new["latent_channels"]), vae_scale_factor(new))
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"vae.replace: {folder}/config.json lacks {err}") from None
    if got != want:
        raise UserError(
            f"vae.replace: {folder} decodes {got[0]}-channel latents at {got[1]}x, but this "
            f"model's are {want[0]}-channel at {want[1]}x: use a VAE made for this model family"
        )
    if new["_class_name"] == "AutoencoderKL":
        differ = [k for k in _STATS if _stat(new, k) != _stat(old, k)]
        if differ:
            log.warning(
                "vae.replace: %s scales latents otherwise than the model's VAE (%s): a VAE "
                "trained for another model's latents decodes them wrongly",
                folder,
                ", ".join(f"{k} {_stat(new, k)} vs {_stat(old, k)}" for k in differ),
            )


def _stat(config: Any, key: str) -> Any:
    value = config.get(key) if hasattr(config, "get") else None
    if isinstance(value, (list, tuple)):
        return [round(float(v), 6) for v in value]
    return None if value is None else round(float(value), 6)
