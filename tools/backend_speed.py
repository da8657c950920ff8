"""ms per denoiser step on the CPU: ORT (the ONNX bundle's graph), the AOTInductor package
and torch eager, on the same inputs.

    python tools/backend_speed.py --model toy:shapes --size 64 --out /tmp/backend-speed
    python tools/backend_speed.py --model random:sd15 --size 256 --out /tmp/backend-sd15

One CFG pair (batch 2) of `--size` pixels with the model's full text length. The ONNX graph
is the bundle's (`export_bundle`, ORT fusions on, as `slimdiff export` writes it), the
package is `--target aoti`'s (export/aoti.py, compiled once: minutes for a real UNet), and
eager is the same torch module in inference mode. The three run interleaved, one step each
per round after one warm-up each, so load from other processes falls on all of them alike;
the medians and their ratios come from one run, on one machine. Every backend gets its
threads from slimdiff.threads (the same count for all three). Outputs are checked against
eager before timing (rel err in the results). Exports are kept in --out and reused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BACKENDS = ("ort-cpu", "aoti", "eager")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="toy:shapes", help="toy:shapes, random:sd15, ...")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--repeat", type=int, default=10, help="timed rounds after one warm-up")
    p.add_argument("--out", default="backend-speed", help="work folder and results.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # compile progress
    from slimdiff.threads import prepare_process

    prepare_process()  # before torch is imported: OpenMP threads sleep, not spin
    result = measure(args.model, args.size, args.repeat, Path(args.out))
    result["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    (Path(args.out) / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def measure(model_name: str, size: int, repeat: int, out: Path) -> dict:
    import numpy as np
    import torch
    from slimdiff.export import export_bundle
    from slimdiff.export.aoti import export_aoti_component
    from slimdiff.export.components import eval_mode, plan_components
    from slimdiff.export.dummy_inputs import Sizes
    from slimdiff.export.profiles import size_range
    from slimdiff.runtime.backends.aoti import AotiBackend
    from slimdiff.runtime.backends.ort import OrtBackend

    from slimdiff.models import load_model
    from slimdiff.threads import choose_threads, configure_torch

    out.mkdir(parents=True, exist_ok=True)
    model = load_model(model_name)
    component = next(c for c in plan_components(model) if c.name == model.arch.denoiser)
    onnx_path = out / "onnx" / component.name / "model.onnx"
    package = out / "aoti" / component.name / "model.pt2"
    compile_s = None
    if not onnx_path.exists():
        export_bundle(model, out / "onnx")
    if not package.exists():
        t0 = time.perf_counter()
        export_aoti_component(component, out / "aoti", precision="fp32", check=True)
        compile_s = round(time.perf_counter() - t0, 1)

    scale = size_range(model).vae_scale
    sizes = Sizes(2, size // scale, size // scale, model.arch.text_length(), full_text=True)
    feeds = component.make_inputs(sizes)
    args = [feeds[n] for n in component.input_names]
    numpy_feeds = {k: v.numpy() for k, v in feeds.items()}
    params = sum(p.numel() for p in component.module.parameters())
    threads = choose_threads(params)
    configure_torch(threads)
    ort = OrtBackend("ort-cpu", threads=threads).load(onnx_path)
    aoti = AotiBackend(device="cpu", threads=threads).load(package)

    def eager() -> np.ndarray:
        with eval_mode(component), torch.inference_mode():
            return component.module(*args).numpy()

    runs = {
        "ort-cpu": lambda: ort.run(numpy_feeds)["out_sample"],
        "aoti": lambda: aoti.run(numpy_feeds)["out_sample"],
        "eager": eager,
    }
    reference = eager()
    rel_err = {}
    for name, run in runs.items():  # also the warm-up
        got = run()
        rel_err[name] = float(np.abs(got - reference).max() / np.abs(reference).max())
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - t) * 1000)
    ms = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "model": model_name,
        "denoiser": component.name,
        "params": params,
        "size": [size, size],
        "batch": 2,
        "inputs": {k: list(v.shape) for k, v in feeds.items()},
        "repeat": repeat,
        "threads": threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "aoti_compile_s": compile_s,  # None: the package was already in --out
        "backends": {
            name: {
                "ms_per_step": round(ms[name], 2),
                "ms_runs": [round(t, 2) for t in times[name]],
                "rel_err_vs_eager": rel_err[name],
            }
            for name in runs
        },
        "ratios": {
            "aoti_speedup_vs_ort": round(ms["ort-cpu"] / ms["aoti"], 3),
            "aoti_speedup_vs_eager": round(ms["eager"] / ms["aoti"], 3),
            "ort_speedup_vs_eager": round(ms["eager"] / ms["ort-cpu"], 3),
        },
    }


if __name__ == "__main__":
    main()
