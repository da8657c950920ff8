"""slimdiff.export: lower a diffusers pipeline to a bundle the torch-free runtime runs.

    >>> from slimdiff.models import load_model
    >>> from slimdiff.export import export_bundle
    >>> manifest = export_bundle(load_model("tiny:sdxl"), "out/tiny-sdxl")  # doctest: +SKIP
    >>> manifest.components["unet"].parity["rel_err"] < 1e-4  # doctest: +SKIP
    True
    >>> manifest.sha256  # the bundle's identity: SHA-256 of manifest.json  # doctest: +SKIP
    '3f1c...'

Per component: trace to ONNX (export/onnx.py), ORT fusions where they pay off
(export/optimize.py), fp16 conversion, save (external data past the threshold), then a
parity run against torch (export/parity.py). The bundle folder is built under a temp name
and renamed into place only when the manifest is written (export/bundle.py).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pydantic
from slimdiff.export.bundle import (
    BUNDLE_EVIDENCE,
    bundle_scheduler,
    check_out_dir,
    component_precisions,
    hash_files,
    make_readable,
    pipeline_constants,
    write_support_files,
)
from slimdiff.export.components import (
    Component,
    export_mode,
    free_weights,
    plan_components,
)
from slimdiff.export.controlnet import check_controlnet_export, controlnet_specs, load_checked
from slimdiff.export.fp16 import convert_fp16
from slimdiff.export.lowbit import (
    compact_names,
    int4_digests,
    integer_kernels,
    is_quantized,
    pack_int4_weights,
)

# Note: importing the submodule slimdiff.export.onnx binds the name `onnx` in this package's
# namespace, so the onnx library itself is only used inside the submodules.
from slimdiff.export.onnx import (
    OPSET,
    PROTOBUF_LIMIT,
    export_component,
    graph_io,
    load_graph,
    save_model,
)
from slimdiff.export.optimize import FUSE_MEMORY, fuse, fusion_memory
from slimdiff.export.parity import ExportError, check_parity, raise_if_failed, torch_reference
from slimdiff.export.profiles import shape_profile, size_range
from slimdiff.export.streamed import export_streamed, fits_in_memory
from slimdiff.runtime.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    BundleError,
    ComponentEntry,
    Manifest,
    parse_manifest,
)

import slimdiff
from slimdiff.errors import UserError
from slimdiff.fsutil import atomic_dir, atomic_write_bytes
from slimdiff.locks import exclusive_beside
from slimdiff.lowbit import (
    QDQ_FORMS,
    has_quantized_layers,
    merged_scales,
    qdq_form,
)
from slimdiff.memory import available_bytes, release_memory_past, rss_mib
from slimdiff.models.lazy import is_lazy, materialize, param_bytes
from slimdiff.models.loading import LoadedModel

__all__ = [
    "PRECISIONS",
    "TARGETS",
    "WEIGHTS",
    "ExportError",
    "check_controlnet_export",
    "controlnet_specs",
    "export_bundle",
    "export_onnx_component",
]

log = logging.getLogger(__name__)

# onnx: ONNX graphs (ORT backends); tensorrt: the same graphs in TensorRT's Q/DQ form with
# a build.sh of trtexec lines and the profiles engines are built with (on the device, or
# by the trt backend on first load: export/tensorrt.py); aoti: AOTInductor packages
# (export/aoti.py) for what torch.export takes, ONNX for the rest.
TARGETS = ("onnx", "tensorrt", "aoti")
WEIGHTS = ("auto", "memory", "stream")
PRECISIONS = ("fp32", "fp16")
_WORK = ".work"  # raw exports, inside the temp bundle folder (same filesystem, gone on rename)


def export_bundle(
    model: LoadedModel,
    out: str | Path,
    *,
    target: str = "onnx",
    precision: str = "fp32",
    optimize: bool = True,
    vae_precision: str | None = None,
    qdq: str | None = None,
    min_size: tuple[int, int] | None = None,
    max_size: tuple[int, int] | None = None,
    max_images: int = 1,
    check: bool = True,
    release_weights: bool = False,
    weights: str = "auto",
    external_data_threshold: int = PROTOBUF_LIMIT,
    source: dict | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    scheduler: str | None = None,
    sigmas: str | None = None,
    timestep_spacing: str | None = None,
    vae_encoder: bool = False,
    controlnet: str | Sequence[str] | None = None,
    allow_pickle: bool = False,
) -> Manifest:
    """Export `model`'s pipeline to a bundle folder at `out` and return its manifest.

    Args:
        model: from `slimdiff.models.load_model`; must hold a whole pipeline.
        out: bundle folder; replaced if it holds an earlier bundle, refused otherwise.
        target: "onnx", "tensorrt" or "aoti" (see TARGETS).
        precision: "fp32" or "fp16" (weights and compute; graph IO stays float32).
        optimize: run ORT fusions where they help the CPU EP (see export/optimize.py).
        vae_precision: VAE decoder precision; default fp32 for VAEs whose config sets
            force_upcast (SDXL's), else `precision`.
        qdq: how quantized layers are written (slimdiff/lowbit.py QDQ_FORMS): "ort",
            asymmetric uint8 activations for onnxruntime's integer kernels (int4 weights
            packed); "tensorrt", ModelOpt's symmetric int8 form with Q/DQ on inputs only,
            which TensorRT requires (unverified here: TensorRT does not install on these
            machines; the graph is checked by onnxruntime). Float models: no difference.
            Default: "tensorrt" for target tensorrt, else "ort".
        min_size, max_size, max_images: the image sizes (height, width) and images per call
            the bundle is built for, recorded as each component's shape profile
            (export/profiles.py; TensorRT's optimization profiles). Default: half to 1.5x
            the model's default size, one image.
        check: compare every graph against torch on fresh inputs; raise ExportError when
            one is off by more than its tolerance.
        release_weights: free each component's torch weights as soon as its graph is
            traced (torch's outputs for the parity check are computed before), leaving
            `model` unusable: the peak memory is then about the largest component twice
            (its graph, then the onnxruntime session that checks it) instead of the whole
            pipeline plus a graph plus a session. What `slimdiff export` does; fp32 SDXL
            needs it on a 24 GiB machine.
        weights: how components are exported (export/streamed.py): "memory", from their
            weights in memory (lazy ones are loaded first, one component at a time);
            "stream", traced without weights, which are then written one tensor at a time
            (no ORT fusions; parity checked where it fits in memory); "auto", streamed for
            a lazy component (`load_model(..., weights="lazy")`) whose fp32 weights, twice
            over, exceed the memory available, else "memory". Quantized components and
            AOTInductor packages always load their weights.
        external_data_threshold: weights beyond this many bytes go to model.onnx.data
            (protobuf cannot hold more than 2 GiB).
        source: provenance recorded in the manifest (default {"model": model.source}).
        progress: called as progress(component, index, total) before each component.
        scheduler: ship another scheduler than the model's, built from its config as
            diffusers' from_config does: a short name ("euler-a", "dpm++2m-karras") or a
            class name (slimdiff.runtime.schedulers.switch_scheduler). Either way the
            bundle's scheduler is checked against the runtime before anything is exported.
        sigmas: ship the scheduler on this sigma schedule ("karras", "exponential",
            "beta"; runtime.schedulers.with_sigmas), after any `scheduler` switch.
        timestep_spacing: ship it with diffusers' `timestep_spacing` set ("leading",
            "trailing", "linspace"; runtime.schedulers.with_spacing): "trailing" for
            SDXL-Lightning, Hyper-SD and other few-step distillations.
        vae_encoder: also export the VAE encoder (component "vae_encoder", at the VAE
            decoder's precision), which image-to-image runs need (`slimdiff run --image`);
            always for an inpainting model (KindSpec.inpainting) and the SDXL refiner
            (KindSpec.aesthetic_score), which run from an image.
        controlnet: a ControlNet to steer the UNet with (a diffusers ControlNet folder, a
            single .safetensors file or a hub id), or a list of them (their residuals
            summed, as diffusers' MultiControlNetModel): the denoiser graph then holds the
            UNet and them, and takes their control images and scales
            (slimdiff/models/controlnet.py; `slimdiff run --control-image`). Each is
            checked against the UNet before anything is exported.
        allow_pickle: read a ControlNet folder's pickled .bin weights too (unpickling can
            run code: only files you trust).

    Example:
        >>> export_bundle(load_model("tiny:sd15"), "out/sd15", precision="fp16")  # doctest: +SKIP
    """
    _validate(target, precision, vae_precision, external_data_threshold)
    if weights not in WEIGHTS:
        raise UserError(f"weights {weights!r} is not supported; use one of: {', '.join(WEIGHTS)}")
    qdq_given = qdq
    qdq = qdq or ("tensorrt" if target == "tensorrt" else "ort")
    if qdq not in QDQ_FORMS:
        raise UserError(f"qdq form {qdq!r} is not supported; use one of: {', '.join(QDQ_FORMS)}")
    model.require_pipeline("export")
    quantized = has_quantized_layers(model.denoiser)
    if quantized and precision != "fp32":
        raise UserError(
            f"precision {precision}: {model.source} has quantized layers, exported as fp32 "
            "ONNX around their Q/DQ integer kernels (onnxruntime has no fp16 form of them); "
            "export it with --precision fp32"
        )
    if qdq_given is not None and not quantized:
        log.warning(
            "qdq %s has no effect: %s has no quantized layers (a quant.quest recipe makes them)",
            qdq_given,
            model.source,
        )
    out = Path(out)
    check_out_dir(out)
    shipped_scheduler = bundle_scheduler(model, scheduler, sigmas, timestep_spacing)
    precisions = component_precisions(model, precision, vae_precision)
    sizes = size_range(model, min_size, max_size, max_images)
    kind = model.arch.kind_for(model.denoiser.config)
    if (kind.inpainting or kind.aesthetic_score) and not vae_encoder:
        log.info(
            "%s is %s, which runs only from an image (or, the refiner, a base model's "
            "latents): its VAE encoder is exported too",
            model.source,
            "an inpainting model" if kind.inpainting else "the SDXL refiner",
        )
        vae_encoder = True
    specs = controlnet_specs(controlnet)
    steer = [load_checked(model, spec, weights, allow_pickle) for spec in specs]
    components = plan_components(model, vae_encoder=vae_encoder, controlnets=steer)
    entries: dict[str, ComponentEntry] = {}
    with exclusive_beside(out), atomic_dir(out, marker="bundle", legacy=BUNDLE_EVIDENCE) as root:
        for i, component in enumerate(components):
            if progress is not None:
                progress(component.name, i, len(components))
            # the VAE decoder and encoder share one model: its weights go with the last
            needed_later = any(c.model is component.model for c in components[i + 1 :])
            release = (release_weights or is_lazy(component.model)) and not needed_later
            profile = shape_profile(component, model, sizes)
            aoti = target == "aoti" and _aoti().wants_aoti(component)
            lazy = is_lazy(component.model)
            streamed = not aoti and _streams(component, weights, precisions[component.name])
            if lazy and not streamed:
                log.info("%s: loading its weights", component.name)
                materialize(component.model)
            if aoti:
                entry = _aoti().export_aoti_component(
                    component,
                    root,
                    precision=precisions[component.name],
                    check=check,
                    profile=profile,
                    vae_scale=sizes.vae_scale,
                )
            elif streamed:
                entry = export_streamed(
                    component,
                    root,
                    root / _WORK,
                    precision=precisions[component.name],
                    check=check,
                    threshold=external_data_threshold,
                )
            else:
                entry = export_onnx_component(
                    component,
                    root,
                    precision=precisions[component.name],
                    optimize=optimize and target != "tensorrt",  # TensorRT fuses itself
                    qdq=qdq,
                    check=check,
                    threshold=external_data_threshold,
                    release=release,
                )
            if release and entry.format == "aoti":
                free_weights(component.model)  # ONNX components free theirs once traced
            else:
                # The parity session and the graph it read are gone, but glibc keeps their
                # freed pages until trimmed: fp32 random:sd15's UNet left 1.0 GiB resident.
                # (Not for tiny components: the cycle collection alone takes ~0.3 s.)
                release_memory_past(param_bytes(component.model))
            entry.profile = profile
            log.info("%s exported; resident memory %.0f MiB", component.name, rss_mib())
            entries[component.name] = entry
        shutil.rmtree(root / _WORK, ignore_errors=True)
        write_support_files(model, root, shipped_scheduler)
        if target == "tensorrt":
            from slimdiff.export.tensorrt import write_build_script

            write_build_script(root, entries)  # hashed with the rest: before the manifest
        source = source or {"model": model.source}
        for i, spec in enumerate(specs):  # controlnet, controlnet_2, ...
            source = {**source, "controlnet" + (f"_{i + 1}" if i else ""): str(spec)}
        manifest = _write_manifest(root, model, entries, source, steer)
        make_readable(root)
    log.info("bundle written to %s (sha256 %s)", out, manifest.sha256)
    return manifest


def _streams(component: Component, weights: str, precision: str) -> bool:
    """Whether `component` takes the streamed route (see export_bundle's `weights`)."""
    if has_quantized_layers(component.model):
        return False  # Q/DQ export reads the quantizers' state from the module
    if weights != "auto":
        return weights == "stream"
    # The usual route holds the weights, then the graph and a parity session, about as big.
    # An fp16 graph past protobuf's 2 GiB is converted through ORT's OnnxModel with
    # symbolic shape inference (optimize.convert_fp16), which copies the graph over: sized
    # as the optimizer with it. SD3 Medium's 8.1 GB transformer was killed there on 24 GiB;
    # the streamed route converts one tensor at a time.
    factor = 2.0
    if precision == "fp16" and param_bytes(component.model) >= PROTOBUF_LIMIT:
        factor = FUSE_MEMORY[True]
    return is_lazy(component.model) and not fits_in_memory(component.model, factor)


def _aoti():
    from slimdiff.export import aoti  # torch._inductor only when the target asks for it

    return aoti


def _write_manifest(
    root: Path,
    model: LoadedModel,
    entries: dict[str, ComponentEntry],
    source: dict,
    controlnets: Sequence[Any] = (),
) -> Manifest:
    """Write manifest.json, last, so a folder with a manifest is always complete; return it
    as the runtime reads it back, with `sha256` (the bundle's identity) set.

    The bytes are parsed with the runtime's own strict reader before they are written: a
    manifest this slimdiff writes always validates, or the export fails here.
    """
    try:
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            slimdiff_version=slimdiff.__version__,
            family=model.arch.family,
            source=source,
            pipeline=pipeline_constants(model, controlnets),
            components=entries,
            files=hash_files(root),
        )
        data = manifest.to_bytes()
        written = parse_manifest(data, root / MANIFEST_NAME)
    except (pydantic.ValidationError, BundleError) as err:
        detail = str(err).splitlines()[0] if isinstance(err, BundleError) else str(err)
        raise ExportError(
            f"the bundle manifest for {model.source} does not validate ({detail}); the model "
            "is outside what the runtime supports: report it"
        ) from err
    atomic_write_bytes(root / MANIFEST_NAME, data)
    return written


def _validate(target: str, precision: str, vae_precision: str | None, threshold: int) -> None:
    if target not in TARGETS:
        raise UserError(
            f"export target {target!r} is not supported; supported: {', '.join(TARGETS)}"
        )
    for what, value in (("precision", precision), ("vae_precision", vae_precision)):
        if value is not None and value not in PRECISIONS:
            raise UserError(
                f"{what} {value!r} is not supported; use one of: {', '.join(PRECISIONS)}"
            )
    if not 0 <= threshold <= PROTOBUF_LIMIT:
        raise UserError(
            f"external_data_threshold {threshold} must be between 0 and {PROTOBUF_LIMIT} "
            "bytes (protobuf cannot hold a graph over 2 GiB)"
        )


def export_onnx_component(
    component: Component,
    root: Path,
    *,
    precision: str,
    optimize: bool = True,
    qdq: str = "ort",
    check: bool = True,
    threshold: int = PROTOBUF_LIMIT,
    release: bool = False,
    gpu_fusions: bool = False,
) -> ComponentEntry:
    """Export, fuse, convert, save and check one component; its manifest entry.

    Writes root/<name>/model.onnx (and model.onnx.data beyond `threshold` bytes of
    weights), as export_bundle does for each ONNX component; its arguments mean what
    export_bundle's do. `release`: free the torch weights once traced (see
    export_bundle's release_weights). `gpu_fusions`: ORT's stable-diffusion fusions for
    the CUDA EP (export/optimize.py), whose contrib ops only run there; bundles keep the
    portable CPU set. Tools export a denoiser alone with it (tools/gpu_latency.py).
    """
    plan = component.plan
    # ORT's transformer fusions find no attention pattern through Q/DQ nodes (measured on
    # tiny SDXL W8A8: 0 Attention, 102 LayerNormalization, which the session fuses at load
    # anyway) and their shape inference takes minutes on a graph of 13k nodes: skipped.
    quantized_model = has_quantized_layers(component.model)
    fusing = optimize and (plan.on_cpu or gpu_fusions) and not quantized_model
    processor = _classic_attention if fusing and plan.attention == "classic" else None
    raw = root / _WORK / component.name / "raw.onnx"
    # Timestep-aware quantizers trace with one merged scale each (slimdiff/lowbit.py): the
    # graph's scales are constants, as integer kernels need.
    with export_mode(component, processor), merged_scales(), qdq_form(qdq):
        # torch as the graph computes it; before the trace, so the weights can go after it
        reference = torch_reference(component) if check else None
        export_component(component, raw)
    four_bit = int4_digests(component.model) if quantized_model else set()
    if release:
        free_weights(component.model)
    fusions: dict[str, int] = {}
    skipped = _fusions_skipped(raw, plan) if fusing else None
    run_fusions = fusing and skipped is None
    fp16 = precision == "fp16"
    fused = fuse(str(raw), plan, for_gpu=gpu_fusions, fp16=fp16) if run_fusions else None
    if fused is not None:
        graph, fusions = fused[0].model, fused[1]
        # The optimizer's wrapper holds the graph too; with it gone, `del graph` below
        # frees the weights before the parity session loads its own copy (SDXL: 10 GB).
        del fused
    else:
        graph = load_graph(raw)
    if precision == "fp16":
        graph = convert_fp16(graph, t5=plan.model_type == "t5")
    quantized = is_quantized(graph)
    four_bit = four_bit if quantized else set()
    # TensorRT's parser does not fold the unpacking subgraph: int4 values stay int8 there.
    packed = pack_int4_weights(graph, four_bit) if qdq == "ort" else 0
    if quantized:
        compact_names(graph)
    path = root / component.name / "model.onnx"
    external = save_model(graph, path, threshold)
    del graph
    # before the parity session loads the graph again (sized as the fp32 weights)
    release_memory_past(param_bytes(component.model))
    # The raw export is as big as the final graph: free the disk before the next component.
    shutil.rmtree(raw.parent, ignore_errors=True)
    inputs, outputs = graph_io(path)
    tolerance_key = "int8" if quantized else precision
    parity = check_parity(component, path, tolerance_key, reference) if check else {}
    raise_if_failed(
        parity,
        f"{component.name}: ONNX ({tolerance_key})",
        "export with --no-optimize (API: optimize=False) to rule out onnxruntime's fusions, "
        "and report the model if it persists",
    )
    extra = {
        "opset": OPSET,
        "ort_fusions": fusions,
        "attention": plan.attention if fusing else "native",
        "external_data": external,
        **({"fusions_skipped": skipped} if skipped else {}),
    }
    if quantized:
        # What ORT's CPU EP runs, from the session's optimized graph: the proof that the
        # quantized layers execute as integer kernels, not as float ops between Q/DQ.
        extra["quantization"] = {
            "kernels": integer_kernels(path),
            "int4_packed_weights": packed,
            "activation_scales": "merged",
            "qdq_form": qdq,
        }
    return ComponentEntry(
        path=path.relative_to(root).as_posix(),
        format="onnx",
        precision=("int4" if four_bit else "int8") if quantized else precision,
        inputs=inputs,
        outputs=outputs,
        parity=parity,
        extra=extra,
    )


def _fusions_skipped(raw: Path, plan) -> str | None:
    """Why ORT's fusions are skipped for the traced graph at `raw`: the optimizer would not
    fit in the memory available (export/optimize.py, FUSE_MEMORY); None when they run.
    The graph is exported as traced: it computes the same, only with a higher peak at run
    time (unfused attention)."""
    need, available = fusion_memory(raw, plan), available_bytes()
    if available is None or need <= available:
        return None
    reason = (
        f"ORT's optimizer would need about {need / 2**30:.1f} GiB, {available / 2**30:.1f} "
        "GiB available; export on a machine with more memory for the fused graph"
    )
    log.warning("%s: fusions skipped: %s", raw.parent.name, reason)
    return reason


def _classic_attention(model) -> dict:
    """diffusers' explicit MatMul/Softmax attention, the pattern ORT's UNet fusion matches,
    for every attention module whose heads span its query width. A pruned module (fewer
    heads: to_q narrower than its input, prune.ecodiff) keeps its own processor and stays
    unfused: onnxruntime.transformers' UNet attention fusion sizes the fused op's bias by
    the query's input width (measured with ORT 1.32: MultiHeadAttention then refuses to run,
    "bias length is expected to be 2 * hidden_size + hidden_size_v")."""
    from diffusers.models.attention_processor import AttnProcessor

    chosen = {}
    for name, current in model.attn_processors.items():
        attention = model.get_submodule(name.removesuffix(".processor"))
        to_q = getattr(attention, "to_q", None)
        full = to_q is None or to_q.in_features == to_q.out_features
        chosen[name] = AttnProcessor() if full else current
    return chosen
