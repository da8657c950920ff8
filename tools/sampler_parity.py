"""EcoDiff's torch sampler against diffusers: per-step error, loop replay, checkpointed grads.

    python tools/sampler_parity.py                  # both tables (about 30 s on 2 cores)
    python tools/sampler_parity.py --only steps     # the per-scheduler table alone

`steps`: every trajectory case of tests/unit/test_sampler.py (the runtime's scheduler
config cases), our sampler against diffusers' scheduler fed the same model outputs and
step noise; the worst per-step error relative to the latent's magnitude, per class.
`ecodiff`: per scheduler, a tiny model's calibration recorded by the diffusers pipeline,
then (1) the stateless loop's final latent against the recorded one and (2) the mask
gradient with time-step checkpointing against plain backprop's (relative L2, λ = 1).
Prints Markdown tables (docs/BENCHMARKS.md quotes them).
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

# The case tables and helpers are the tests'; the numbers are what the tests assert on.
from tests.unit import test_sampler as cases
from tests.unit.test_scheduler_edm import PLAYGROUND

ECODIFF_CASES = [
    ("sd15", "PNDMScheduler", {"skip_prk_steps": True}),
    ("sd15", "EulerAncestralDiscreteScheduler", {}),
    ("sd15", "LCMScheduler", {}),
    ("sd15", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("sd15", "UniPCMultistepScheduler", {}),
    ("sd15", "HeunDiscreteScheduler", {}),
    ("sd15", "KDPM2DiscreteScheduler", {}),
    ("sdxl", "EDMDPMSolverMultistepScheduler", PLAYGROUND),
    ("sdxl", "EDMEulerScheduler", {}),
    ("sdxl", "TCDScheduler", {}),  # calibration.eta 0.3: TCD_ETA
]
TCD_ETA = 0.3  # TCD's gamma for its row above: the authors' suggestion


def _all_cases(limit: int | None):
    """(class, config, steps, set_timesteps kwargs, eta) of test_sampler's cases, the TCD
    ones (whose step takes an eta) after the others."""
    import itertools

    plain = ((cls, c, n, kw, None) for cls, c, n, kw in cases.CASES.values())
    tcd = (("TCDScheduler", c, n, {}, eta) for c, n, eta in cases.TCD_CASES.values())
    return itertools.islice(itertools.chain(plain, tcd), limit)


def step_errors(limit: int | None = None) -> dict[str, tuple[int, float]]:
    """class -> (cases, worst relative per-step error) over test_sampler's cases."""
    import functools

    from slimdiff.sampler import TorchSampler

    worst: dict[str, tuple[int, float]] = {}
    for cls, config, steps, kwargs, eta in _all_cases(limit):
        ref, ours = cases._build(cls, config, steps, kwargs)
        if eta is not None:  # as a pipeline passes it to both
            ref.step = functools.partial(ref.step, eta=eta)
            ours = TorchSampler.from_config({**config, "_class_name": cls}, steps, eta=eta)
        latent, noise = cases._inputs(1)
        x_ref = latent * ours.init_noise_sigma
        saved, final = cases._trajectory(ours, x_ref, noise)
        samples = [x for x, _ in saved[1:]] + [final]
        gen = {}
        if "generator" in inspect.signature(ref.step).parameters:
            gen = {"generator": torch.Generator("cpu").manual_seed(cases.NOISE_SEED)}
        err = 0.0
        for i, t in enumerate(ref.timesteps):
            inp = ref.scale_model_input(x_ref, t) if hasattr(ref, "scale_model_input") else x_ref
            x_ref = ref.step(0.5 * inp + noise, t, x_ref, **gen).prev_sample
            scale = float(x_ref.abs().max()) or 1.0
            err = max(err, float((samples[i] - x_ref).abs().max()) / scale)
        n, w = worst.get(cls, (0, 0.0))
        worst[cls] = (n + 1, max(w, err))
    return worst


def ecodiff_rows(limit: int | None = None) -> list[tuple[str, str, float, float]]:
    import diffusers
    from slimdiff.compress.prune.masks import Masks

    from slimdiff.calib import Calibration
    from slimdiff.models import load_model
    from tests.unit.compress.test_ecodiff_train import SPEC, _gradients, _rel

    rows = []
    for family, name, config in ECODIFF_CASES[:limit]:
        model = load_model(f"tiny:{family}")
        cls = getattr(diffusers, name)
        if name.startswith("EDM"):  # another process: the VP config does not apply
            model.pipe.scheduler = cls(**config)
        else:
            model.pipe.scheduler = cls.from_config({**model.pipe.scheduler.config, **config})
        eta = TCD_ETA if name == "TCDScheduler" else 0.0
        spec = SPEC.model_copy(update={"steps": 4, "eta": eta})
        calib = Calibration(model.pipe, model.arch, spec)
        data = calib.record()
        model.denoiser.eval().requires_grad_(False)
        with torch.no_grad():
            cond = calib.conditioning(0, model.denoiser)
            final = calib.loop(model.denoiser).run(data.noise(0), cond, calib.step_noise(0))
        replay = float((final - data.final(0)).norm() / data.final(0).norm())
        masks = Masks.for_denoiser(model.arch, model.denoiser, init_logit=1.0)
        _, full = _gradients(model, calib, masks, checkpointing=False)
        _, ckpt = _gradients(model, calib, masks, checkpointing=True)
        label = f"{name} {config.get('algorithm_type', '')}".strip() if config else name
        label += f" eta {eta:g}" if eta else ""
        rows.append((f"tiny:{family}", label, replay, _rel(ckpt, full)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=["steps", "ecodiff"])
    p.add_argument("--limit", type=int, default=None, help="first N cases of each table")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.only != "ecodiff":
        print("| scheduler | cases | worst relative error per step |\n|---|---|---|")
        for cls, (n, err) in step_errors(args.limit).items():
            print(f"| {cls} | {n} | {err:.1e} |")
    if args.only != "steps":
        print("| model | scheduler | loop vs recorded | checkpointed vs backprop |")
        print("|---|---|---|---|")
        for model, name, replay, grad in ecodiff_rows(args.limit):
            print(f"| {model} | {name} | {replay:.1e} | {grad:.1e} |")


if __name__ == "__main__":
    main()
