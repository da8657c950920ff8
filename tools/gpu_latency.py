"""ms per denoiser step on a GPU: torch eager (fp16), torch.compile, the AOTInductor
package, and the ONNX graph on ORT-CUDA and TensorRT-RTX, per model and per block-removal /
pruning variant, each with the fraction of the FLOP floor it reaches. One script for a
short GPU lease (issue 14's latency table).

    python tools/gpu_latency.py --out $OUT/gpu --budget 420          # on the lent GPU
    python tools/gpu_latency.py --device cpu --tiny --out /tmp/gpu   # a smoke run (tests)

Default plan: random:sdxl's UNet at 1024x1024 and random:sd15's at 512x512 (each family's
default size), each as base, every `blocks.remove` preset written for it (SSD-1B, Vega,
KOALA; BK-SDM) and magnitude-20; one image, with classifier-free guidance where the family
uses it (batch 2), the family's full text length. Any family can be named (SD3 and FLUX
have no block-removal presets: base and magnitude-N). Every variant is timed eager; those named by
--compiled (default: base) also through torch.compile and an AOTInductor package, since
each compile takes minutes. Weights are random, drawn on the device (the architecture
decides the time, and METHOD.md warns that zeros time faster than data); students are cut
with their `blocks.remove` preset on the meta device (no distillation), `magnitude-20`
pruned by `prune.ecodiff`'s magnitude scores.

ONNX backends (ort-cuda, trt-rtx; ort-cpu for smoke runs): the denoiser exported as
`slimdiff export` exports it (traced in fp32 on the CPU, then fp16 with float32 IO on a GPU),
with ORT's CUDA fusions for ort-cuda and none for trt-rtx (TensorRT fuses itself, as for
--target tensorrt), run by the runtime's own backend: IO binding, the text conditioning
read-only so it is copied to the device once (as the pipeline does), the latents copied
in and the prediction copied out at each step. A backend whose library is missing is a
skipped row with the reason, found before any export.

Timing: CUDA events around each step after `--warmup` steps (the compile happens in the
first; the ONNX backends' runs are synchronous, timed by the wall clock), the median of
`--repeat`. FLOP floor fraction: FLOPs per step (FlopCounterMode on
the eager module, as `slimdiff inspect` counts) / time / the bf16 matrix rate measured on
the same device (slimdiff.metrics.matmul_rate). Each backend's output is compared with
eager's (rel err = max|a-b| / max|b|).

Work past `--budget` seconds is skipped and listed as such; results.json is rewritten after
every measurement, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TORCH_BACKENDS = ("eager", "compile", "aoti")
ONNX_BACKENDS = ("ort-cuda", "trt-rtx", "ort-cpu")
BACKENDS = (*TORCH_BACKENDS, *ONNX_BACKENDS)
PRUNED = "magnitude-"
_VAE_SCALE = 8  # pixels per latent side in every family's VAE (tiny ones too)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", nargs="+", default=["sdxl", "sd15"])
    p.add_argument(
        "--variants",
        nargs="+",
        help="base, a blocks.remove preset, magnitude-N (default: base, every preset written "
        "for the family, magnitude-20)",
    )
    p.add_argument(
        "--backends", nargs="+", default=[*TORCH_BACKENDS, *ONNX_BACKENDS[:2]], choices=BACKENDS
    )
    p.add_argument("--compiled", nargs="+", default=["base"], help="variants also compiled")
    p.add_argument("--size", type=int, help="image side in pixels (default: the plan's)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--budget", type=float, default=420.0, help="seconds; later work is skipped")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny:* widths (a smoke run)")
    p.add_argument("--out", default="gpu-latency")
    args = p.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run(args, Path(args.out))


def run(args, out: Path) -> None:
    import torch
    from slimdiff.compress.blocks.presets import presets_for

    from slimdiff.metrics.matmul_rate import matmul_tflops
    from slimdiff.models import get_arch

    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": _describe(args.device),
        "dtype": str(dtype).removeprefix("torch."),
        "matmul": matmul_tflops(args.device),
        "rows": [],
        "skipped": [],
    }
    rate = result["matmul"]["tflops"]
    for family in args.families:
        size = args.size or (64 if args.tiny else get_arch(family).default_size[0])
        for variant in args.variants or ("base", *presets_for(family), f"{PRUNED}20"):
            if time.monotonic() > deadline:
                result["skipped"].append(f"{family} {variant}: past the budget")
                continue
            rows = measure(args, family, variant, size, dtype, deadline, out)
            for r in rows:
                if "ms_per_step" in r:
                    seconds = r["ms_per_step"] / 1e3
                    r["flop_floor_fraction"] = r["flops_per_step"] / seconds / (rate * 1e12)
                    result["rows"].append(r)
            result["skipped"].extend(r["skipped"] for r in rows if "skipped" in r)
            _save(out, result)
    _save(out, result)
    print(table(result))


def measure(args, family, variant, size, dtype, deadline, out: Path) -> list[dict]:
    """Every backend's row for one variant (or why it was skipped)."""
    import torch
    from slimdiff.export.components import denoiser_component
    from slimdiff.export.dummy_inputs import Sizes

    from slimdiff.inspect import count_flops
    from slimdiff.models import get_arch

    device = torch.device(args.device)
    arch = get_arch(family)
    try:
        unet = build_variant(family, variant, args.tiny, device, dtype)
    except Exception as err:  # a preset written for another family's UNet, say
        return [{"skipped": f"{family} {variant}: {type(err).__name__}: {err}"}]
    component = denoiser_component(arch, unet)
    latent = size // _VAE_SCALE
    batch = 2 if arch.uses_cfg_for(unet.config) else 1
    sizes = Sizes(batch, latent, latent, arch.text_length(), full_text=True, seed=0)
    feeds = component.make_inputs(sizes)
    fp32 = tuple(feeds[n].to(device) for n in component.input_names)
    inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in fp32)
    with torch.inference_mode():
        flops, _ = count_flops(component.module, *inputs)
        reference = component.module(*inputs).float()
    base = {
        "family": family,
        "variant": variant,
        "size": [size, size],
        "batch": batch,
        "params": sum(p.numel() for p in unet.parameters()),
        "flops_per_step": flops,
    }
    rows = []
    for backend in args.backends:
        if backend != "eager" and variant not in args.compiled:
            continue
        if time.monotonic() > deadline:
            rows.append({"skipped": f"{family} {variant} {backend}: past the budget"})
            continue
        start = time.monotonic()
        try:
            step, feed = _runner(backend, component, inputs, fp32, out / family / variant, dtype)
            events = backend in TORCH_BACKENDS
            ms = time_ms(step, feed, args.warmup, args.repeat, device, events=events)
            got = step(*feed)
        except Exception as err:  # a backend that fails is a row of the table, not the end
            rows.append({"skipped": f"{family} {variant} {backend}: {type(err).__name__}: {err}"})
            continue
        got = got[0] if isinstance(got, tuple | list) else got
        err = float((got.float() - reference).abs().max() / reference.abs().max())
        rows.append(
            {
                **base,
                "backend": backend,
                "ms_per_step": ms,
                "rel_err_vs_eager": err,
                "seconds_incl_compile": round(time.monotonic() - start, 1),
            }
        )
        print(f"{family} {variant} {backend}: {ms:.2f} ms/step (rel err {err:.1e})", flush=True)
    del unet, component
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def build_variant(family: str, variant: str, tiny: bool, device, dtype):
    """The variant's UNet on `device` in `dtype` with random weights drawn there."""
    from slimdiff.compress.blocks.remove import RemoveBlocksPass

    from slimdiff.models import get_arch
    from slimdiff.models.builtin import build_builtin

    pipe = build_builtin("tiny" if tiny else "random", family, device="meta")
    teacher = getattr(pipe, get_arch(family).denoiser)
    if variant.startswith(PRUNED):
        unet = _pruned(family, random_fill(teacher, device), int(variant.removeprefix(PRUNED)))
    elif variant != "base":
        cut = RemoveBlocksPass(RemoveBlocksPass.Config(preset=variant))
        unet = random_fill(cut.build_student(teacher, family)[0], device)
    else:
        unet = random_fill(teacher, device)
    return unet.to(dtype).eval().requires_grad_(False)


def random_fill(module, device):
    """`module` (parameters on the meta device) with weights drawn on `device` as torch
    initialises each layer (slimdiff.models.weights.init_rule), seeded."""
    import torch

    from slimdiff.models.lazy import replace_parameters
    from slimdiff.models.weights import init_rule

    generator = torch.Generator(device=device).manual_seed(0)

    def draw(owner, attr: str, param) -> torch.Tensor:
        rule, bound = init_rule(owner, attr, param)
        t = torch.empty(param.shape, device=device)
        if rule in ("ones", "zeros"):
            return t.fill_(1.0 if rule == "ones" else 0.0)
        if rule == "normal":
            return t.normal_(generator=generator)
        return t.uniform_(-bound, bound, generator=generator)

    replace_parameters(module, draw)
    return module


def _pruned(family: str, unet, percent: int):
    from slimdiff.compress.prune.magnitude import magnitude_scores
    from slimdiff.compress.prune.select import select
    from slimdiff.compress.prune.slicing import prune
    from slimdiff.compress.prune.units import unit_groups

    from slimdiff.models import get_arch

    arch = get_arch(family)
    groups = unit_groups(arch, unet)
    keep = select(groups, magnitude_scores(groups, unet), sparsity=percent / 100, scope="global")
    prune(arch, unet, groups, keep)
    return unet


def _runner(backend, component, inputs, fp32, work: Path, dtype):
    """(step function, its inputs) for `backend`."""
    import torch

    if backend == "eager":
        return _no_grad(component.module), inputs
    if backend == "compile":
        return _no_grad(torch.compile(component.module)), inputs
    precision = "fp16" if dtype == torch.float16 else "fp32"
    if backend in ONNX_BACKENDS:
        return _onnx_runner(backend, component, fp32, work / backend, dtype, precision), ()
    from slimdiff.export.aoti import export_aoti_component

    entry = export_aoti_component(component, work, precision=precision, check=False)
    package = torch._inductor.aoti_load_package(str(work / entry.path))
    return _no_grad(package), fp32  # the package takes and returns float32 (export/aoti.py)


def _onnx_runner(backend, component, fp32, work: Path, dtype, precision: str):
    """A step through the runtime's `backend` on the component's ONNX graph."""
    import torch
    from slimdiff.export import export_onnx_component
    from slimdiff.export.components import model_device
    from slimdiff.runtime.backends import get_backend

    session_backend = get_backend(backend)  # a missing library fails here, before the export
    module, device = component.model, model_device(component.model)
    module.to("cpu", torch.float32)  # traced as `slimdiff export` traces it
    try:
        entry = export_onnx_component(
            component, work, precision=precision, check=False, gpu_fusions=backend == "ort-cuda"
        )
    finally:
        module.to(device, dtype)
    session = session_backend.load(work / entry.path)
    feeds = {}
    for i, (name, value) in enumerate(zip(component.input_names, fp32, strict=True)):
        array = value.cpu().numpy().copy()  # its own memory, not the tensor's
        # What changes per step: the latents (first input) and the timestep; the rest is
        # the image's conditioning, read-only as runtime/pipeline.py marks it.
        array.flags.writeable = i == 0 or "timestep" in name
        feeds[name] = array
    output = component.output_names[0]
    return lambda: torch.from_numpy(session.run(feeds)[output]).to(device)


def _no_grad(fn):
    import torch

    def step(*args):
        with torch.inference_mode():
            return fn(*args)

    return step


def time_ms(step, feed, warmup: int, repeat: int, device, events: bool = True) -> float:
    """Median ms of `repeat` calls after `warmup` (CUDA events on a GPU where `events`)."""
    import torch

    cuda = device.type == "cuda" and events
    for _ in range(max(warmup, 1)):
        step(*feed)
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(*feed)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step(*feed)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def table(result: dict) -> str:
    rate = result["matmul"]["tflops"]
    lines = [
        f"{result['device']}, {result['dtype']}, matmul {rate:.0f} TFLOP/s ({result['date']})",
        "| model | variant | backend | ms/step | TFLOP/step | FLOP floor | rel err |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['family']} {r['size'][0]}px | {r['variant']} | {r['backend']} | "
            f"{r['ms_per_step']:.1f} | {r['flops_per_step'] / 1e12:.2f} | "
            f"{r['flop_floor_fraction']:.1%} | {r['rel_err_vs_eager']:.1e} |"
        )
    lines += [f"skipped: {s}" for s in result["skipped"]]
    return "\n".join(lines)


def _describe(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        cc = f"sm_{props.major}{props.minor}"
        return (
            f"{props.name} ({cc}, {props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}"
        )
    return f"CPU {platform.processor() or platform.machine()}, torch {torch.__version__}"


def _save(out: Path, result: dict) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out / "results.json")


if __name__ == "__main__":
    main()
