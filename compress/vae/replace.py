"""`vae.replace`: swap the pipeline's VAE for another one of the same latent space.

    - pass: vae.replace
      path: vae/taesdxl        # a diffusers VAE folder, or a pipeline folder (its vae/)

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

A components pass: it runs before calibration, and the passes after it never use the VAE.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import pydantic
from slimdiff.compress.base import Pass, PassConfig, PassReport, Stage, register_pass

from slimdiff.errors import UserError
from slimdiff.models.vae import VAE_CLASSES, vae_scale_factor

__all__ = ["ReplaceVaePass", "read_vae", "vae_folder"]

log = logging.getLogger(__name__)

_STATS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")


class ReplaceVaeConfig(PassConfig):
    path: Annotated[str, pydantic.Field(min_length=1)]

    def input_files(self) -> tuple[str, ...]:
        folder = vae_folder(self.path)
        if folder is None:  # check_input_files names the file it looked for
            return (str(Path(self.path).expanduser() / "config.json"),)
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
        folder, config = read_vae(self.config.path)
        _check_fits(config, pipe.vae.config, folder)

    def apply(self, pipe: Any, calib: Any | None) -> PassReport:
        import diffusers

        from slimdiff.models.loading import refuse_missing

        folder, config = read_vae(self.config.path)
        old = pipe.vae
        _check_fits(config, old.config, folder)
        cls = getattr(diffusers, config["_class_name"])
        try:
            vae = cls.from_pretrained(folder, use_safetensors=True, torch_dtype=old.dtype)
        except (OSError, ValueError, KeyError, RuntimeError) as err:  # diffusers, safetensors
            detail = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err)
            raise UserError(f"vae.replace: could not load {folder} ({detail})") from None
        refuse_missing({"vae": vae}, folder)
        # A lazily loaded pipeline (export) has its VAE on the meta device: the new one,
        # a few hundred MB at most, stays in memory and exports from there.
        device = old.device if old.device.type != "meta" else "cpu"
        pipe.vae = vae.to(device).eval().requires_grad_(False)  # updates model_index too
        return PassReport(
            self.name,
            summary={
                "path": self.config.path,
                "class": config["_class_name"],
                "decoder_params_before": _decoder_params(old),
                "decoder_params": _decoder_params(vae),
                "params_before": _params(old),
                "params": _params(vae),
            },
        )


def vae_folder(path: str) -> Path | None:
    """The VAE folder `path` names: itself (config.json), or a pipeline folder's vae/;
    None when neither exists."""
    root = Path(path).expanduser()
    if (root / "model_index.json").is_file() and (root / "vae" / "config.json").is_file():
        return root / "vae"
    if (root / "config.json").is_file():
        return root
    return None


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def read_vae(path: str) -> tuple[Path, dict]:
    """(folder, config) of the VAE at `path`; UserError naming the fix otherwise."""
    folder = vae_folder(path)
    if folder is None:
        looks_hub = len(path.split("/")) == 2 and not path.startswith((".", "/", "~"))
        hint = (
            f"; a hub id is not fetched: run `hf download {path} --local-dir DIR` and pass DIR"
            if looks_hub and not Path(path).exists()
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


def _params(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def _decoder_params(vae: Any) -> int:
    """What the bundle's VAE decoder holds: post_quant_conv (where there is one) + decoder."""
    post = getattr(vae, "post_quant_conv", None)
    return _params(vae.decoder) + (_params(post) if post is not None else 0)
