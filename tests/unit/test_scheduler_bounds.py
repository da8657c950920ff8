"""Scheduler configs and step counts that diffusers' schedules cannot take are refused in one
line before any graph runs: sizes out of bounds, a malformed `_use_default_values`, and step
counts whose timesteps leave the training range or repeat one (diffusers fails there with an
IndexError or NaN; checked against diffusers 0.42 for every ported VP preset, spacing and
steps_offset 0/1 at 999 and 1000 steps of 1000).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from slimdiff.runtime.schedulers import (
    SCHEDULER_ALIASES,
    SPACING_CLASSES,
    scheduler_from_config,
    switch_scheduler,
    takes_noise,
    with_spacing,
)
from slimdiff.runtime.schedulers._common import sigma_to_t

from tests.unit.bundle_tampering import SCHED

# SD1.5's scheduler config: "leading" spacing with steps_offset 1
SD15 = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "skip_prk_steps": True,
}
TRAIN_BOUND = "use a whole number from 1 to 100000"


def _config(name: str, spacing: str | None = None, **changes) -> dict:
    config = switch_scheduler({**SD15, **changes}, name)
    return with_spacing(config, spacing) if spacing else config


def _final_latent(scheduler, steps: int) -> np.ndarray:
    """A whole trajectory with a stand-in denoiser (eps = x / 2), from seeded noise."""
    scheduler.set_timesteps(steps)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 4, 4), dtype=np.float32) * np.float32(scheduler.init_noise_sigma)
    for i in range(len(scheduler.timesteps)):
        eps = np.float32(0.5) * scheduler.scale_model_input(x, i)
        if takes_noise(scheduler, i):
            x = scheduler.step(eps, i, x, noise=rng.standard_normal(x.shape, dtype=np.float32))
        else:
            x = scheduler.step(eps, i, x)
    return x


# ---------------------------------------------------------------- sizes in the config


@pytest.mark.parametrize("value", [10**9, 10**8, 100_001, 0, -5, True, 1000.5, "1000", None])
def test_num_train_timesteps_out_of_bounds_is_refused(value):
    with pytest.raises(ValueError, match=rf"^num_train_timesteps=.*: {TRAIN_BOUND} "):
        scheduler_from_config({**SD15, "num_train_timesteps": value})


@pytest.mark.parametrize("name", ["dpm++sde", "dpm2-a-karras", "euler-karras", "dpm++2m", "lms"])
def test_the_largest_num_train_timesteps_builds_in_little_memory(name):
    # DPM++ SDE builds a schedule of num_train_timesteps steps when it is made, and every
    # Karras or midpoint schedule interpolates timesteps: (100000 x 100000) floats before
    start = time.perf_counter()
    # betas scaled down as for a 100x longer schedule, so that alpha-bar stays above 0
    scaled = {"beta_start": SD15["beta_start"] / 100, "beta_end": SD15["beta_end"] / 100}
    scheduler = scheduler_from_config(_config(name, num_train_timesteps=100_000, **scaled))
    scheduler.set_timesteps(1000)
    assert len(scheduler.timesteps) == 1000 * scheduler.order - (scheduler.order - 1)
    assert time.perf_counter() - start < 10  # seconds; minutes and gigabytes before


def test_sigma_to_t_is_diffusers_dense_formula():
    def dense(sigma, log_sigmas):  # diffusers' _sigma_to_t
        log_sigma = np.log(np.maximum(sigma, 1e-10))
        dists = log_sigma - log_sigmas[:, np.newaxis]
        low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
        return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape)

    rng = np.random.default_rng(0)
    with np.errstate(all="ignore"):
        for trial in range(60):
            n = int(rng.integers(2, 40))
            table = rng.normal(size=n)
            if trial % 3:  # ascending, ties included, as training sigmas are
                table = np.sort(rng.choice(table, size=n))
            if trial % 5 == 0:
                table[-3:] = np.inf  # alpha-bars that underflowed to 0
            sigma = np.exp(np.concatenate([rng.normal(size=12) * 2, table[:4], [np.nan]]))
            np.testing.assert_array_equal(sigma_to_t(sigma, table), dense(sigma, table))


@pytest.mark.parametrize(
    "betas",
    [[0.01] * 10, [0.01] * 1001, [[0.01] * 1000], [1.5] * 1000, [-0.01] * 1000, ["a"] * 1000],
)
def test_trained_betas_must_be_one_per_training_step_in_0_1(betas):
    with pytest.raises(ValueError, match=r"trained_betas must list num_train_timesteps \(1000\)"):
        scheduler_from_config({**SD15, "trained_betas": betas})


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
@pytest.mark.parametrize(
    ("key", "value"), [("beta_end", float("inf")), ("beta_start", -1.0), ("beta_end", 2.0)]
)
def test_beta_ends_outside_0_1_are_refused(schedule, key, value):
    # diffusers samples NaN from these (a negative end: scaled_linear's root is complex)
    config = {**SD15, "beta_schedule": schedule, key: value}
    with pytest.raises(ValueError, match=rf"^PNDMScheduler: {key}=.* must be a number in \[0, 1\)"):
        scheduler_from_config(config)


def test_trained_betas_of_the_right_length_are_used():
    betas = np.linspace(0.00085, 0.012, 1000).tolist()
    scheduler = scheduler_from_config({**SD15, "trained_betas": betas})
    expected = np.cumprod(1 - np.array(betas, dtype=np.float32).astype(np.float64))
    np.testing.assert_allclose(scheduler.alphas_cumprod, expected, rtol=1e-6)


@pytest.mark.parametrize("value", [[["x"]], ["beta_end", 3], "beta_end", {"a": 1}])
def test_use_default_values_must_list_key_names(value):
    config = {**SD15, "_use_default_values": value}
    for build in (scheduler_from_config, lambda c: switch_scheduler(c, "euler-a")):
        with pytest.raises(ValueError, match=r"^_use_default_values must be a list of config"):
            build(config)


def test_use_default_values_still_drops_the_keys_it_names():
    config = {**SD15, "_use_default_values": ["timestep_spacing"]}
    assert "timestep_spacing" not in switch_scheduler(config, "euler-a")


# ---------------------------------------------------------------- step counts


# (preset, spacing, steps_offset, steps) that diffusers 0.42 fails on (IndexError or NaN):
# SD1.5's 1000 "leading" steps put a step at timestep 1000; the multistep solvers' leading
# spacing takes n + 1 points (at 999 past the range, at 1000 all on one timestep) and their
# "linspace" rounds 1001 points onto 1000 timesteps
MULTISTEP_REFUSED = [("leading", 1, 999), ("leading", 1, 1000), ("leading", 0, 1000)]
MULTISTEP_REFUSED += [("linspace", offset, 1000) for offset in (0, 1)]
REFUSED = {
    *[(p, "leading", 1, 1000) for p in ("pndm", "ddim", "ddpm", "lms", "dpm++sde")],
    *[(p, *c) for p in ("dpm++2m", "dpm++2m-sde", "deis", "unipc") for c in MULTISTEP_REFUSED],
}
VP_PRESETS = [n for n in SCHEDULER_ALIASES if not n.startswith(("flow", "edm", "lcm", "tcd"))]


@pytest.mark.parametrize("name", VP_PRESETS)
def test_steps_up_to_num_train_timesteps_are_refused_exactly_where_diffusers_fails(name):
    spaced = _config(name)["_class_name"] in SPACING_CLASSES
    for spacing in ("leading", "trailing", "linspace") if spaced else (None,):
        for offset in (0, 1):
            for steps in (999, 1000):
                scheduler = scheduler_from_config(_config(name, spacing, steps_offset=offset))
                case = (name, spacing, offset, steps)
                if case not in REFUSED:
                    scheduler.set_timesteps(steps)
                    continue
                with pytest.raises(ValueError, match="where diffusers fails") as caught:
                    scheduler.set_timesteps(steps)
                # the count it suggests works, and so does "trailing" spacing
                most = int(re.search(r"use at most (\d+) steps", str(caught.value)).group(1))
                assert most in (998, 999), case
                scheduler.set_timesteps(most)
                trailing = scheduler_from_config(_config(name, "trailing", steps_offset=offset))
                trailing.set_timesteps(steps)


@pytest.mark.parametrize(
    ("name", "spacing", "steps", "calls"),
    [
        ("pndm", "leading", 1000, 3),  # IndexError after the first call
        ("ddim", "leading", 1000, 1),  # IndexError
        ("lms", "leading", 1000, 3),  # NaN: a Lagrange denominator of 0
        ("dpm++sde", "leading", 1000, 2),  # NaN: a Brownian interval of 0
        ("unipc", "leading", 999, 3),
        ("deis", "linspace", 1000, 520),  # NaN where timestep 500 repeats
    ],
)
def test_diffusers_fails_on_what_is_refused(name, spacing, steps, calls):
    config = _config(name, spacing)
    with pytest.raises(ValueError, match="where diffusers fails"):
        scheduler_from_config(config).set_timesteps(steps)
    cls = getattr(diffusers, config["_class_name"])
    scheduler = cls.from_config({k: v for k, v in config.items() if k != "_class_name"})
    scheduler.set_timesteps(steps)
    x = torch.randn((1, 4, 4, 4), generator=torch.Generator().manual_seed(0))
    x = x * scheduler.init_noise_sigma
    with pytest.raises((IndexError, FloatingPointError)):
        for t in scheduler.timesteps[:calls]:
            x = scheduler.step(0.5 * scheduler.scale_model_input(x, t), t, x).prev_sample
            if not torch.isfinite(x).all():
                raise FloatingPointError(f"non-finite latents after timestep {t}")


def test_pndm_at_1000_steps_names_the_fix():
    with pytest.raises(ValueError) as caught:
        scheduler_from_config(SD15).set_timesteps(1000)
    assert str(caught.value) == (
        "1000 'leading' steps with steps_offset=1 put a step at timestep 1000, past the "
        "training schedule's last (999), where diffusers fails; use at most 999 steps, or "
        "'trailing' spacing (--timestep-spacing trailing)"
    )


def test_multistep_linspace_names_the_repeated_timestep():
    with pytest.raises(ValueError, match=r"^1000 'linspace' steps repeat timestep 500 \(a step"):
        scheduler_from_config(_config("deis", "linspace")).set_timesteps(1000)


@pytest.mark.parametrize("name", ["lms", "deis", "dpm++sde", "pndm", "unipc"])
def test_what_the_refusal_suggests_samples_finite_latents(name):
    # 1000 trailing steps, and 999 (998 for the multistep solvers) leading ones
    finite = [_final_latent(scheduler_from_config(_config(name, "trailing")), 1000)]
    most = 998 if name in ("deis", "unipc") else 999
    finite.append(_final_latent(scheduler_from_config(_config(name)), most))
    assert all(np.isfinite(x).all() and x.shape == (1, 4, 4, 4) for x in finite)


def test_a_karras_schedule_takes_any_count():
    # converted sigmas take only the count from the spacing: nothing repeats
    for name in ("lms-karras", "dpm++sde-karras", "dpm++2m-karras", "deis-karras"):
        scheduler_from_config(_config(name)).set_timesteps(1000)


# ---------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def bundle(shared_bundle, one_torch_thread) -> Path:
    return shared_bundle("sd15", optimize=False).out  # read only: tests edit copies


def _with_scheduler(bundle: Path, tmp_path: Path, **changes) -> Path:
    """A copy of `bundle` whose scheduler config has `changes`, hashes fixed (crafted)."""
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    path = copy / SCHED
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"][SCHED] = hashlib.sha256(path.read_bytes()).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "slimdiff", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _one_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2 and out.stdout == "", out
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    return lines[0]


def test_verify_refuses_a_huge_num_train_timesteps_at_once(bundle, tmp_path):
    copy = _with_scheduler(bundle, tmp_path, num_train_timesteps=10**9)
    start = time.perf_counter()
    line = _one_line(_cli("verify", copy))
    assert time.perf_counter() - start < 60  # it hung for minutes before
    assert "scheduler config not supported (ValueError: num_train_timesteps=1000000000" in line


def test_run_with_a_nested_use_default_values_is_one_line(bundle, tmp_path):
    copy = _with_scheduler(bundle, tmp_path, _use_default_values=[["x"]])
    out = tmp_path / "x.png"
    line = _one_line(_cli("run", copy, "--prompt", "a", "--scheduler", "euler-a", "--out", out))
    assert "_use_default_values must be a list of config key names" in line
    assert not out.exists()


def test_pndm_at_the_clis_most_steps_is_refused_before_any_graph_runs(bundle, tmp_path):
    copy = _with_scheduler(bundle, tmp_path, **SD15)
    out = tmp_path / "x.png"
    line = _one_line(_cli("run", copy, "--prompt", "a", "--steps", "1000", "--out", out))
    assert line.startswith("error: 1000 steps with PNDMScheduler: 1000 'leading' steps")
    assert line.endswith(
        "use at most 999 steps, or 'trailing' spacing (--timestep-spacing trailing)"
    )
    assert not out.exists()
