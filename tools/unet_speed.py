"""ORT-CPU ms per UNet step: SDXL base against its block-removal students and pruned UNets.

    python tools/unet_speed.py --variants base ssd-1b vega --size 512 --out /tmp/unet-speed
    python tools/unet_speed.py --variants base magnitude-20 --size 512 --out /tmp/unet-prune

`random:sdxl`'s UNet has SDXL base 1.0's architecture at full width (2.57B parameters,
seeded random weights; weights do not change speed). Each variant is cut with its
`blocks.remove` preset (no distillation), or pruned by `prune.ecodiff` with `method:
magnitude` to the sparsity its name gives ("magnitude-20": 20% of the heads' and FFN
neurons' parameters; learned masks would pick other units, but latency depends on the
shapes alone), exported with slimdiff's exporter and timed by the runtime's ORT-CPU
session on one CFG pair (batch 2) of `--size` pixels, 77 text tokens.
Ratios against `base` are what docs/BENCHMARKS.md quotes: they come from one run, on one
machine, with the same settings.

Every variant runs in two child processes, export then timing, so only one model is in
memory at a time: SDXL base in fp32 is 10.3 GB of weights, and a 24 GiB machine cannot
hold the torch model, the traced graph and an ORT session together. For the same reason
the graphs are not run through ORT's attention fusion (the bundle exporter does that on
CPU); on SD1.5 at 512 px the fused and unfused UNet measured the same speed
(export/optimize.py), so the ratios do not depend on it.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = "base"  # the uncut teacher
PRUNED = "magnitude-"  # + percent: prune.ecodiff, method magnitude


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=[BASE, "ssd-1b", "vega"])
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--repeat", type=int, default=3, help="timed runs after one warm-up")
    p.add_argument("--out", default="unet-speed", help="work folder and results.json")
    p.add_argument("--tiny", action="store_true", help="tiny:sdxl's UNet (a smoke run)")
    p.add_argument("--child", choices=("export", "time"), help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.out)
    if args.child == "export":
        export_variant(args.variant, out / args.variant, args.tiny)
    elif args.child == "time":
        print(json.dumps(time_variant(out / args.variant, args.size, args.repeat)))
    else:
        run_all(args, out)


def run_all(args, out: Path) -> None:
    """Each variant: export in one child, time in another; then the table and ratios."""
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for variant in args.variants:
        folder = out / variant
        if not (folder / "unet" / "model.onnx").exists():
            shutil.rmtree(folder, ignore_errors=True)
            _child(args, variant, "export")
        line = _child(args, variant, "time").strip().splitlines()[-1]
        rows[variant] = json.loads(line)
        print(f"{variant}: {rows[variant]['ms_per_step']:.0f} ms/step", flush=True)
    base = rows.get(BASE)
    for row in rows.values():
        row["speedup_vs_base"] = base["ms_per_step"] / row["ms_per_step"] if base else None
    result = {
        "size": [args.size, args.size],
        "batch": 2,
        "unet": "tiny:sdxl" if args.tiny else "random:sdxl (SDXL base architecture)",
        "repeat": args.repeat,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(sys.argv),
        "variants": rows,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| variant | UNet params | ms/step (median) | speedup vs base |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        speedup = f"{row['speedup_vs_base']:.2f}x" if base else "-"
        print(f"| {name} | {row['params']:,} | {row['ms_per_step']:.0f} | {speedup} |")


def _child(args, variant: str, what: str) -> str:
    cmd = [sys.executable, __file__, "--child", what, "--variant", variant, "--out", args.out]
    cmd += ["--size", str(args.size), "--repeat", str(args.repeat)] + ["--tiny"] * args.tiny
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"{variant}: {what} failed (exit {done.returncode}; -9 is out of memory)")
    return done.stdout


def export_variant(variant: str, folder: Path, tiny: bool) -> None:
    import torch
    from slimdiff.compress.blocks.remove import RemoveBlocksPass
    from slimdiff.export.components import denoiser_component, export_mode
    from slimdiff.export.onnx import export_component

    from slimdiff.models import get_arch
    from slimdiff.models.builtin import sdxl_unet

    torch.manual_seed(0)
    unet = sdxl_unet(tiny).eval().requires_grad_(False)
    if variant.startswith(PRUNED):
        unet = _pruned(unet, int(variant.removeprefix(PRUNED)) / 100)
    elif variant != BASE:
        cut = RemoveBlocksPass(RemoveBlocksPass.Config(preset=variant))
        unet = cut.build_student(unet, "sdxl")[0].eval().requires_grad_(False)
    params = sum(p.numel() for p in unet.parameters())
    component = denoiser_component(get_arch("sdxl"), unet)
    raw = folder / "unet" / "model.onnx"
    t0 = time.perf_counter()
    with export_mode(component, None):
        export_component(component, raw)
    info = {"params": params, "export_s": round(time.perf_counter() - t0, 1)}
    (folder / "export.json").write_text(json.dumps(info))


def _pruned(unet, sparsity: float):
    """`unet` with `sparsity` of its maskable parameters pruned by weight magnitude."""
    from slimdiff.compress.prune.magnitude import magnitude_scores
    from slimdiff.compress.prune.select import select
    from slimdiff.compress.prune.slicing import prune
    from slimdiff.compress.prune.units import unit_groups

    from slimdiff.models import get_arch

    arch = get_arch("sdxl")
    groups = unit_groups(arch, unet)
    keep = select(groups, magnitude_scores(groups, unet), sparsity=sparsity, scope="global")
    prune(arch, unet, groups, keep)
    return unet


def time_variant(folder: Path, size: int, repeat: int) -> dict:
    import numpy as np
    from slimdiff.export.onnx import graph_io
    from slimdiff.runtime.backends.ort import OrtBackend

    path = folder / "unet" / "model.onnx"
    t0 = time.perf_counter()
    session = OrtBackend("ort-cpu").load(path)
    load_s = time.perf_counter() - t0
    axes = {"B": 2, "H": size // 8, "W": size // 8, "S": 77}
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in graph_io(path)[0]:
        shape = [d if isinstance(d, int) else axes[d] for d in spec["shape"]]
        feeds[spec["name"]] = rng.standard_normal(shape).astype(spec["dtype"])
    if "timestep" in feeds:
        feeds["timestep"] = np.full(feeds["timestep"].shape, 500, feeds["timestep"].dtype)
    session.run(feeds)  # warm-up: first-run allocations
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        session.run(feeds)
        times.append((time.perf_counter() - t) * 1000)
    info = json.loads((folder / "export.json").read_text())
    return {
        **info,
        "ms_per_step": statistics.median(times),
        "ms_runs": [round(t, 1) for t in times],
        "load_s": round(load_s, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
    }


if __name__ == "__main__":
    main()
