"""Recipe -> artifact -> bundle(s): the one flow `compress` and `bench` share.

Outputs are cached by content: OUT/artifact is reused when its slimdiff.json records the
same compress hash (a fingerprint of every byte of the model's weights and its configs, the
calibration and the passes, the contents of the files they name, and the device they run
on), OUT/bundle when its manifest records the same export hash (which holds onnxruntime's
version: its optimizer and converters write the graphs), so re-running a bench only redoes
what changed, and a retrained model at the same path is compressed again. A cached output
is checked against the SHA-256 of every file recorded when it was written (the artifact's
in ARTIFACT_HASHES, the bundle's in its manifest): one that does not match, or does not
load, is warned of and made again, never reused or refused.
OUT/work holds what compression caches (calibration trajectories) and checkpoints
(distillation) on the way: a killed `slimdiff compress` resumes from it when run again (see
compress/runner.py). Passes and calibration run on the recipe's `device:` (or `--device`).

Nothing at OUT/artifact or OUT/bundle that slimdiff did not write is ever replaced: that is
checked, with stale partial folders of killed runs removed, before any heavy work starts.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import slimdiff
from slimdiff.device import resolve_device
from slimdiff.errors import UserError
from slimdiff.fsutil import atomic_write_text, check_replaceable, remove_stale_partials
from slimdiff.locks import exclusive
from slimdiff.recipe import Recipe

if TYPE_CHECKING:
    from slimdiff.models import LoadedModel


def use_threads(model: LoadedModel) -> int:
    """torch's threads for this model (slimdiff/threads.py: the CPUs this process may use,
    fewer for tiny models, or --threads); the count, which subprocesses inherit."""
    import os

    from slimdiff.threads import ENV, choose_threads, configure_torch

    n = choose_threads(sum(p.numel() for p in model.denoiser.parameters()))
    configure_torch(n)
    os.environ.setdefault(ENV, str(n))
    return n


__all__ = [
    "ARTIFACT_EVIDENCE",
    "ARTIFACT_HASHES",
    "FlowResult",
    "check_outputs",
    "check_recipe_model",
    "compress_and_export",
    "compress_hash",
    "export_hash",
    "ship_scheduler",
    "shipped_scheduler",
    "use_threads",
]

# What marks a folder as one slimdiff wrote (older versions wrote no marker file).
ARTIFACT_EVIDENCE = ("slimdiff.json",)
BUNDLE_EVIDENCE = ("manifest.json",)
# The SHA-256 of each of the artifact's files, written when compression finished: a cached
# artifact is reused only while they match (as a bundle's against its manifest).
ARTIFACT_HASHES = "sha256.json"

log = logging.getLogger(__name__)


@dataclass
class FlowResult:
    artifact: Path
    bundles: dict[str, Path] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)  # which steps came from the cache


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def compress_hash(recipe: Recipe, model_fingerprint: dict, device: str | None = None) -> str:
    """The artifact's cache key: the model's content fingerprint, not its name; the
    calibration and the passes, with the contents of the files they read (the calibration
    prompts file, lora.fuse's LoRAs, vae.replace's VAE), not their paths, so the same file
    named relative or absolute keys alike; and `device`, the device type the passes run on
    ("cpu", "cuda": another device computes other values)."""
    data = recipe.model_dump(mode="json", by_alias=True)
    key = {
        "model": model_fingerprint,
        "calibration": _calibration_key(data["calibration"]),
        "passes": data["passes"],
        # Another slimdiff may compress differently (a pass's fix): its artifact is not reused.
        "slimdiff": slimdiff.__version__,
    }
    if device is not None:
        key["device"] = device
    inputs = []
    for i, entry in enumerate(recipe.passes):
        files = entry.config.input_files()
        if files:
            key["passes"][i] = _without_paths(key["passes"][i], files)
            inputs.append([(Path(f).name, _file_digest(f, entry.name)) for f in files])
    if inputs:
        key["inputs"] = inputs
    return _hash(key)


def _calibration_key(calibration: dict) -> dict:
    """The calibration as dumped, a prompts file by its contents (read as Calibration
    reads it: the path as given, from the current directory). A file that is not there
    stays named: compress refuses it where a pass calibrates, and nothing reads it else."""
    prompts = calibration["prompts"]
    if isinstance(prompts, str) and prompts != "builtin" and Path(prompts).is_file():
        from slimdiff.runtime.manifest import sha256_file

        return {**calibration, "prompts": {"file_sha256": sha256_file(Path(prompts))}}
    return calibration


def _without_paths(options: Any, files: tuple[str, ...]) -> Any:
    """A pass's dumped options with each string that names one of its input `files`, or a
    folder holding one, replaced by a mark: the files' contents key it (`inputs`)."""
    return _marked(options, [Path(f).expanduser().resolve() for f in files])


def _marked(value: Any, files: list[Path]) -> Any:
    if isinstance(value, dict):
        return {k: _marked(v, files) for k, v in value.items()}
    if isinstance(value, list):
        return [_marked(v, files) for v in value]
    if isinstance(value, str) and "\0" not in value:
        named = Path(value).expanduser().resolve()
        if any(named == f or named in f.parents for f in files):
            return "<input file>"
    return value


def check_input_files(recipe: Recipe) -> None:
    """UserError naming the first file a pass reads (lora.fuse's LoRAs) that is missing,
    or the calibration prompts file when a pass calibrates and it does not read as one
    (slimdiff.prompts.read_prompts): before minutes of loading the model."""
    for entry in recipe.passes:
        for f in entry.config.input_files():
            if not Path(f).expanduser().is_file():
                raise UserError(
                    f"{entry.name}: {f} is not a file (paths are relative to the current directory)"
                )
    prompts = recipe.calibration.prompts
    if isinstance(prompts, str) and prompts != "builtin":
        from slimdiff.compress.base import build_passes
        from slimdiff.prompts import read_prompts

        if any(p.needs_calibration for p in build_passes(recipe)):
            try:
                read_prompts(prompts)
            except UserError as err:
                raise UserError(f"calibration.prompts: {err}") from None


def shipped_scheduler(recipe: Recipe) -> dict[str, str]:
    """The recipe's export.scheduler, export.sigmas and export.timestep_spacing that are
    set, as export_bundle's keywords: the bundle samples otherwise than the model's own
    scheduler."""
    keys = ("scheduler", "sigmas", "timestep_spacing")
    return {k: getattr(recipe.export, k) for k in keys if getattr(recipe.export, k) is not None}


def ship_scheduler(model: LoadedModel, shipped: dict[str, str]) -> None:
    """Give `model`'s torch pipeline the scheduler the bundle ships (export's own
    bundle_scheduler), so torch and the runtime sample alike (bench); nothing when
    `shipped` is empty."""
    if not shipped:
        return
    from slimdiff.export.bundle import bundle_scheduler

    model.pipe.scheduler = bundle_scheduler(
        model, shipped.get("scheduler"), shipped.get("sigmas"), shipped.get("timestep_spacing")
    )


def check_recipe_model(recipe: Recipe, allow_pickle: bool = False) -> str:
    """The recipe's passes checked against its model without its weights (compress
    --dry-run): the model argument, the files passes read, then each pass's preflight on
    the model loaded lazily (configs and shapes). UserError for what `compress` would
    refuse; else a line saying what was checked (a hub id is not: loading it means
    downloading it; nor a single file or pickled weights, which load only whole)."""
    from slimdiff.compress.runner import check_passes, dropped_components
    from slimdiff.models import load_model
    from slimdiff.models.loading import check_pipeline_path

    what = check_pipeline_path(recipe.model, "compress")
    check_input_files(recipe)
    if not recipe.passes:
        return "no passes to check"
    unchecked = f"passes not checked against {recipe.model}"
    if what == "hub":
        return f"{unchecked} (a hub id: download it, or compress to check)"
    if what == "file":
        return f"{unchecked} (a single file loads whole: convert it, or compress to check)"
    try:
        model = load_model(recipe.model, weights="lazy", without=dropped_components(recipe))
    except UserError:
        if not allow_pickle:
            raise
        return f"{unchecked} (pickled weights, if any, load only whole: compress to check)"
    check_passes(model, recipe)
    return f"passes checked against {recipe.model} ({model.arch.family}): ok"


def _file_digest(path: str, pass_name: str) -> str:
    from slimdiff.runtime.manifest import sha256_file

    try:
        return sha256_file(Path(path).expanduser())
    except OSError as err:
        raise UserError(
            f"{pass_name}: cannot read {path} ({err.strerror or type(err).__name__}); "
            "paths are relative to the current directory"
        ) from None


def export_hash(compress: str, recipe: Recipe, target: str) -> str:
    export = recipe.export.model_dump(mode="json")
    # keeps the hashes of recipes written before these keys
    defaults = (
        ("scheduler", None),
        ("sigmas", None),
        ("timestep_spacing", None),
        ("vae_encoder", False),
    )
    for key, default in (*defaults, ("controlnet", None)):
        if export[key] == default:
            del export[key]
    if "controlnet" in export:  # their contents, not their paths (as lora.fuse's files)
        specs = export["controlnet"]
        digests = [_folder_digest(s) for s in ([specs] if isinstance(specs, str) else specs)]
        export["controlnet"] = digests[0] if isinstance(specs, str) else digests
    # Another slimdiff may export differently (a graph's fix, a manifest field), and another
    # onnxruntime too: its transformer optimizer fuses the graphs, its tools convert them.
    # Another torch traces other graphs, and its AOTInductor packages may not load in
    # another torch at all. (The artifact's key leaves the libraries out: it is a diffusers
    # folder any of them loads, and compressing again can take hours.)
    versions = {
        "slimdiff": slimdiff.__version__,
        "onnxruntime": _module_version("onnxruntime"),
        "torch": _module_version("torch"),
    }
    return _hash({"compress": compress, "target": target, **versions, **export})


def _module_version(name: str) -> str | None:
    """The installed version of the module `name` (onnxruntime-gpu's is onnxruntime's)."""
    try:
        module = importlib.import_module(name)
    except ImportError:  # export says what to install; the key is only a key
        return None
    return getattr(module, "__version__", None)


def _folder_digest(spec: str) -> str:
    """A ControlNet folder's config and weights, hashed; a hub id as named."""
    from slimdiff.models.controlnet import controlnet_folder

    folder = controlnet_folder(spec)
    if not isinstance(folder, Path):
        return folder
    if folder.is_file():
        return _file_digest(str(folder), "export.controlnet")
    files = sorted(p for p in folder.iterdir() if p.suffix in (".json", ".safetensors"))
    return _hash({p.name: _file_digest(str(p), "export.controlnet") for p in files})


def bundle_path(out: Path, recipe: Recipe, target: str) -> Path:
    return out / "bundle" if len(recipe.export.targets) == 1 else out / f"bundle-{target}"


def check_outputs(recipe: Recipe, out: str | Path) -> list[Path]:
    """Before any work: refuse outputs slimdiff would not replace (a user's folder at
    OUT/artifact or OUT/bundle), remove stale partials of killed runs; what it removed."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder path")
    check_replaceable(out / "artifact", "artifact", legacy=ARTIFACT_EVIDENCE)
    removed = remove_stale_partials(out / "artifact")
    for target in recipe.export.targets:
        bundle = bundle_path(out, recipe, target)
        check_replaceable(bundle, "bundle", legacy=BUNDLE_EVIDENCE)
        removed += remove_stale_partials(bundle)
    return removed


def _cached(path: Path, meta_file: str, key: str, value: str) -> bool:
    try:
        meta = json.loads((path / meta_file).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    node = meta.get("source", meta) if meta_file == "manifest.json" else meta
    return node.get(key) == value


def _verifies(bundle: Path) -> bool:
    """Whether a cached bundle still verifies as the runtime opens it (every file's SHA-256
    against its manifest): a truncated or changed file is exported again, not reused to
    fail in every later run."""
    from slimdiff.runtime.bundle_files import open_bundle
    from slimdiff.runtime.manifest import BundleError

    try:
        open_bundle(bundle)
    except BundleError as err:
        log.warning("exporting %s again: the cached bundle does not verify (%s)", bundle, err)
        return False
    return True


def _record_artifact_hashes(artifact: Path) -> None:
    """ARTIFACT_HASHES for a just-written artifact. Written after the artifact's atomic
    swap: a run killed in between leaves an artifact without it, compressed again."""
    from slimdiff.export.bundle import hash_files  # the bundle's manifest lists them so too

    files = hash_files(artifact, record=ARTIFACT_HASHES)
    text = json.dumps({"files": files}, indent=2, sort_keys=True)
    atomic_write_text(artifact / ARTIFACT_HASHES, text + "\n")


def _artifact_problem(artifact: Path) -> str | None:
    """What differs between a cached artifact's files and the SHA-256s recorded when it
    was written (a truncated, changed or missing file); None when every one matches."""
    from slimdiff.runtime.manifest import sha256_file

    try:
        files = json.loads((artifact / ARTIFACT_HASHES).read_text(encoding="utf-8"))["files"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError):
        return f"no readable {ARTIFACT_HASHES}"
    if not isinstance(files, dict) or not files:
        return f"{ARTIFACT_HASHES} lists no files"
    for name, digest in sorted(files.items()):
        path = artifact / name
        if ".." in Path(name).parts or not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != digest:
            return f"{name} is not the file written (its SHA-256 differs)"
    return None


def _artifact_verifies(artifact: Path) -> bool:
    """Whether a cached artifact's files are those written (ARTIFACT_HASHES): a truncated
    or changed file is compressed again, not loaded to fail, or reused silently."""
    problem = _artifact_problem(artifact)
    if problem is not None:
        log.warning(
            "compressing %s again: the cached artifact does not verify (%s)", artifact, problem
        )
    return problem is None


def _load_cached(artifact: Path) -> LoadedModel | None:
    """The cached artifact loaded; None, with a warning, when it does not load."""
    from slimdiff.models import load_model

    try:
        return load_model(str(artifact))
    except UserError as err:
        log.warning("compressing %s again: the cached artifact does not load (%s)", artifact, err)
        return None


def compress_and_export(
    recipe: Recipe,
    out: str | Path,
    *,
    device: str | None = None,
    model: LoadedModel | None = None,
    allow_pickle: bool = False,
) -> FlowResult:
    """Compress `recipe.model` with the recipe's passes, then export each target.

    `device` (default: the recipe's) is where passes and calibration run. `model`: the
    recipe's model, already loaded there (bench loads it for its reference); it is consumed.
    `allow_pickle`: load pickled .bin weights too (see slimdiff.models.loading).

    Example:
        >>> compress_and_export(load_recipe("tiny-sdxl-fp32"), "out/tiny")  # doctest: +SKIP
    """
    out = Path(out)
    with exclusive(out):  # one run per folder: a second one stops at once
        return _compress_and_export(recipe, out, device, model, allow_pickle)


def _compress_and_export(recipe, out: Path, device, model, allow_pickle) -> FlowResult:
    from slimdiff.compress.runner import compress_model, dropped_components
    from slimdiff.models import load_model
    from slimdiff.models.fingerprint import fingerprint

    check_outputs(recipe, out)
    check_input_files(recipe)  # before minutes of loading the model
    if recipe.export.controlnet is not None:
        from slimdiff.export import check_controlnet_export, controlnet_specs

        for spec in controlnet_specs(recipe.export.controlnet):
            check_controlnet_export(spec, "auto")  # its folder or file, before the model
    result = FlowResult(artifact=out / "artifact")
    dropped = dropped_components(recipe)  # text.drop: never loaded here

    def load_source() -> LoadedModel:
        where = resolve_device(device or recipe.device)
        return load_model(recipe.model, device=where, allow_pickle=allow_pickle, without=dropped)

    if model is None:
        model = load_source()
        use_threads(model)
    # What the recipe drops does not change its result: the same hash whether the model came
    # with it (bench's, loaded for the reference) or without.
    model_print = fingerprint(model.require_pipeline("compress"))
    if recipe.export.controlnet is not None:  # another family's: before any compressing
        from slimdiff.export import controlnet_specs
        from slimdiff.models.controlnet import precheck_controlnets
        from slimdiff.models.vae import vae_scale_factor

        scale = vae_scale_factor(model.pipe.vae.config)
        precheck_controlnets(controlnet_specs(recipe.export.controlnet), model.denoiser, scale)
    # ... nor the tokenizers of the encoders it drops (the loader skips them with the encoder)
    gone = {*dropped, *(s.tokenizer for s in model.arch.text_encoders if s.name in dropped)}
    prints = {k: v for k, v in model_print.items() if k not in gone}
    # passes run where the model is (--device, the recipe's device:, or bench's)
    chash = compress_hash(recipe, prints, device=model.denoiser.device.type)
    compressed = None
    if _cached(result.artifact, "slimdiff.json", "compress_hash", chash):
        if _artifact_verifies(result.artifact):
            model = None  # the artifact replaces it: its memory goes before the artifact loads
            compressed = _load_cached(result.artifact)
        if compressed is None:  # damaged: removed, then compressed again below
            shutil.rmtree(result.artifact)
    if compressed is not None:
        log.info("reusing %s", result.artifact)
        result.reused.append("compress")
    else:
        compressed = compress_model(
            model if model is not None else load_source(),
            recipe,
            result.artifact,
            extra_meta={"compress_hash": chash},
            work_dir=out / "work",  # calibration caches and checkpoints (compress/runner.py)
        )
        _record_artifact_hashes(result.artifact)
    targets = recipe.export.targets
    for target in targets:
        bundle = bundle_path(out, recipe, target)
        ehash = export_hash(chash, recipe, target)
        if _cached(bundle, "manifest.json", "export_hash", ehash) and _verifies(bundle):
            result.reused.append(f"export:{target}")
        else:
            from slimdiff.export import export_bundle

            export_bundle(
                compressed,
                bundle,
                target=target,
                precision=recipe.export.precision,
                vae_precision=recipe.export.vae_precision,
                optimize=recipe.export.optimize,
                qdq=recipe.export.qdq,
                min_size=recipe.export.min_size,
                max_size=recipe.export.max_size,
                max_images=recipe.export.max_images,
                **shipped_scheduler(recipe),
                vae_encoder=recipe.export.vae_encoder,
                controlnet=recipe.export.controlnet,
                allow_pickle=allow_pickle,
                # The compressed model is loaded for the exports alone: the last one
                # frees its weights as it goes (a full-size pipeline then fits in RAM).
                release_weights=target == targets[-1],
                source={
                    "model": recipe.model,
                    "recipe": recipe.name,
                    "recipe_hash": recipe.content_hash(),
                    "export_hash": ehash,
                },
            )
        result.bundles[target] = bundle
    return result
