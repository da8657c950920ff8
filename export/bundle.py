"""Bundle layout: pipeline constants, tokenizers, scheduler config, hashes, manifest.

    manifest.json                        written last (see runtime/manifest.py)
    <component>/model.onnx[.data]        one folder per graph
    tokenizer*/tokenizer.json            + tokenizer_config.json, from save_pretrained
    scheduler/scheduler_config.json      from scheduler.save_config (bundle_scheduler's)

The `pipeline` record holds what the runtime needs to drive the graphs without diffusers:
every value is read from the model's ArchSpec or its component configs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slimdiff.runtime.manifest import (
    MANIFEST_NAME,
    VAE_DECODER,
    VAE_ENCODER,
    PipelineSpec,
    TextEncoderRecord,
    sha256_file,
)
from slimdiff.runtime.scheduler_choice import scheduler_problem, warn_replaced_sigmas
from slimdiff.runtime.schedulers import (
    scheduler_names,
    scheduler_process,
    switch_scheduler,
    switch_warning,
    with_sigmas,
    with_spacing,
)

from slimdiff.errors import UserError
from slimdiff.fsutil import check_replaceable
from slimdiff.models.loading import LoadedModel
from slimdiff.models.saving import save_tokenizer
from slimdiff.models.text_encoders import zero_text
from slimdiff.models.vae import vae_scale_factor

__all__ = [
    "SCHEDULER_CONFIG",
    "bundle_scheduler",
    "check_out_dir",
    "component_precisions",
    "hash_files",
    "make_readable",
    "pipeline_constants",
    "write_support_files",
]

log = logging.getLogger(__name__)

SCHEDULER_CONFIG = "scheduler/scheduler_config.json"

# diffusers marks VAEs that overflow in fp16 with `force_upcast` (the SDXL VAE: NaN/black
# images; the fp16-fix VAE sets it False). ORT's optimize_pipeline and demoDiffusion keep
# that VAE fp32, so a fp16 export does too unless vae_precision says otherwise. Only a
# config that says so: AutoencoderKL defaults the flag to True, and a config without it
# (SD1.5's VAE, which its pipeline runs in fp16) reads True after loading; diffusers lists
# such keys in the loaded config's `_use_default_values`.
_VAE_FP32_FLAG = "force_upcast"


# What marks a bundle from a slimdiff that wrote no `.slimdiff` marker: a manifest.json
# that says slimdiff_version (fsutil._slimdiff_wrote)
BUNDLE_EVIDENCE = (MANIFEST_NAME,)


def check_out_dir(out: Path) -> None:
    """Refuse to replace anything at `out` but an earlier bundle (atomic_dir would delete
    it): an empty folder, one marked as a bundle, or an older bundle (BUNDLE_EVIDENCE); and
    a mount point, which cannot be swapped. Before any model loads."""
    if out.is_file():
        raise UserError(f"--out {out} is a file; pass a folder path for the bundle")
    check_replaceable(out, "bundle", legacy=BUNDLE_EVIDENCE)
    here, target = Path.cwd().resolve(), out.resolve()
    if here == target or target in here.parents:
        # the swap would leave this shell in a deleted folder
        raise UserError(
            f"--out {out} is the current folder (or holds it); pass a folder beside it, e.g. "
            "--out bundle"
        )


def component_precisions(model: LoadedModel, precision: str, vae_precision: str | None) -> dict:
    """Precision of each component: `precision`, except the VAE decoder and encoder (see
    _VAE_FP32_FLAG)."""
    if vae_precision is None:
        config = model.pipe.vae.config
        said = _VAE_FP32_FLAG not in config.get("_use_default_values", ())
        vae_precision = "fp32" if said and config.get(_VAE_FP32_FLAG, False) else precision
    names = (*model.components, VAE_ENCODER)
    vae = {VAE_DECODER, VAE_ENCODER}
    return {name: (vae_precision if name in vae else precision) for name in names}


def pipeline_constants(model: LoadedModel, controlnets: Sequence[Any] = ()) -> PipelineSpec:
    """The manifest's `pipeline` record: what the runtime's denoising loop needs
    (`controlnets`: the ControlNets the denoiser graph holds, each taking a control
    image; the first one's global_pool_conditions makes diffusers run guess mode always).

    `kind` is the ArchSpec's KindSpec filled in for this denoiser (slimdiff/models/kinds.py):
    the runtime drives the denoiser from it alone, never from the family's name.

    Example:
        >>> pipeline_constants(load_model("tiny:sdxl")).vae_scale_factor  # doctest: +SKIP
        8
    """
    arch, pipe = model.arch, model.pipe
    vae = pipe.vae.config
    scale = vae_scale_factor(vae)
    shift = vae.get("shift_factor") if arch.vae_shift else None  # as the pipeline decodes
    kind = arch.kind_for(model.denoiser.config)
    record = {
        "denoiser": arch.denoiser,
        "kind": kind,
        "uses_cfg": arch.uses_cfg_for(model.denoiser.config),
        "default_size": list(model.default_size),
        "default_steps": arch.default_steps,
        "default_guidance": arch.default_guidance,
        "vae_scale_factor": scale,
        "size_multiple": kind.size_multiple(scale),
        "latent_channels": vae.latent_channels,
        "vae_scaling_factor": float(vae.scaling_factor),
        "vae_shift_factor": None if shift is None else float(shift),
        **_latent_stats(arch, vae),
        # SDXL's pipeline config carries it; other pipelines have no such option.
        "force_zeros_for_empty_prompt": bool(
            pipe.config.get("force_zeros_for_empty_prompt", False)
        ),
        "text_encoders": [_text_encoder_record(pipe, spec) for spec in model.text_encoders],
        "scheduler": SCHEDULER_CONFIG,
        "zero_text": zero_text(arch, pipe) or None,  # SD3 without T5
        "controlnet": _controlnet_record(controlnets),
        "default_strength": _strength_record(arch, controlnets),
        "max_side": model.max_side,
    }
    # The schema the runtime reads it with: a value it would refuse fails here, at export.
    return PipelineSpec.model_validate(record)


def _warn_other_process(model: LoadedModel, config: dict[str, Any]) -> None:
    """Warn when the folder's own scheduler samples another process than its family's
    models are trained for (an SD3 folder with DDIM): diffusers samples it without a word,
    and the images are noise unless this model was trained so."""
    process = scheduler_process(config["_class_name"], config)
    flow = model.arch.flow_matching
    if (process == "flow matching") == flow:
        return
    log.warning(
        "%s: its scheduler %s samples %s, and %s models are trained as %s; unless this "
        "one was, its images will be noise: put its base model's scheduler_config.json in "
        "the folder's scheduler/",
        model.source,
        config["_class_name"],
        process,
        model.arch.family,
        "rectified flows" if flow else "VP or EDM diffusions",
    )


def _strength_record(arch: Any, controlnets: Sequence[Any]) -> dict[str, float]:
    image, inpaint = (controlnets and arch.controlnet_strength) or arch.default_strength
    return {"image": image, "inpaint": inpaint}


def _controlnet_record(controlnets: Sequence[Any]) -> dict | None:
    if not controlnets:
        return None
    record = {"count": len(controlnets), "conditioning_channels": 3}
    # diffusers' ControlNet pipelines force guess mode where the (first) ControlNet pools its
    # conditions (the shuffle ControlNet): written only then
    if controlnets[0].config.get("global_pool_conditions"):
        record["global_pool_conditions"] = True
    return record


def _latent_stats(arch, vae) -> dict:
    """The VAE's per-channel latent mean and std where the family's pipeline decodes with
    them (SDXL's, for Playground v2.5); absent otherwise, as in manifests before them."""
    mean, std = vae.get("latents_mean"), vae.get("latents_std")
    if not arch.vae_latent_stats or mean is None or std is None:
        return {}
    return {
        "vae_latents_mean": [float(v) for v in mean],
        "vae_latents_std": [float(v) for v in std],
    }


def _text_encoder_record(pipe, spec) -> TextEncoderRecord:
    tok, cfg = getattr(pipe, spec.tokenizer), getattr(pipe, spec.name).config
    positions = getattr(cfg, "max_position_embeddings", None)  # T5: relative, none
    return TextEncoderRecord(
        name=spec.name,
        tokenizer=spec.tokenizer,
        kind=spec.kind,
        max_length=spec.max_length,
        max_positions=None if positions is None else int(positions),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        outputs=tuple(spec.outputs),
        segment=spec.segment,
        hidden_size=int(cfg.hidden_size),  # T5Config maps hidden_size to d_model
        vocab_size=int(cfg.vocab_size),
    )


def bundle_scheduler(
    model: LoadedModel,
    name: str | None = None,
    sigmas: str | None = None,
    spacing: str | None = None,
):
    """The diffusers scheduler the bundle ships: the model's, or scheduler `name` (a short
    name or class name, runtime.schedulers.switch_scheduler) built from the model's config
    as diffusers' `from_config` builds it; with `sigmas` ("karras", "exponential", "beta")
    on that sigma schedule (runtime.schedulers.with_sigmas), with `spacing` its
    timestep_spacing (runtime.schedulers.with_spacing). The model is left as it was.

    Raises UserError, before any export work, for an unknown name or a scheduler the
    runtime cannot sample with (a hub SD1.5 folder's PNDM is ported; SA-Solver and IPNDM
    are not), naming the --scheduler choices that work.
    """
    import diffusers  # the exporter has torch and diffusers; the runtime does not

    scheduler = model.pipe.scheduler
    current = {**scheduler.config, "_class_name": type(scheduler).__name__}
    _warn_other_process(model, current)
    spec = pipeline_constants(model)
    chosen = current
    if name is not None:
        try:  # the name, and the same sampling process
            chosen = switch_scheduler(current, name)
        except ValueError as err:
            raise UserError(f"--scheduler: {err}") from None
        warning = switch_warning(current, chosen)
        if warning:
            log.warning("--scheduler %s: %s", name, warning)
        warn_replaced_sigmas(chosen, name, sigmas)
    for option, change, value in (
        ("--sigmas", with_sigmas, sigmas),
        ("--timestep-spacing", with_spacing, spacing),
    ):
        if value is not None:
            try:
                chosen = change(chosen, value)
            except ValueError as err:
                raise UserError(f"{option}: {err}") from None
    if chosen is not current:  # built once, from the final config
        class_name = chosen["_class_name"]
        plain = {k: v for k, v in chosen.items() if not k.startswith("_")}
        scheduler = getattr(diffusers, class_name).from_config(plain)
        current = {**scheduler.config, "_class_name": class_name}
    problem = scheduler_problem(spec, current)
    if problem is None:
        return scheduler
    working = [n for n in scheduler_names() if _samples(spec, current, n)]
    raise UserError(
        f"{model.source}: slimdiff's runtime cannot sample with its "
        f"{current['_class_name']} ({problem}); export with --scheduler NAME (recipe: "
        f"export.scheduler), one of: {', '.join(working) or 'none for this model'}"
    )


def _samples(spec: PipelineSpec, config: dict, name: str) -> bool:
    try:
        return scheduler_problem(spec, switch_scheduler(config, name)) is None
    except ValueError:
        return False


def write_support_files(model: LoadedModel, root: Path, scheduler=None) -> None:
    """Tokenizers (tokenizer.json, read by the `tokenizers` library) and the scheduler
    config (`scheduler`, from bundle_scheduler; default the model's)."""
    for spec in model.text_encoders:
        # as the tokenizer was before any call (export's checks ran it): the same bytes
        # whether or not it ran, hence the same bundle SHA-256 (models/saving.py)
        save_tokenizer(getattr(model.pipe, spec.tokenizer), root / spec.tokenizer)
    scheduler = scheduler if scheduler is not None else model.pipe.scheduler
    scheduler.save_config(root / Path(SCHEDULER_CONFIG).parent)
    # save_config drops `_use_default_values` (the keys the model's own file left out),
    # which from_config needs to switch class as diffusers does: `run --scheduler` reads it
    defaults = scheduler.config.get("_use_default_values")
    if defaults:
        path = root / SCHEDULER_CONFIG
        written = json.loads(path.read_text())
        written["_use_default_values"] = sorted(defaults)
        path.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")


def make_readable(root: Path) -> None:
    """Give the bundle a plain copy's permissions (0755 folders and scripts, 0644 files under
    umask 022).

    The temp folder (mkdtemp), onnx's external data and atomically written files are all
    created private (0700/0600); a bundle is meant to be deployed and read by other users.
    """
    mask = os.umask(0)
    os.umask(mask)
    for p in (root, *root.rglob("*")):
        executable = p.is_dir() or p.stat().st_mode & 0o111  # build.sh stays runnable
        p.chmod((0o777 if executable else 0o666) & ~mask)


def hash_files(root: Path, record: str = MANIFEST_NAME) -> dict[str, str]:
    """SHA-256 of every file under `root` but `record` (the file that lists them: a bundle's
    manifest, an artifact's sha256.json), keyed by POSIX relative path."""
    files = (p for p in sorted(root.rglob("*")) if p.is_file())
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in files
        if p.relative_to(root).as_posix() != record
    }
