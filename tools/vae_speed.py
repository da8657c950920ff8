"""ORT-CPU ms per VAE decode: SDXL's VAE decoder against a TAESD-style tiny decoder.

    python tools/vae_speed.py --sizes 512 1024 --repeat 3 --out /tmp/vae-speed

`sdxl-vae`: random:sdxl's AutoencoderKL (SDXL's VAE architecture, seeded random weights);
`taesd`: diffusers' AutoencoderTiny at its default config, which is TAESD's / TAESDXL's
(madebyollin/taesd*; `vae.replace` swaps one in). Weights do not change speed. Each
decoder is exported with slimdiff's exporter (post_quant_conv + decoder, as in a bundle),
without ORT's fusions, and timed by the runtime's ORT-CPU session on one image; also
counted: parameters and FLOPs per decode (slimdiff.inspect.count_flops). Prints a table
and writes results.json; ratios are from one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DECODERS = ("sdxl-vae", "taesd")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--decoders", nargs="+", choices=DECODERS, default=list(DECODERS))
    p.add_argument("--sizes", nargs="+", type=int, default=[512], help="image sides, pixels")
    p.add_argument("--repeat", type=int, default=3, help="timed runs after one warm-up")
    p.add_argument("--out", default="vae-speed", help="work folder and results.json")
    p.add_argument("--smoke", action="store_true", help="tiny:sdxl's VAE for sdxl-vae (tests)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {name: measure(name, out, args) for name in args.decoders}
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(sys.argv),
        "repeat": args.repeat,
        "decoders": rows,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| decoder | params | size | GFLOPs | ms (median) | speedup vs sdxl-vae |")
    print("|---|---|---|---|---|---|")
    base = rows.get("sdxl-vae")
    for name, row in rows.items():
        for size, cell in row["sizes"].items():
            speedup = base["sizes"][size]["ms"] / cell["ms"] if base else None
            shown = f"{speedup:.1f}x" if speedup else "-"
            print(
                f"| {name} | {row['params']:,} | {size} | {cell['gflops']:.0f} | "
                f"{cell['ms']:.0f} | {shown} |"
            )


def _decoder(name: str, smoke: bool):
    import torch
    from diffusers import AutoencoderTiny

    from slimdiff.models.builtin import sdxl_vae

    torch.manual_seed(0)
    vae = sdxl_vae(smoke) if name == "sdxl-vae" else AutoencoderTiny()
    return vae.eval().requires_grad_(False)


def measure(name: str, out: Path, args) -> dict:
    import numpy as np
    import torch
    from slimdiff.export.components import export_mode, vae_decoder_component
    from slimdiff.export.onnx import export_component
    from slimdiff.runtime.backends.ort import OrtBackend

    from slimdiff.inspect import count_flops
    from slimdiff.models import get_arch
    from slimdiff.models.vae import decoder_params, vae_scale_factor

    vae = _decoder(name, args.smoke)
    params = decoder_params(vae)
    # the decoder as a bundle exports it; both decoders take SDXL's 4-channel latents
    component = vae_decoder_component(get_arch("sdxl"), vae)
    path = out / name / "model.onnx"
    with export_mode(component, None):
        export_component(component, path)
    session = OrtBackend("ort-cpu").load(path)
    scale = vae_scale_factor(vae.config)
    sizes = {}
    for size in args.sizes:
        shape = (1, vae.config.latent_channels, size // scale, size // scale)
        latents = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        with torch.no_grad():
            flops = count_flops(vae.decode, torch.from_numpy(latents))[0]
        session.run({"latent_sample": latents})  # warm-up
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            session.run({"latent_sample": latents})
            times.append((time.perf_counter() - t0) * 1e3)
        sizes[str(size)] = {"ms": statistics.median(times), "gflops": flops / 1e9}
        print(f"{name} {size}px: {sizes[str(size)]['ms']:.0f} ms", flush=True)
    return {"params": params, "sizes": sizes}


if __name__ == "__main__":
    main()
