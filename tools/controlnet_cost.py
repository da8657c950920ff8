"""What a ControlNet costs per denoiser step: the bundle's UNet graph alone vs the UNet and
ControlNet graph `export --controlnet` writes, on ORT's CPU EP, same inputs.

    python tools/controlnet_cost.py --model random:sd15 --size 256 --out /tmp/cn-cost

The ControlNet is diffusers' ControlNetModel.from_unet of the model's UNet (what a
ControlNet is trained from: the encoder half, with its weights, and zero convolutions;
all nudged by small random values here, so the residuals are not zero and no weight equals
the UNet's). Both graphs are exported as
`slimdiff export` exports the denoiser (ORT fusions on, fp32 unless --precision), then run
interleaved, one CFG pair (batch 2) of --size pixels per call, after one warm-up each: the
medians and their ratio come from one run on one machine. Exports are kept in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="random:sd15", help="an SD1.5 or SDXL model")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16"))
    p.add_argument("--repeat", type=int, default=5, help="timed rounds after one warm-up")
    p.add_argument("--out", default="controlnet-cost", help="work folder and results.json")
    args = p.parse_args()
    from slimdiff.threads import prepare_process

    prepare_process()  # before torch is imported: OpenMP threads sleep, not spin
    out = Path(args.out)
    result = measure(args.model, args.size, args.precision, args.repeat, out)
    result["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _controlnet(unet, vae_scale: int):
    import torch
    from diffusers import ControlNetModel

    widths = (16, 32, 96, 256)[: vae_scale.bit_length()]  # diffusers' default at scale 8
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=widths)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # trained weights differ from the UNet's they started from (torch.onnx would store
        # equal ones once, and the graph would look smaller than a real one)
        for param in controlnet.parameters():
            param.add_(1e-4 * torch.randn(param.shape, generator=gen))
        for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            block.weight.copy_(1e-3 * torch.randn(block.weight.shape, generator=gen))
    return controlnet.requires_grad_(False).eval()


def measure(model_name: str, size: int, precision: str, repeat: int, out: Path) -> dict:
    import numpy as np
    from slimdiff.export import export_onnx_component
    from slimdiff.export.components import plan_components
    from slimdiff.export.dummy_inputs import Sizes
    from slimdiff.runtime.backends.ort import OrtBackend

    from slimdiff.models import load_model
    from slimdiff.models.vae import vae_scale_factor
    from slimdiff.threads import choose_threads

    out.mkdir(parents=True, exist_ok=True)
    model = load_model(model_name)
    scale = vae_scale_factor(model.pipe.vae.config)
    controlnet = _controlnet(model.denoiser, scale)
    graphs, components, params = {}, {}, {}
    for name, steer in (("unet", None), ("unet+controlnet", controlnet)):
        plan = plan_components(model, controlnets=[steer] if steer is not None else [])
        component = next(c for c in plan if c.name == model.arch.denoiser)
        root = out / name.replace("+", "-")
        path = root / component.name / "model.onnx"
        if not path.exists():
            export_onnx_component(component, root, precision=precision, check=False)
        graphs[name], components[name] = path, component
        params[name] = sum(p.numel() for p in component.module.parameters())
    lat = size // scale
    sizes = Sizes(2, lat, lat, model.arch.text_length(), full_text=True)
    feeds = {k: v.numpy() for k, v in components["unet+controlnet"].make_inputs(sizes).items()}
    threads = choose_threads(params["unet"])
    sessions = {n: OrtBackend("ort-cpu", threads=threads).load(g) for n, g in graphs.items()}
    inputs = {n: {k: feeds[k] for k in components[n].input_names} for n in graphs}
    zero = {**inputs["unet+controlnet"], "conditioning_scale": np.zeros(1, np.float32)}  # (N,)
    # at scale 0 the ControlNet adds nothing: the two graphs must agree (the UNet is shared)
    plain = sessions["unet"].run(inputs["unet"])["out_sample"]
    steered = sessions["unet+controlnet"].run(zero)["out_sample"]
    rel_err = float(np.abs(steered - plain).max() / np.abs(plain).max())
    times: dict[str, list[float]] = {n: [] for n in graphs}
    for _ in range(repeat):
        for name, session in sessions.items():
            t = time.perf_counter()
            session.run(inputs[name])
            times[name].append((time.perf_counter() - t) * 1000)
    ms = {n: statistics.median(ts) for n, ts in times.items()}
    return {
        "model": model_name,
        "size": [size, size],
        "batch": 2,
        "precision": precision,
        "repeat": repeat,
        "threads": threads,
        "params": params,
        "graph_bytes": {n: _bytes(g) for n, g in graphs.items()},
        "ms_per_step": {n: round(v, 1) for n, v in ms.items()},
        "ms_runs": {n: [round(t, 1) for t in ts] for n, ts in times.items()},
        "controlnet_cost": round(ms["unet+controlnet"] / ms["unet"], 3),
        "rel_err_at_scale_0": rel_err,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _bytes(graph: Path) -> int:
    return sum(f.stat().st_size for f in graph.parent.iterdir() if f.is_file())


if __name__ == "__main__":
    main()
