"""Peak memory of one EcoDiff mask-learning iteration against the number of denoising steps.

    python tools/ecodiff_memory.py --out /tmp/ecodiff-memory

One iteration is one `mask_gradients` call (compress/prune/train.py): a whole masked
trajectory of `random:sd15` (SD1.5's architecture at full width, 860M-parameter UNet,
seeded random weights, nothing downloaded), one prompt at `--size` pixels with CFG (UNet
batch 2), its loss against the teacher's final latent and the gradient of every mask
logit. It runs with time-step gradient checkpointing at each of `--steps` and by plain
backprop at each of `--plain-steps` until the first that does not fit in `--max-gib`
(more steps need more memory still: they are recorded as not run).

Each measurement is its own child process (`--child`), so one run's heap is not the next
one's baseline. The child builds the pipeline, records the teacher's trajectory (that costs
memory too, and is not what is measured), builds the masks, collects garbage and returns
freed heap to the system (`malloc_trim`), then reads its resident set size: the baseline.
During the `mask_gradients` call a thread samples VmRSS from /proc/self/statm every
`--sample-ms` ms. Linux cannot reset a process's high-water mark (ru_maxrss), so the
sampled maximum is the iteration's peak; where the high-water mark rose during the call
(the iteration outgrew setup, as it does for the full-width model) the kernel's value is
exact and is used instead (`peak_source`: "kernel"; "sampled" otherwise, which can miss a
spike shorter than the sampling interval). `delta_gib` is peak minus baseline: the
iteration's own memory; `peak_rss_gib` includes the whole pipeline's weights (fp32 UNet
3.4 GB, text encoder, VAE), as a mask-learning run holds them.

The parent reads each child's VmRSS every 20 ms and kills it (SIGKILL) once it passes
`--max-gib`, recording "out of memory at N steps" instead of letting the machine swap or
the kernel's OOM killer pick a process; a child the kernel killed is recorded the same way.
results.json is rewritten after every child, so a long run interrupted keeps what it
measured. `--tiny` is a smoke run: tiny:sd15 at 64x64 (tests/integration).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import hashlib
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 1024**3
PAGE = os.sysconf("SC_PAGE_SIZE")
PROMPT = "a photograph of an astronaut riding a horse"
SOURCE_DIRS = ("slimdiff", "compress", "export", "runtime", "tools")  # not .venv
WATCH_S = 0.02  # the parent's look at a child's RSS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[4, 8, 16, 32],
        help="step counts with time-step gradient checkpointing",
    )
    p.add_argument(
        "--plain-steps",
        type=int,
        nargs="*",
        default=[4, 8, 16, 32],
        help="step counts by plain backprop, in order, up to the first that is out of memory",
    )
    p.add_argument("--size", type=int, default=None, help="image side (256; --tiny: 64)")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale (> 1: batch 2)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument(
        "--max-gib",
        type=float,
        default=20.0,
        help="kill a child whose resident memory passes this (GiB)",
    )
    p.add_argument("--sample-ms", type=float, default=2.0, help="the child's RSS sampling")
    p.add_argument("--out", default="ecodiff-memory", help="folder for results.json")
    p.add_argument("--tiny", action="store_true", help="tiny:sd15 at 64x64 (a smoke run)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", choices=("on", "off"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.size is None:
        args.size = 64 if args.tiny else 256
    if args.child:
        print(json.dumps(measure(args, args.run_steps, args.checkpointing == "on")), flush=True)
    else:
        run_all(args, Path(args.out))


# ------------------------------------------------------------------------------ parent


def run_all(args, out: Path) -> None:
    """Every (checkpointing, steps) in its own child, one at a time; then the table."""
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "model": _model(args),
        "size": [args.size, args.size],
        "guidance": args.guidance,
        "batch": 2 if args.guidance > 1 else 1,
        "threads": args.threads,
        "max_gib": args.max_gib,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": _machine(),
        "runs": [],
    }
    plan = [(True, s) for s in args.steps] + [(False, s) for s in args.plain_steps]
    out_of_memory_plain = None
    for checkpointing, steps in plan:
        if not checkpointing and out_of_memory_plain is not None:
            row = {
                "checkpointing": False,
                "steps": steps,
                "status": "not run",
                "note": f"plain backprop was out of memory at {out_of_memory_plain} steps",
            }
        else:
            row = _child(args, steps, checkpointing)
            if not checkpointing and row["status"] == "out of memory":
                out_of_memory_plain = steps
        result["runs"].append(row)
        print(_describe(row), flush=True)
        result["ratios"] = _ratios(result["runs"])
        _write_json(out / "results.json", result)
    codes = {r["code"] for r in result["runs"] if r["status"] == "ok"}
    if len(codes) > 1:
        print(f"warning: the rows ran different code (source hashes {sorted(codes)})")
    print()
    print(table(result))
    failed = [r for r in result["runs"] if r["status"] == "failed"]
    if failed:
        sys.exit(f"{len(failed)} measurement(s) failed; see stderr_tail in {out / 'results.json'}")


def _child(args, steps: int, checkpointing: bool) -> dict:
    """Run one measurement; kill it past --max-gib. Its JSON line, or what stopped it."""
    cmd = [sys.executable, __file__, "--child", "--run-steps", str(steps)]
    cmd += ["--checkpointing", "on" if checkpointing else "off", "--size", str(args.size)]
    cmd += ["--guidance", str(args.guidance), "--threads", str(args.threads)]
    cmd += ["--sample-ms", str(args.sample_ms)] + ["--tiny"] * args.tiny
    row = {"checkpointing": checkpointing, "steps": steps}
    cap = int(args.max_gib * GIB)
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, seen = False, 0
    # Pipes drain in threads: a child blocked on a full stderr pipe would never finish.
    streams: dict[str, str] = {}
    readers = [
        threading.Thread(target=lambda n=n, s=s: streams.__setitem__(n, s.read()), daemon=True)
        for n, s in (("stdout", child.stdout), ("stderr", child.stderr))
    ]
    for r in readers:
        r.start()
    while child.poll() is None:
        rss = _rss_of(child.pid)
        seen = max(seen, rss)
        if rss > cap:
            child.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(WATCH_S)
    child.wait()
    for r in readers:
        r.join()
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    if killed or child.returncode == -signal.SIGKILL:
        by = (
            f"killed at {seen / GIB:.2f} GiB > --max-gib {args.max_gib}"
            if killed
            else ("killed by the system (SIGKILL: the kernel's OOM killer)")
        )
        return {
            **row,
            "status": "out of memory",
            "note": f"out of memory at {steps} steps: {by}",
            "rss_when_stopped_gib": round(seen / GIB, 2),
        }
    if child.returncode != 0:
        tail = streams.get("stderr", "").strip().splitlines() or [""]
        return {
            **row,
            "status": "failed",
            "note": f"failed (exit {child.returncode}): {tail[-1]}",
            "stderr_tail": "\n".join(tail[-30:]),
        }
    return {**row, "status": "ok", **json.loads(streams["stdout"].strip().splitlines()[-1])}


def _rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (FileNotFoundError, ProcessLookupError, IndexError):  # it just exited
        return 0


def _ratios(runs: list[dict]) -> dict:
    """Checkpointed largest / smallest step count: total peak and the iteration's own."""
    ok = {r["steps"]: r for r in runs if r["checkpointing"] and r["status"] == "ok"}
    if len(ok) < 2:
        return {}
    lo, hi = ok[min(ok)], ok[max(ok)]
    return {
        "steps": [lo["steps"], hi["steps"]],
        "peak_rss": round(hi["peak_rss_gib"] / lo["peak_rss_gib"], 3),
        "delta": round(hi["delta_gib"] / lo["delta_gib"], 3) if lo["delta_gib"] > 0 else None,
    }


def table(result: dict) -> str:
    """The markdown table docs/BENCHMARKS.md quotes, and the ratio line."""
    lines = [
        "| checkpointing | steps | peak RSS (GiB) | over baseline (GiB) | baseline (GiB) "
        "| setup peak (GiB) | mask_gradients (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        ckpt = "yes" if r["checkpointing"] else "no"
        if r["status"] != "ok":
            lines.append(f"| {ckpt} | {r['steps']} | {r['note']} | | | | |")
            continue
        lines.append(
            f"| {ckpt} | {r['steps']} | {r['peak_rss_gib']:.2f} | {r['delta_gib']:.2f} "
            f"| {r['baseline_gib']:.2f} | {r['setup_peak_gib']:.2f} | {r['seconds']:.0f} |"
        )
    ratios = result.get("ratios") or {}
    if ratios:
        lo, hi = ratios["steps"]
        delta = f"{ratios['delta']:.2f}x" if ratios["delta"] is not None else "-"
        verdict = "<=" if ratios["peak_rss"] <= 1.2 else ">"
        lines += [
            "",
            f"checkpointed {hi} steps / {lo} steps: peak RSS {ratios['peak_rss']:.3f}x "
            f"({verdict} 1.2x), over baseline {delta}",
        ]
    return "\n".join(lines)


def _describe(row: dict) -> str:
    name = f"{'checkpointed' if row['checkpointing'] else 'plain'} {row['steps']} steps"
    if row["status"] != "ok":
        return f"{name}: {row['note']}"
    return (
        f"{name}: peak {row['peak_rss_gib']:.2f} GiB ({row['peak_source']}), "
        f"+{row['delta_gib']:.2f} over baseline, {row['seconds']:.0f} s"
    )


def _model(args) -> str:
    return "tiny:sd15" if args.tiny else "random:sd15"


def _machine() -> dict:
    name = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": name,
        "cpus": os.cpu_count(),
        "memory_gib": round(mem / GIB, 1),
        "kernel": platform.release(),
    }


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------- child


class _PeakSampler:
    """Max VmRSS of this process while the block runs, read every `interval_s`."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s, self.peak = interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with open("/proc/self/statm") as f:
            while not self._stop.is_set():
                f.seek(0)
                self.peak = max(self.peak, int(f.read().split()[1]) * PAGE)
                time.sleep(self.interval_s)

    def __enter__(self) -> _PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _release_heap() -> None:
    """Freed memory back to the system, so the baseline is what is live, not what glibc
    kept of the teacher run's buffers (the iteration could reuse those unseen)."""
    gc.collect()
    # Not glibc: nothing to call, and the baseline may include free heap.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _code_hash() -> str:
    """SHA-256 (12 hex digits) of the project's source files this child imported: rows
    measured while someone edited the code show it."""
    files = set()
    for module in list(sys.modules.values()):
        name = getattr(module, "__file__", None)
        path = Path(name) if name else None
        if path is None or not path.is_absolute() or not path.is_file():
            continue  # namespace packages, built-ins, frozen or generated modules
        rel = path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else None
        if rel is not None and rel.parts[0] in SOURCE_DIRS:
            files.add(rel)
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(str(rel).encode() + b"\0" + (ROOT / rel).read_bytes())
    return h.hexdigest()[:12]


def measure(args, steps: int, checkpointing: bool) -> dict:
    """Build, calibrate, then time and measure one mask_gradients call (see module)."""
    from slimdiff.threads import prepare_process

    prepare_process()  # before torch: OpenMP threads sleep while they wait
    import torch
    from slimdiff.compress.prune.masks import Masks
    from slimdiff.compress.prune.train import mask_gradients

    from slimdiff.calib import Calibration
    from slimdiff.models import load_model
    from slimdiff.recipe import CalibrationSpec
    from slimdiff.threads import configure_torch

    configure_torch(args.threads)
    t0 = time.perf_counter()
    model = load_model(_model(args))
    spec = CalibrationSpec(
        prompts=[PROMPT],
        num_prompts=1,
        steps=steps,
        size=(args.size, args.size),
        guidance=args.guidance,
    )
    calib = Calibration(model.pipe, model.arch, spec)
    data = calib.record()
    den = model.denoiser.eval().requires_grad_(False)
    masks = Masks.for_denoiser(model.arch, den)
    loop, cond = calib.loop(den), calib.conditioning(0, den)
    noise, target = data.noise(0), data.final(0)
    setup_s = time.perf_counter() - t0
    _release_heap()
    baseline, setup_peak = _rss(), _maxrss()
    with _PeakSampler(args.sample_ms / 1000) as sampler:
        t = time.perf_counter()
        loss, grads = mask_gradients(
            loop, masks, cond, noise, target, 0, 0.5, checkpointing, step_noise=calib.step_noise(0)
        )
        seconds = time.perf_counter() - t
    lifetime_peak = _maxrss()
    # The high-water mark rose during the call: the iteration's peak is it, exactly.
    exact = lifetime_peak > setup_peak
    peak = lifetime_peak if exact else sampler.peak
    if not all(torch.isfinite(g).all() for g in grads.values()):
        raise RuntimeError("a mask gradient is not finite")
    return {
        "steps": steps,
        "checkpointing": checkpointing,
        "peak_rss_gib": round(peak / GIB, 3),
        "delta_gib": round((peak - baseline) / GIB, 3),
        "baseline_gib": round(baseline / GIB, 3),
        "setup_peak_gib": round(setup_peak / GIB, 3),  # ru_maxrss before the call
        "sampled_peak_gib": round(sampler.peak / GIB, 3),
        "peak_source": "kernel" if exact else "sampled",
        "seconds": round(seconds, 1),
        "setup_s": round(setup_s, 1),
        "loss": loss,
        "cfg": calib.do_cfg,
        "mask_units": sum(g.numel() for g in grads.values()),
        "denoiser_params": sum(p.numel() for p in den.parameters()),
        "torch_threads": torch.get_num_threads(),
        "code": _code_hash(),
    }


if __name__ == "__main__":
    main()
