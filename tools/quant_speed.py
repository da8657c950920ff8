"""ORT-CPU speed, size and error of a quantized denoiser against its fp32 graph.

    python tools/quant_speed.py --model random:sd15 --size 256 --out /tmp/quant-speed
    python tools/quant_speed.py --model random:sd15 --weights int4 --out /tmp/quant-w4

The model's pipeline records calibration trajectories (`--prompts` x `--steps` at `--size`
pixels, CFG as the pipeline runs it); the fp32 denoiser is exported, then `quant.quest`
(`--method minmax` by default: plain PTQ, what speed depends on) quantizes it and the
quantized one is exported the way the bundle exporter lowers it (one merged activation
scale per quantizer, int4 weights packed). Both graphs are timed by the runtime's ORT-CPU
session on the same CFG batch, interleaved A B A B; the speedup is the median of the
pairs' ratios. Errors are on the calibration's own denoiser inputs (every recorded step):

    rel err = ||a - b|| / ||b||    (per call, then the mean)

quantized ONNX vs fp32 ONNX (what quantization costs), and quantized ONNX vs the torch
fake-quantized model (what the lowering to integer kernels costs).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="random:sd15")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--weights", default="int8", choices=("int8", "int4"))
    p.add_argument("--activations", default="int8", choices=("int8", "int4", "none"))
    p.add_argument("--method", default="minmax", choices=("minmax", "quest"))
    p.add_argument(
        "--no-finetune",
        action="store_true",
        help="with --method quest: MSE-searched weight and activation ranges only",
    )
    p.add_argument(
        "--finetune-scales",
        type=int,
        default=0,
        metavar="EPOCHS",
        help="with --method quest: MSE ranges, then EPOCHS of QuEST's step-size finetuning "
        "(every activation step size, lr 1e-3, no weights, no sensitivity ranking)",
    )
    p.add_argument("--repeat", type=int, default=5, help="timed pairs after one warm-up")
    p.add_argument("--out", default="quant-speed")
    args = p.parse_args()
    print(json.dumps(run(args), indent=2))


def _feeds(component, data, pair) -> dict:
    import numpy as np

    args, kwargs = data.inputs([pair])
    sample = args[0] if args else kwargs.pop("sample")
    flat = {"sample": sample, **kwargs}
    flat.update(flat.pop("added_cond_kwargs", None) or {})
    batch = sample.shape[0]
    t = flat["timestep"]
    flat["timestep"] = t.reshape(-1).expand(batch) if t.numel() == 1 else t
    return {n: np.ascontiguousarray(flat[n].float().numpy()) for n in component.input_names}


def _export(component, path: Path) -> float:
    from slimdiff.export.components import export_mode
    from slimdiff.export.lowbit import int4_digests, pack_int4_weights
    from slimdiff.export.onnx import PROTOBUF_LIMIT, export_component, load_graph, save_model

    from slimdiff.lowbit import merged_scales

    t0 = time.perf_counter()
    raw = path.parent / "raw" / "model.onnx"
    with export_mode(component, None), merged_scales():
        export_component(component, raw)
    graph = load_graph(raw)
    pack_int4_weights(graph, int4_digests(component.model))
    save_model(graph, path, PROTOBUF_LIMIT)
    shutil.rmtree(raw.parent)
    return time.perf_counter() - t0


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file())


def run(args) -> dict:
    import numpy as np
    import torch
    from slimdiff.compress.quant.quest import QuestPass
    from slimdiff.export.components import denoiser_component
    from slimdiff.export.lowbit import integer_kernels
    from slimdiff.runtime.backends.ort import OrtBackend

    from slimdiff.calib import Calibration
    from slimdiff.lowbit import merged_scales
    from slimdiff.models import load_model
    from slimdiff.recipe import CalibrationSpec

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model)
    pipe, arch = model.pipe, model.arch
    spec = CalibrationSpec(num_prompts=args.prompts, steps=args.steps, size=[args.size] * 2)
    calib = Calibration(pipe, arch, spec, work_dir=out / "work")
    data = calib.record()
    pairs = [data.pair(i) for i in range(len(data))]
    unet = getattr(pipe, arch.denoiser).eval()
    fp32 = denoiser_component(arch, unet)
    feeds = [_feeds(fp32, data, pair) for pair in pairs]
    fp32_path = out / "fp32" / "model.onnx"
    export_fp32_s = _export(fp32, fp32_path)

    finetune = {}
    if args.no_finetune or args.finetune_scales:
        finetune = {"time_layers": False, "sensitive": 0, "epochs": args.finetune_scales}
        finetune.update(batch=2, lr_scales=1e-3)
    cfg = QuestPass.Config(
        weights=args.weights, activations=args.activations, method=args.method, finetune=finetune
    )
    t0 = time.perf_counter()
    report = QuestPass(cfg).apply(pipe, calib)
    quant_s = time.perf_counter() - t0
    quant = denoiser_component(arch, getattr(pipe, arch.denoiser))
    with torch.inference_mode(), merged_scales():
        fake = [
            quant.module(*(torch.from_numpy(f[n]) for n in quant.input_names)).numpy()
            for f in feeds
        ]
    q_path = out / "quant" / "model.onnx"
    export_q_s = _export(quant, q_path)
    del pipe, model, unet, quant, fp32

    backend = OrtBackend("ort-cpu")
    a, b = backend.load(fp32_path), backend.load(q_path)
    ref = [next(iter(a.run(f).values())) for f in feeds]
    got = [next(iter(b.run(f).values())) for f in feeds]

    def rel(x, y):
        return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-12))

    timed = feeds[0]
    a.run(timed), b.run(timed)  # warm-up
    ratios, ta, tb = [], [], []
    for _ in range(args.repeat):
        t = time.perf_counter()
        a.run(timed)
        ta.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        b.run(timed)
        tb.append((time.perf_counter() - t) * 1000)
        ratios.append(ta[-1] / tb[-1])
    result = {
        "model": args.model,
        "size": args.size,
        "batch": int(timed[next(iter(timed))].shape[0]),
        "quant": {
            "weights": args.weights,
            "activations": args.activations,
            "method": args.method,
            "finetune": "none"
            if args.no_finetune
            else (f"scales, {args.finetune_scales} epochs" if args.finetune_scales else "quest"),
        },
        "fp32_ms": statistics.median(ta),
        "quant_ms": statistics.median(tb),
        "speedup": statistics.median(ratios),
        "ratios": [round(r, 3) for r in ratios],
        "rel_err_vs_fp32_onnx": statistics.mean(rel(g, r) for g, r in zip(got, ref, strict=True)),
        "rel_err_vs_fake_quant_torch": statistics.mean(
            rel(g, f) for g, f in zip(got, fake, strict=True)
        ),
        "fake_quant_rel_err_vs_fp32": statistics.mean(
            rel(f, r) for f, r in zip(fake, ref, strict=True)
        ),
        "eval_calls": len(feeds),
        "fp32_bytes": _bytes(fp32_path),
        "quant_bytes": _bytes(q_path),
        "kernels": integer_kernels(q_path),
        "seconds": {"export_fp32": export_fp32_s, "quantize": quant_s, "export_quant": export_q_s},
        "pass_summary": {k: v for k, v in report.summary.items() if k != "sensitivity"},
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
    }
    result["bytes_ratio"] = result["quant_bytes"] / result["fp32_bytes"]
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
