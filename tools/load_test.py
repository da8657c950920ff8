"""ms per denoising step of toy:shapes, quiet and with busy competitors on the same CPUs.

    python tools/load_test.py --bundle /tmp/toyb --competitors 0 1 2 3 --rounds 3 \
        --out /tmp/load-test.json

(`slimdiff export toy:shapes --out /tmp/toyb` makes the bundle.) Two kinds of step:

- torch: the toy:shapes UNet called as diffusers' SDXL pipeline calls it, on a CFG batch
  of 2 at 16x16 latents (`--latent`), under `torch.no_grad`;
- ort: one step of the runtime (`slimdiff.runtime.Text2ImagePipeline`, scheduler and CFG
  included) whose UNet session is built with the configuration's options.

Each configuration (thread count, OpenMP wait policy, ORT spinning; `--list` shows them)
lives in its own child process, because OMP_WAIT_POLICY is read once, when OpenMP starts.
The children load once and then wait (blocked on stdin, using no CPU) for the parent to
ask for a measurement. A competitor is `python -c "while True: pass"` (which also checks,
every few million turns, that its parent is alive, so a killed tool leaves nothing
spinning); the parent starts N of them for each level of `--competitors` and kills them
when the level ends, on Ctrl-C and on SIGTERM. Rounds are the outer loop and
configurations run in a shuffled order in each, so slow drift in the machine's other load
(other users) spreads over every cell alike.

Printed: per configuration and level the median over rounds of each measurement's median
ms/step, the spread (min-max of the rounds' medians), CPU ms used per step (all threads;
spinning shows up here) and the slowdown against the quiet level. `--fresh` restarts the
children at every level, so whatever a configuration decides when it starts, it decides
under that level's load. The "policy" configurations are slimdiff's own (slimdiff/threads.py:
`prepare_process`, `choose_threads`, `configure_torch`, and the runtime's ORT backend).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# What a configuration sets before its child starts; "threads" None is the library's
# default. "policy" configurations use slimdiff.threads as the CLI does.
_CLEAN = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS")
CONFIGS: dict[str, dict] = {
    "torch-t1": {"kind": "torch", "threads": 1},
    "torch-default": {"kind": "torch", "threads": None},
    "torch-default-passive": {"kind": "torch", "threads": None, "omp_wait": "PASSIVE"},
    "torch-t2-spin0": {"kind": "torch", "threads": 2, "spincount": "0"},
    "torch-policy": {"kind": "torch", "policy": True},
    "ort-default": {"kind": "ort", "intra": None, "spin": None},
    "ort-i1": {"kind": "ort", "intra": 1, "spin": None},
    "ort-i2-spin": {"kind": "ort", "intra": 2, "spin": "1"},
    "ort-i2-nospin": {"kind": "ort", "intra": 2, "spin": "0"},
    "ort-policy": {"kind": "ort", "policy": True},
}
DEFAULT_CONFIGS = [name for name in CONFIGS if name != "torch-t2-spin0"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", default="/tmp/toyb", help="toy:shapes bundle (slimdiff export)")
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    p.add_argument("--competitors", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--rounds", type=int, default=3, help="measurements per cell")
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--max-seconds", type=float, default=20.0, help="cap per measurement")
    p.add_argument("--latent", type=int, default=16, help="latent side (16: 64x64 images)")
    p.add_argument("--fresh", action="store_true", help="restart the children at each level")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled order")
    p.add_argument("--out", help="write the raw measurements and the table here (JSON)")
    p.add_argument("--list", action="store_true", help="list the configurations and exit")
    p.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.list:
        for name, cfg in CONFIGS.items():
            print(f"{name:<24} {cfg}")
    elif args.child:
        _child(args)
    else:
        _parent(args)


# ----------------------------------------------------------------------------- parent


def _parent(args) -> None:
    # SIGTERM runs the `finally` below too, so competitors and children are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rng = random.Random(args.seed)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows: list[dict] = []
    competitors: list[subprocess.Popen] = []
    children: dict[str, _Child] = {}
    try:
        if not args.fresh:
            children = _start_children(args)
        for rnd in range(args.rounds):
            for level in args.competitors:
                competitors = _start_competitors(level)
                if args.fresh:
                    children = _start_children(args)
                order = list(args.configs)
                rng.shuffle(order)
                for name in order:
                    res = children[name].measure(args.steps, args.max_seconds)
                    res.update(config=name, competitors=level, round=rnd, **_load_now())
                    rows.append(res)
                    print(
                        f"round {rnd} N={level} {name:<24} {res['ms_median']:8.1f} ms/step "
                        f"({res['cpu_ms_per_step']:.0f} CPU ms) threads={res['threads']}",
                        file=sys.stderr,
                        flush=True,
                    )
                if args.fresh:
                    _stop(children.values())
                _stop_competitors(competitors)
                competitors = []
    finally:
        _stop_competitors(competitors)
        _stop(children.values())
    table = _table(rows, args.configs, args.competitors)
    print(_markdown(table, args.competitors))
    if args.out:
        result = {
            "date": started,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "cpus": sorted(os.sched_getaffinity(0)),
            "latent": args.latent,
            "rows": rows,
            "table": table,
        }
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


# A busy loop that ends when its parent does (it is re-parented, so getppid changes).
_COMPETITOR = """
import os
parent, i = os.getppid(), 0
while True:
    i += 1
    if i % 5_000_000 == 0 and os.getppid() != parent:
        break
"""


def _start_competitors(n: int) -> list[subprocess.Popen]:
    procs = [
        subprocess.Popen([sys.executable, "-c", _COMPETITOR], stdin=subprocess.DEVNULL)
        for _ in range(n)
    ]
    time.sleep(3.0 if n else 0.0)  # let the scheduler settle with them running
    return procs


def _stop_competitors(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait()


class _Child:
    """One configuration's process: loads once, then measures on request."""

    def __init__(self, name: str, args) -> None:
        cfg = CONFIGS[name]
        env = {k: v for k, v in os.environ.items() if k not in (*_CLEAN, "SLIMDIFF_THREADS")}
        env.setdefault("TRANSFORMERS_VERBOSITY", "error")
        if cfg.get("omp_wait"):
            env["OMP_WAIT_POLICY"] = cfg["omp_wait"]
        if cfg.get("spincount"):
            env["GOMP_SPINCOUNT"] = cfg["spincount"]
        cmd = [sys.executable, __file__, "--child", name, "--bundle", args.bundle]
        cmd += ["--latent", str(args.latent)]
        self.name = name
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.info = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                return json.loads(line[3:])
        raise RuntimeError(f"{self.name}: child exited ({self.proc.wait()})")

    def measure(self, steps: int, max_seconds: float) -> dict:
        self.proc.stdin.write(json.dumps({"steps": steps, "max_seconds": max_seconds}) + "\n")
        self.proc.stdin.flush()
        return {**self.info, **self._read()}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _start_children(args) -> dict[str, _Child]:
    return {name: _Child(name, args) for name in args.configs}


def _stop(children) -> None:
    for child in children:
        child.stop()


def _load_now() -> dict:
    load = {"loadavg1": round(os.getloadavg()[0], 2)}
    try:
        some = Path("/proc/pressure/cpu").read_text().split("\n")[0]
        load["psi_some_avg10"] = float(some.split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        pass
    return load


def _table(rows: list[dict], configs: list[str], levels: list[int]) -> dict:
    table: dict = {}
    for name in configs:
        cells = {}
        for level in levels:
            meds = [
                r["ms_median"] for r in rows if r["config"] == name and r["competitors"] == level
            ]
            cpu = [
                r["cpu_ms_per_step"]
                for r in rows
                if r["config"] == name and r["competitors"] == level
            ]
            if meds:
                cells[level] = {
                    "ms": statistics.median(meds),
                    "min": min(meds),
                    "max": max(meds),
                    "cpu_ms": statistics.median(cpu),
                }
        quiet = cells.get(0, {}).get("ms")
        for cell in cells.values():
            cell["ratio"] = cell["ms"] / quiet if quiet else None
        threads = next((r["threads"] for r in rows if r["config"] == name), None)
        table[name] = {"threads": threads, "cells": cells}
    return table


def _markdown(table: dict, levels: list[int]) -> str:
    head = "| config | threads | " + " | ".join(f"N={n}: ms/step (range) CPU ms, x" for n in levels)
    lines = [head + " |", "|---|---|" + "---|" * len(levels)]
    for name, row in table.items():
        cells = []
        for level in levels:
            c = row["cells"].get(level)
            if c is None:
                cells.append("-")
                continue
            ratio = f", **{c['ratio']:.1f}x**" if c["ratio"] is not None and level else ""
            cells.append(f"{c['ms']:.0f} ({c['min']:.0f}-{c['max']:.0f}) {c['cpu_ms']:.0f}{ratio}")
        lines.append(f"| {name} | {row['threads']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- child


def _child(args) -> None:
    cfg = CONFIGS[args.child]
    if cfg.get("policy"):
        from slimdiff import threads

        threads.prepare_process()  # what the CLI does first: the OpenMP environment
    step, info = (_torch_step if cfg["kind"] == "torch" else _ort_step)(cfg, args)
    # ORT steps come from the runtime's own per-step timings, a few steps per pipeline call
    # (its text encoding, once per call, counts in CPU ms only); torch steps one at a time.
    chunk = 1 if cfg["kind"] == "torch" else 5
    _reply(info)
    for line in sys.stdin:
        request = json.loads(line)
        step(2)  # warm-up after idling: caches, thread pools waking up
        times: list[float] = []
        deadline = time.perf_counter() + request["max_seconds"]
        c = time.process_time()
        while len(times) < request["steps"] and (len(times) < 3 or time.perf_counter() < deadline):
            times += step(min(chunk, request["steps"] - len(times)))
        cpu_ms = (time.process_time() - c) * 1e3
        _reply(
            {
                "ms_median": statistics.median(times),
                "ms": [round(t, 2) for t in times],
                "cpu_ms_per_step": cpu_ms / len(times),
            }
        )


def _reply(obj: dict) -> None:
    sys.stdout.write("@@ " + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _torch_step(cfg: dict, args):
    import torch

    from slimdiff.models import load_model

    pipe = load_model("toy:shapes").require_pipeline("load test")
    unet = pipe.unet
    if cfg.get("policy"):
        from slimdiff import threads

        params = sum(p.numel() for p in unet.parameters())
        threads.configure_torch(threads.choose_threads(params))
    elif cfg["threads"] is not None:
        torch.set_num_threads(cfg["threads"])
    g = torch.Generator().manual_seed(0)
    side = args.latent
    sample = torch.randn(2, unet.config.in_channels, side, side, generator=g)  # CFG batch
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    pooled = torch.randn(2, pipe.text_encoder_2.config.projection_dim, generator=g)
    px = side * pipe.vae_scale_factor
    time_ids = torch.tensor([[px, px, 0, 0, px, px]] * 2, dtype=torch.float32)
    t = torch.tensor(500)

    def step(n: int) -> list[float]:
        times = []
        with torch.no_grad():
            for _ in range(n):
                start = time.perf_counter()
                unet(
                    sample,
                    t,
                    encoder_hidden_states=text,
                    timestep_cond=None,
                    cross_attention_kwargs=None,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                    return_dict=False,
                )
                times.append((time.perf_counter() - start) * 1e3)
        return times

    info = {"threads": torch.get_num_threads(), "omp_wait": os.environ.get("OMP_WAIT_POLICY")}
    return step, info


def _ort_step(cfg: dict, args):
    import numpy as np
    import onnxruntime as ort
    from slimdiff.runtime import Text2ImagePipeline
    from slimdiff.runtime.backends.ort import OrtSession

    pipe = Text2ImagePipeline.from_bundle(args.bundle, backend="ort-cpu")
    if not cfg.get("policy"):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if cfg["intra"] is not None:
            options.intra_op_num_threads = cfg["intra"]
        if cfg["spin"] is not None:
            options.add_session_config_entry("session.intra_op.allow_spinning", cfg["spin"])
        path = pipe.denoiser.path
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        pipe.denoiser = OrtSession(session, path)
    side = args.latent
    config = pipe.config  # a dict in manifest schema 1, a pydantic record from 2 on
    scale = config["vae_scale_factor"] if isinstance(config, dict) else config.vae_scale_factor
    px = side * scale
    noise = np.random.default_rng(0).standard_normal((1, 4, side, side)).astype(np.float32)
    prompt = "a red circle at the top"

    def step(n: int) -> list[float]:
        result = pipe(prompt, steps=n, guidance=5.0, size=(px, px), latents=noise, output="latent")
        return result.timings_ms["denoiser_steps"]

    opts = pipe.denoiser._session.get_session_options()
    try:
        spin = opts.get_session_config_entry("session.intra_op.allow_spinning")
    except RuntimeError:  # not set: ORT's default, spinning on
        spin = "default"
    info = {"threads": opts.intra_op_num_threads, "spin": spin}
    return step, info


if __name__ == "__main__":
    main()
