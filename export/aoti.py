"""AOTInductor target: a component as a `.pt2` package that torch runs without Python code.

Per component: `torch.export.export` with symbolic batch, latent and token axes, then
`torch._inductor.aoti_compile_and_package`, which generates C++ (CPU) or Triton (CUDA)
kernels plus a C++ wrapper and packs them with the weights into `<name>/model.pt2`. Beside
it `io.json` holds what the package itself does not tell a numpy caller: input and output
names in call order, their dtypes and manifest shapes, the device it was compiled for and
the range each named axis was exported over (runtime/backends/aoti.py reads it).

Which components: the denoiser only (`wants_aoti`). It runs steps x CFG times per image and
holds almost all of a run's time; the text encoders run once per prompt and the VAE once
per image. tiny:sdxl's text encoders and VAE pass torch.export with fully dynamic axes
too, but compiling is slow and Python-bound (Inductor's codegen walks every node with
symbolic sizes; the C++ compiler is a third of it): on a shared 2-CPU machine the tiny:sdxl
UNet took 138-270 s, toy:shapes' UNet 149 s. A second compile per bundle is not worth it for
a graph that runs once per image; those stay ONNX, where ORT's fusions already serve them.
Quantized denoisers stay ONNX too: torch.export would lower slimdiff's fake quantizers to
float math, while the ONNX path writes Q/DQ graphs that run integer kernels.

Dynamic shapes: one `torch.export.Dim` per axis name of `component.dynamic_axes`, shared by
every input that carries it (the denoiser's B in sample, timestep and text states), with
the bounds of `AXIS_RANGES`. Named Dims rather than Dim.AUTO/DYNAMIC: export then proves
every guard over the whole range or fails naming the guards (ExportError, with export's
suggested ranges), instead of silently specialising an axis. Where diffusers' code did not
hold over the range, and what export does about it:

- Size-1 axes (batch 1 without CFG, a 1-token text, a UNet's bottom resolution at small
  sides): `Tensor.contiguous()` asks whether a view is already contiguous, which for a
  permuted view depends on whether an axis is 1, and export turns that into a guard
  `B != 1` no range satisfies (FLUX's attention output, diffusers' Transformer2D output).
  Export runs with `contiguous()` as an unconditional contiguous copy (`_copying_contiguous`):
  the same values, at most one copy more where a view was contiguous already.
- UNets, upsampling: diffusers forwards skip-connection sizes to its upsamplers only when a
  side is not a multiple of 2^upsamplers, a branch torch.export would turn into a guard
  `H % 8 != 0` that no range satisfies. Export runs with the forwarding path forced
  (`_skip_sized_upsampling`), which is exact at every size, divisible or not.
- SD3, positions: diffusers crops the positional embedding from a fixed grid of
  `pos_embed_max_size` patches per side with a slice, whose end export clamps to the grid
  (min/max in the sizes) and then cannot prove the guards over a range. Export runs with
  the crop written as `narrow()` (`_exportable_patch_grid`; the same values, a test checks
  them), latent sides as `patch * Dim` (the runtime's sizes are multiples of the patch),
  and within 2..positions-1 patches: at 1 patch and at the whole grid export adds runtime
  guards (measured on tiny:sd3, 32 positions: H in 4..62). Real SD3 (192 positions, patch
  2) keeps the usual 256-latent-px bound.
- SD3, joint attention: the image and text halves of the attention output are slices of
  one tensor, and the Linear after each asks whether its slice can be viewed as a matrix,
  a guard `B != 1` (and `S != 1`). Those two Linears take a contiguous copy while
  exporting (a forward pre-hook, removed after), so the guards are never asked.
- ControlNets (slimdiff/models/controlnet.py): the control image's sides are the latent
  sides times the ControlNets' pixels per latent pixel, exported as derived dims
  (`8 * Dim("H")`), not axes of their own: the two stay tied, as the conditioning
  convolutions, which halve the control image to the latent sides, need.
- FLUX: the packed token count L is its own axis (L = H/2 * W/2 is the runtime's
  arithmetic, not the graph's); the rotary positions come in as img_ids, so any L runs.

Precision: fp16/bf16 cast the weights (swapped in for the export, the caller's fp32
weights put back after) while the package keeps float32 inputs and outputs, as the ONNX
graphs do; parity tolerance follows the precision (export/parity.py TOLERANCES).

Example:
    >>> entry = export_aoti_component(unet, root, precision="fp32", check=True)  # doctest: +SKIP
    >>> entry.path, entry.format, entry.parity["passed"]                         # doctest: +SKIP
    ('unet/model.pt2', 'aoti', True)
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from slimdiff.export.components import Component, eval_mode, export_mode, model_device
from slimdiff.export.dummy_inputs import CHECK, TRACE
from slimdiff.export.parity import TOLERANCES, ExportError, raise_if_failed
from slimdiff.runtime.backends.aoti import axis_accepts, axis_range_text
from slimdiff.runtime.manifest import DENOISER_OUTPUT, ComponentEntry
from torch import nn

from slimdiff.errors import UserError
from slimdiff.fsutil import atomic_write_bytes
from slimdiff.lowbit import has_quantized_layers

__all__ = [
    "AXIS_RANGES",
    "IO_NAME",
    "PACKAGE_NAME",
    "axis_ranges",
    "check_profile",
    "export_aoti_component",
    "export_program",
    "wants_aoti",
]

log = logging.getLogger(__name__)

PACKAGE_NAME = "model.pt2"
IO_NAME = "io.json"
# (min, max) per axis name. Batch: up to 16 images per call with CFG. Latent sides: up to
# 256 (2048 px at the usual 8x VAE). Text: T5's 512 tokens. L: FLUX's packed image tokens,
# (256/2)^2. Bounded, because some guards only hold below a size (diffusers upsamples
# with `.contiguous()` from batch 64 and past 2^31 elements).
AXIS_RANGES = {
    "B": (1, 32),
    "H": (1, 256),
    "W": (1, 256),
    "h": (1, 256),
    "w": (1, 256),
    "S": (1, 512),
    "L": (1, 16384),
}
# Axes sized by another (torch.export's derived dims): a ControlNet's control image sides,
# the latent sides times its pixels per latent pixel (slimdiff/models/controlnet.py).
_DERIVED = {"8H": "H", "8W": "W"}
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# bf16 keeps 3 mantissa bits fewer than fp16: 8x its rounding per op (not measured here:
# export_bundle offers fp32 and fp16 only).
_TOLERANCES = {**TOLERANCES, "bf16": 1e-1}
_DTYPE_NAMES = {torch.float32: "float32", torch.int64: "int64", torch.int32: "int32"}


def wants_aoti(component: Component) -> bool:
    """The denoiser (the component that returns the prediction), unless it holds quantized
    layers (see the module docstring)."""
    denoiser = component.output_names == (DENOISER_OUTPUT,)
    return denoiser and not has_quantized_layers(component.model)


def export_aoti_component(
    component: Component,
    root: Path,
    *,
    precision: str,
    check: bool,
    profile: dict | None = None,
    vae_scale: int | None = None,
) -> ComponentEntry:
    """Export, compile and (with `check`) verify one component; its manifest entry.

    Writes root/<name>/model.pt2 and root/<name>/io.json. `profile` (the bundle's
    {"min", "opt", "max"} input shapes) is checked against the package's axis ranges first,
    before minutes of compiling: a UserError when it does not fit (naming image sides in
    pixels too, given `vae_scale`, pixels per latent pixel). Raises ExportError when
    export cannot keep an axis dynamic or the package differs from the eager module.
    """
    if precision not in _DTYPES:
        raise ExportError(f"{component.name}: precision {precision} has no AOTInductor form")
    if profile is not None:
        check_profile(component, profile, vae_scale)
    device = model_device(component.model)
    folder = root / component.name
    folder.mkdir(parents=True, exist_ok=True)
    package = folder / PACKAGE_NAME
    program, axes = export_program(component, _DTYPES[precision], device)
    inputs, outputs = _io_specs(component, program)
    log.info(
        "compiling %s with AOTInductor on %s (C++ codegen; minutes for a large model)",
        component.name,
        device,
    )
    start = time.perf_counter()
    torch._inductor.aoti_compile_and_package(program, package_path=str(package))
    seconds = time.perf_counter() - start
    log.info("compiled %s in %.0f s", component.name, seconds)
    del program
    record = {
        "inputs": inputs,
        "outputs": outputs,
        "device": device.type,
        "precision": precision,
        "axes": axes,  # what the package accepts; the bundle's own range is entry.profile
        "torch": torch.__version__,
    }  # no timings: the same model exports to the same io.json
    atomic_write_bytes(folder / IO_NAME, (json.dumps(record, indent=2) + "\n").encode())
    parity = check_package(component, package, precision) if check else {}
    raise_if_failed(
        parity,
        f"{component.name}: the AOTInductor package ({precision})",
        "export with --target onnx, and report the model",
    )
    return ComponentEntry(
        path=package.relative_to(root).as_posix(),
        format="aoti",
        precision=precision,
        inputs=inputs,
        outputs=outputs,
        parity=parity,
        extra={},  # the manifest's extra schema is ONNX's; io.json records the package
    )


# ---------------------------------------------------------------- torch.export


class _FloatIO(nn.Module):
    """`module` taking and returning float32, computing in `dtype`: the package's IO then
    matches the ONNX graphs' (float32) whatever the precision."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module
        self.dtype = dtype

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cast = [x.to(self.dtype) if x.is_floating_point() else x for x in inputs]
        out = self.module(*cast)
        out = out if isinstance(out, tuple) else (out,)
        return tuple(y.float() if y.is_floating_point() else y for y in out)


def export_program(
    component: Component, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> tuple[torch.export.ExportedProgram, dict[str, dict[str, int]]]:
    """torch.export of `component` on TRACE inputs with its named axes dynamic.

    Returns the program and the range each axis name was exported over
    ({"B": {"min": 1, "max": 32}, ...}).
    """
    device = device or model_device(component.model)
    feeds = component.make_inputs(TRACE)
    args = tuple(feeds[n].to(device) for n in component.input_names)
    ranges = axis_ranges(component)
    dims = {a: _dim(a, r) for a, r in ranges.items() if a not in _DERIVED}
    scale = getattr(component.model, "pixels_per_latent", None)
    dims.update({a: scale * dims[base] for a, base in _DERIVED.items() if a in ranges})
    shapes = {
        "inputs": tuple(
            {i: dims[a] for i, a in component.dynamic_axes.get(n, {}).items()} or None
            for n in component.input_names
        )
    }
    module = _FloatIO(component.module, dtype)
    log.info("torch.export of %s (axes %s)", component.name, ranges)
    with (
        export_mode(component, None),
        _cast_weights(component.model, dtype),
        _skip_sized_upsampling(component.model),
        _exportable_patch_grid(component.model),
        _copying_contiguous(),
        # Size-1 batches and sides are traced as any other size, not specialised away
        # (the trace uses batch 2; the runtime's batch is 1 without CFG).
        torch.fx.experimental._config.patch(backed_size_oblivious=True),
    ):
        try:
            program = torch.export.export(module, args, dynamic_shapes=shapes, strict=False)
        except torch._dynamo.exc.UserError as err:
            fixes = " ".join(str(err).partition("Suggested fixes:")[2].split("\n\n")[0].split())
            raise ExportError(
                f"{component.name}: torch.export cannot keep its axes dynamic over {ranges} "
                f"({_first_line(err)}{'; export suggests ' + fixes if fixes else ''}); export "
                "with --target onnx"
            ) from err
    return program, ranges


def axis_ranges(component: Component) -> dict[str, dict[str, int]]:
    """The range the package accepts per input axis name (AXIS_RANGES, narrowed for a
    patch grid: see the module docstring), with "multiple" where sizes must be multiples of
    a patch; outputs' axes ("8h" of the VAE's image) follow from the inputs'. A control
    image's sides ("8H", "8W") are the latent sides' times the ControlNets' pixels per
    latent pixel (_DERIVED)."""
    names = {a for n in component.input_names for a in component.dynamic_axes.get(n, {}).values()}
    ranges = {
        a: dict(zip(("min", "max"), AXIS_RANGES[a], strict=True))
        for a in sorted(names - set(_DERIVED))
    }
    grid = _patch_grid(component.model)
    if grid is not None:
        patch, positions = grid
        for axis in {"H", "W"} & names:
            lo, hi = ranges[axis]["min"], ranges[axis]["max"]
            ranges[axis] = {
                "min": max(-(-lo // patch), 2) * patch,
                "max": min(hi // patch, positions - 1) * patch,
                "multiple": patch,
            }
    scale = getattr(component.model, "pixels_per_latent", None)
    for axis in sorted(names & set(_DERIVED)):
        base = ranges[_DERIVED[axis]]
        step = scale * base.get("multiple", 1)
        ranges[axis] = {"min": base["min"] * scale, "max": base["max"] * scale, "multiple": step}
    return ranges


def check_profile(component: Component, profile: dict, vae_scale: int | None = None) -> None:
    """The bundle's size range (`profile`, from --min-size/--max-size/--max-images) inside
    what the package is exported for (axis_ranges): a UserError otherwise, which names the
    latent sides H and W in image pixels too when `vae_scale` is given."""
    ranges = axis_ranges(component)
    for name in component.input_names:
        for i, axis in component.dynamic_axes.get(name, {}).items():
            for point in ("min", "max"):
                size = profile[point][name][i]
                if axis_accepts(ranges[axis], size):
                    continue
                shown, within = str(size), axis_range_text(ranges[axis])
                if vae_scale and axis in ("H", "W"):
                    shown += f" ({size * vae_scale} px)"
                    within += f" (image sides {axis_range_text(ranges[axis], vae_scale)} px)"
                raise UserError(
                    f"{component.name}: the bundle's {point} size puts {name} axis {axis} at "
                    f"{shown}, outside the {within} its AOTInductor package is exported for; "
                    "pass --min-size / --max-size / --max-images within that range, or "
                    "--target onnx"
                )


def _dim(axis: str, r: dict[str, int]) -> Any:
    """torch.export's Dim for an axis range; a multiple of a patch as `patch * Dim`."""
    step = r.get("multiple", 1)
    if r["min"] > r["max"]:
        raise ExportError(f"axis {axis}: no size in {r} fits the model's positions grid")
    if step == 1:
        return torch.export.Dim(axis, min=r["min"], max=r["max"])
    return step * torch.export.Dim(f"{axis}_patches", min=r["min"] // step, max=r["max"] // step)


def _first_line(err: Exception) -> str:
    lines = [s.strip() for s in str(err).splitlines() if s.strip()]
    return " ".join(lines[:2])[:400]


@contextlib.contextmanager
def _cast_weights(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """`model`'s floating parameters and buffers as `dtype` copies, the originals put back
    on exit (the caller's fp32 weights stay exact: a cast there would round them)."""
    if dtype == torch.float32:
        yield
        return
    saved: list[tuple[dict, str, Any]] = []
    copies: dict[int, Any] = {}  # tied weights stay tied
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for key, value in table.items():
                if value is None or not value.is_floating_point():
                    continue
                if id(value) not in copies:
                    half = value.detach().to(dtype)
                    copies[id(value)] = (
                        nn.Parameter(half, requires_grad=False)
                        if isinstance(value, nn.Parameter)
                        else half
                    )
                saved.append((table, key, value))
    try:
        for table, key, value in saved:
            table[key] = copies[id(value)]
        yield
    finally:
        for table, key, value in saved:
            table[key] = value


@contextlib.contextmanager
def _copying_contiguous() -> Iterator[None]:
    """Tensor.contiguous() as a contiguous clone while exporting: no question asked of the
    strides, so no guard on size-1 axes (see the module docstring). Patched only for the
    duration of one export, as export/onnx.py patches unflatten."""
    original = torch.Tensor.contiguous

    def contiguous(self, memory_format=torch.contiguous_format):
        return self.clone(memory_format=memory_format)

    torch.Tensor.contiguous = contiguous
    try:
        yield
    finally:
        torch.Tensor.contiguous = original


def _patch_grid(model: nn.Module) -> tuple[int, int] | None:
    """(patch size, positions per side) of a denoiser that crops its positional embedding
    from a fixed grid (SD3's PatchEmbed with pos_embed_max_size), else None."""
    embed = getattr(model, "pos_embed", None)
    positions = getattr(embed, "pos_embed_max_size", None)
    if not isinstance(positions, int) or not hasattr(embed, "cropped_pos_embed"):
        return None
    return int(embed.patch_size), positions


def _narrow_crop(self: nn.Module, height: int, width: int) -> torch.Tensor:
    # diffusers' PatchEmbed.cropped_pos_embed with narrow() for the slice (its size checks
    # left out: axis_ranges keeps the exported sides inside the grid). A slice's end is
    # clamped to the grid, which export cannot prove over a range; narrow's length is exact.
    height, width = height // self.patch_size, width // self.patch_size
    top = (self.pos_embed_max_size - height) // 2
    left = (self.pos_embed_max_size - width) // 2
    size = self.pos_embed_max_size
    grid = self.pos_embed.reshape(1, size, size, -1).narrow(1, top, height).narrow(2, left, width)
    return grid.reshape(1, -1, grid.shape[-1])


def _contiguous_input(_module: nn.Module, args: tuple) -> tuple:
    # An unconditional copy: export_program patches contiguous() (_copying_contiguous).
    return (args[0].contiguous(), *args[1:])


@contextlib.contextmanager
def _exportable_patch_grid(model: nn.Module) -> Iterator[None]:
    """SD3's crop as `_narrow_crop`, and contiguous inputs for the Linears after its joint
    attention's output split, while exporting (see the module docstring); both undone on
    exit. Other models pass through untouched."""
    if _patch_grid(model) is None:
        yield
        return
    embed = model.pos_embed
    own = vars(embed).get("cropped_pos_embed")  # an instance-level one someone else set
    embed.cropped_pos_embed = types.MethodType(_narrow_crop, embed)
    hooks = []
    for module in model.modules():
        if getattr(module, "add_k_proj", None) is None:  # not a joint (image+text) attention
            continue
        to_out = getattr(module, "to_out", None)
        for linear in (to_out[0] if to_out else None, getattr(module, "to_add_out", None)):
            if isinstance(linear, nn.Linear):
                hooks.append(linear.register_forward_pre_hook(_contiguous_input))
    try:
        yield
    finally:
        if own is None:
            del embed.cropped_pos_embed  # back to the class's method
        else:
            embed.cropped_pos_embed = own
        for hook in hooks:
            hook.remove()


# A modulus no latent side in AXIS_RANGES reaches: every side counts as "not a multiple".
_NEVER_DIVIDES = 62


@contextlib.contextmanager
def _skip_sized_upsampling(model: nn.Module) -> Iterator[None]:
    """diffusers' UNets forward each skip connection's size to the upsampler when a latent
    side is not a multiple of 2**num_upsamplers (their only use of it); with the modulus
    beyond every exported side, export takes that path, which holds at every size."""
    # the model's own UNet, or the one inside (ControlledDenoiser's)
    unets = [m for m in model.modules() if isinstance(getattr(m, "num_upsamplers", None), int)]
    before = [unet.num_upsamplers for unet in unets]
    for unet in unets:
        unet.num_upsamplers = _NEVER_DIVIDES
    try:
        yield
    finally:
        for unet, value in zip(unets, before, strict=True):
            unet.num_upsamplers = value


# ---------------------------------------------------------------- IO and parity


def _io_specs(
    component: Component, program: torch.export.ExportedProgram
) -> tuple[list[dict], list[dict]]:
    """Manifest IO entries as export/onnx.py graph_io writes them for the same component:
    dynamic dims by axis name, fixed ones as ints."""
    placeholders = [
        n for n in program.graph.nodes if n.op == "placeholder" and n.name not in _lifted(program)
    ]
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    values = [n.meta["val"] for n in placeholders], [n.meta["val"] for n in output_node.args[0]]
    specs = []
    for names, vals in zip((component.input_names, component.output_names), values, strict=True):
        specs.append([_io_entry(component, n, v) for n, v in zip(names, vals, strict=True)])
    return specs[0], specs[1]


def _lifted(program: torch.export.ExportedProgram) -> set[str]:
    sig = program.graph_signature
    return {
        *sig.inputs_to_parameters,
        *sig.inputs_to_buffers,
        *sig.inputs_to_lifted_tensor_constants,
    }


def _io_entry(component: Component, name: str, value: torch.Tensor) -> dict:
    axes = component.dynamic_axes.get(name, {})
    shape = []
    for i, d in enumerate(value.shape):
        if i in axes:
            shape.append(axes[i])
        elif isinstance(d, int):
            shape.append(d)
        else:
            raise ExportError(
                f"{component.name}: axis {i} of {name} came out symbolic ({d}) but is not a "
                "declared dynamic axis; report the model"
            )
    dtype = _DTYPE_NAMES.get(value.dtype)
    if dtype is None:
        raise ExportError(f"{component.name}: {name} has dtype {value.dtype}, not a bundle dtype")
    return {"name": name, "dtype": dtype, "shape": shape}


def check_package(component: Component, package: Path, precision: str) -> dict[str, Any]:
    """Run `package` and the eager module on CHECK inputs (other sizes than the trace);
    the manifest's parity record, as export/parity.py check_parity writes it."""
    device = model_device(component.model)
    feeds = component.make_inputs(CHECK)
    args = [feeds[n].to(device) for n in component.input_names]
    with eval_mode(component), torch.inference_mode():
        expected = component.module(*args)
    expected = expected if isinstance(expected, tuple) else (expected,)
    try:
        runner = torch._inductor.aoti_load_package(str(package))
        with torch.inference_mode():
            got = runner(*args)
    except Exception as err:  # the package raises RuntimeError from C++, or loader errors
        raise ExportError(
            f"{component.name}: the AOTInductor package cannot run: {_first_line(err)}"
        ) from err
    got = tuple(got) if isinstance(got, (tuple, list)) else (got,)
    rel_err, max_abs = 0.0, 0.0
    for name, ref, out in zip(component.output_names, expected, got, strict=True):
        if tuple(out.shape) != tuple(ref.shape):
            raise ExportError(
                f"{component.name}: output {name} has shape {list(out.shape)} from the package "
                f"but {list(ref.shape)} in torch; a dynamic axis was compiled as fixed"
            )
        ref, out = ref.float(), out.float()
        diff = float((out - ref).abs().max())
        scale = float(ref.abs().max())
        rel = diff / scale if scale > 0 else diff
        if not bool(torch.isfinite(out).all()):
            rel = diff = float("inf")
        rel_err, max_abs = max(rel_err, rel), max(max_abs, diff)
    tolerance = _TOLERANCES[precision]
    log.info("%s parity: rel err %.2e (tolerance %.0e)", component.name, rel_err, tolerance)
    return {
        "rel_err": rel_err,
        "max_abs_err": max_abs,
        "tolerance": tolerance,
        "passed": rel_err <= tolerance,
        "inputs": {k: list(v.shape) for k, v in feeds.items()},
    }
