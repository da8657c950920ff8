"""The numpy schedulers against diffusers' own, over whole denoising trajectories.

Each case runs the same initial latent through diffusers (torch, float32) and through
`slimdiff.runtime.schedulers`, with a "denoiser" that depends on its input
(0.5 * model_input + fixed noise) so errors in any step feed into the next ones, and
requires every intermediate sample to agree within 1e-5 of the latent's magnitude: the
larger of the step's input and output, since float32 rounding scales with the operands.

Zero-terminal-SNR Euler is measured against the largest latent so far instead: its first
step maps a sigma-4096 latent to a sigma-29 one, and diffusers' own float32 rounding there
is already ~5e-6 of the *output* (~4e-8 of the input); that absolute error then stays in
the smaller latents of every later step.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from slimdiff.runtime import schedulers  # noqa: E402

from slimdiff.models.kinds import calculate_shift  # noqa: E402

TOL = 1e-5  # max |numpy - diffusers| / the latent magnitude (module docstring)
SHAPE = (1, 4, 8, 8)

# scheduler_config.json values of the model families (SD1.5 / SDXL share the betas)
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
SD15 = {
    **SD_BETAS,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "clip_sample": False,
    "num_train_timesteps": 1000,
}
SDXL_EULER = {
    **SD_BETAS,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
}
SD3 = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_DEV = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
FLUX_SCHNELL = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

EULER_CASES = {
    "sd15-leading": (SD15, 30),
    "sdxl-leading": (SDXL_EULER, 25),
    "trailing": ({**SD_BETAS, "timestep_spacing": "trailing"}, 20),
    "linspace-vpred": (
        {**SD_BETAS, "timestep_spacing": "linspace", "prediction_type": "v_prediction"},
        20,
    ),
    "karras": ({**SDXL_EULER, "use_karras_sigmas": True}, 20),
    "zero-snr-trailing-vpred-sigma_min": (
        {
            **SD_BETAS,
            "timestep_spacing": "trailing",
            "prediction_type": "v_prediction",
            "rescale_betas_zero_snr": True,
            "final_sigmas_type": "sigma_min",
        },
        15,
    ),
    "linear-betas": ({"timestep_spacing": "leading"}, 10),
    # CosXL-style: v-prediction on Karras sigmas, the denoiser's timestep 0.25 log sigma
    "continuous-vpred-karras": (
        {
            **SD_BETAS,
            "prediction_type": "v_prediction",
            "timestep_type": "continuous",
            "use_karras_sigmas": True,
            "sigma_min": 0.002,
            "sigma_max": 120.0,
        },
        12,
    ),
    "continuous-epsilon-stays-discrete": ({**SD_BETAS, "timestep_type": "continuous"}, 8),
}
DDIM_CASES = {
    "sd15": (SD15, 30),
    "sd15-trailing": ({**SD15, "timestep_spacing": "trailing"}, 25),
    "linspace-clip": (
        {"clip_sample": True, "clip_sample_range": 1.0, "timestep_spacing": "linspace"},
        20,
    ),
    "clip-range-vpred": (
        {
            **SD_BETAS,
            "clip_sample": True,
            "clip_sample_range": 1.5,
            "prediction_type": "v_prediction",
        },
        20,
    ),
    "zero-snr-trailing-vpred": (
        {
            **SD_BETAS,
            "rescale_betas_zero_snr": True,
            "timestep_spacing": "trailing",
            "prediction_type": "v_prediction",
        },
        20,
    ),
    "cosine-set_alpha_to_one": ({"beta_schedule": "squaredcos_cap_v2", "clip_sample": False}, 10),
}
DPM_CASES = {
    "linspace": (SD_BETAS, 20),
    "leading-offset": ({**SD_BETAS, "timestep_spacing": "leading", "steps_offset": 1}, 20),
    "trailing-vpred": (
        {**SD_BETAS, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
        20,
    ),
    "karras": ({**SD_BETAS, "use_karras_sigmas": True}, 25),
    "karras-few-steps": ({**SD_BETAS, "use_karras_sigmas": True}, 8),
    "heun-sigma_min": ({**SD_BETAS, "solver_type": "heun", "final_sigmas_type": "sigma_min"}, 10),
    # 15+ steps to a nonzero final sigma: the last step stays second order
    "sigma_min-16-steps": ({**SD_BETAS, "final_sigmas_type": "sigma_min"}, 16),
    "order1": ({**SD_BETAS, "solver_order": 1}, 20),
    "lambda_min_clipped": ({"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1}, 12),
    "order3": ({**SD_BETAS, "solver_order": 3}, 20),
    # under 15 steps the last two steps drop an order (lower_order_second, then first)
    "order3-few-steps": ({**SD_BETAS, "solver_order": 3}, 8),
    "order3-karras-vpred": (
        {
            **SD_BETAS,
            "solver_order": 3,
            "use_karras_sigmas": True,
            "prediction_type": "v_prediction",
        },
        25,
    ),
    "order3-sigma_min-16-steps": (
        {**SD_BETAS, "solver_order": 3, "final_sigmas_type": "sigma_min"},
        16,
    ),
    "sample-prediction": ({**SD_BETAS, "prediction_type": "sample"}, 10),
    "lu-lambdas": ({**SD_BETAS, "use_lu_lambdas": True}, 20),
    "lu-lambdas-cosine": ({"beta_schedule": "squaredcos_cap_v2", "use_lu_lambdas": True}, 12),
    # Karras wins over Lu, as in diffusers
    "lu-and-karras": ({**SD_BETAS, "use_lu_lambdas": True, "use_karras_sigmas": True}, 12),
    # DPM-Solver (noise prediction; deprecated in diffusers, still read from configs)
    "dpmsolver": (
        {**SD_BETAS, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
        20,
    ),
    "dpmsolver-heun-vpred": (
        {
            **SD_BETAS,
            "algorithm_type": "dpmsolver",
            "final_sigmas_type": "sigma_min",
            "solver_type": "heun",
            "prediction_type": "v_prediction",
        },
        12,
    ),
    "dpmsolver-order3-sample": (
        {
            **SD_BETAS,
            "algorithm_type": "dpmsolver",
            "final_sigmas_type": "sigma_min",
            "solver_order": 3,
            "prediction_type": "sample",
        },
        16,
    ),
    # flow-matching sigmas (SD3 sampled with DPM-Solver++)
    "flow": (
        {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0},
        20,
    ),
    "flow-order3-few": (
        {
            "use_flow_sigmas": True,
            "prediction_type": "flow_prediction",
            "flow_shift": 3.0,
            "solver_order": 3,
        },
        8,
    ),
}

SDE = {**SD_BETAS, "algorithm_type": "sde-dpmsolver++"}
DPM_SDE_CASES = {  # "DPM++ 2M SDE (Karras)": fresh noise every step
    "2m": (SDE, 20),
    "2m-karras": ({**SDE, "use_karras_sigmas": True}, 25),
    "heun-sigma_min": ({**SDE, "solver_type": "heun", "final_sigmas_type": "sigma_min"}, 10),
    "order1-trailing-vpred": (
        {
            **SDE,
            "solver_order": 1,
            "timestep_spacing": "trailing",
            "prediction_type": "v_prediction",
        },
        12,
    ),
    "order3": ({**SDE, "solver_order": 3}, 20),
    "dpmsolver": (
        {**SD_BETAS, "algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"},
        20,
    ),
    "dpmsolver-heun": (
        {
            **SD_BETAS,
            "algorithm_type": "sde-dpmsolver",
            "final_sigmas_type": "sigma_min",
            "solver_type": "heun",
        },
        10,
    ),
}
STOCHASTIC = ("EulerAncestralDiscreteScheduler", "LCMScheduler")  # and DPM's SDE form
PNDM_CASES = {
    "sd15-plms": (SD15, 30),  # SD1.5's hub config: skip_prk_steps, leading, offset 1
    "sd15-plms-few": (SD15, 4),
    "prk-start": ({**SD15, "skip_prk_steps": False}, 20),
    "prk-linear-set_alpha_to_one": ({"set_alpha_to_one": True}, 10),
    "plms-trailing-vpred": (
        {**SD15, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
        25,
    ),
    "plms-linspace-cosine": (
        {
            "beta_schedule": "squaredcos_cap_v2",
            "skip_prk_steps": True,
            "timestep_spacing": "linspace",
        },
        15,
    ),
}
EULER_A_CASES = {
    "sd15-leading": (SD15, 25),
    "sdxl-leading": (SDXL_EULER, 20),
    "linspace-vpred": ({**SD_BETAS, "prediction_type": "v_prediction"}, 15),
    "zero-snr-trailing-vpred": (
        {
            **SD_BETAS,
            "timestep_spacing": "trailing",
            "prediction_type": "v_prediction",
            "rescale_betas_zero_snr": True,
        },
        12,
    ),
}
HEUN_CASES = {  # n steps: 2n - 1 denoiser calls, the second halves interleaved
    "sd15-leading": (SD15, 15),
    "sdxl-leading": (SDXL_EULER, 10),
    "karras": ({**SD_BETAS, "use_karras_sigmas": True}, 12),
    "linspace-vpred": ({**SD_BETAS, "prediction_type": "v_prediction"}, 10),
    "trailing-sample-clip": (
        {
            **SD_BETAS,
            "timestep_spacing": "trailing",
            "prediction_type": "sample",
            "clip_sample": True,
            "clip_sample_range": 2.0,
        },
        6,
    ),
    "one-step": (SD_BETAS, 1),
}
KDPM2_CASES = {  # n steps: 2n - 1 calls, the geometric midpoints' interleaved
    "sd15-leading": (SD15, 15),
    "sdxl-leading": (SDXL_EULER, 10),
    "karras": ({**SD_BETAS, "use_karras_sigmas": True}, 12),
    "linspace-vpred": ({**SD_BETAS, "prediction_type": "v_prediction"}, 10),
    "trailing": ({**SD_BETAS, "timestep_spacing": "trailing"}, 6),
    "one-step": (SD_BETAS, 1),
}
LCM_CASES = {
    "lcm-sdxl-4": ({**SDXL_EULER, "original_inference_steps": 50, "timestep_scaling": 10.0}, 4),
    "lcm-8": ({**SD_BETAS, "set_alpha_to_one": True}, 8),
    "lcm-1": ({**SD_BETAS}, 1),
    "vpred-clip-original-100": (
        {
            **SD_BETAS,
            "prediction_type": "v_prediction",
            "clip_sample": True,
            "clip_sample_range": 1.5,
            "original_inference_steps": 100,
            "set_alpha_to_one": False,
        },
        6,
    ),
    "sample-pred": ({**SD_BETAS, "prediction_type": "sample"}, 3),
}


def _run(ref, ours, steps: int, seed: int, *, mu=None, sigmas=None, running=False) -> float:
    """Run both schedulers over one trajectory; returns the largest relative error.

    The error of a step is relative to the larger of its input and output latents, or
    with `running` to the largest latent so far (for zero-terminal-SNR, see module doc).
    A stochastic scheduler gets the same fresh noise on both sides: ours as `noise=`,
    diffusers' through its module's randn_tensor, patched to return it.
    """
    if not ours.stochastic:
        return _trajectory(ref, ours, steps, seed, mu, sigmas, running, lambda shape: None)
    rng = np.random.default_rng(seed + 1000)
    drawn: list[np.ndarray] = []

    def draw(shape):
        drawn.append(rng.standard_normal(shape).astype(np.float32))
        return drawn[-1]

    def randn_tensor(shape, **kwargs):
        return torch.from_numpy(drawn[-1]).reshape(shape)

    with mock.patch(f"{type(ref).__module__}.randn_tensor", randn_tensor):
        return _trajectory(ref, ours, steps, seed, mu, sigmas, running, draw)


def _trajectory(ref, ours, steps, seed, mu, sigmas, running, draw) -> float:
    kwargs = {} if sigmas is None else {"sigmas": sigmas}
    if mu is not None:
        kwargs["mu"] = mu
    if sigmas is None:
        kwargs["num_inference_steps"] = steps
    ref.set_timesteps(**kwargs)
    ours.set_timesteps(**kwargs)
    ref_t = ref.timesteps.numpy()
    assert ours.timesteps.dtype == np.float32
    np.testing.assert_allclose(ours.timesteps, ref_t.astype(np.float32), rtol=1e-6, atol=1e-4)

    rng = np.random.default_rng(seed)
    latent = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    ref_sigma = getattr(ref, "init_noise_sigma", 1.0)  # FlowMatch has none: 1
    assert ours.init_noise_sigma == pytest.approx(float(ref_sigma), rel=1e-6)
    x_ref = torch.from_numpy(latent) * ref_sigma
    x_ours = latent * np.float32(ours.init_noise_sigma)

    worst, scale = 0.0, 0.0
    for i, t in enumerate(ref.timesteps):
        # FlowMatch has no scale_model_input in diffusers: its input is the sample itself
        in_ref = ref.scale_model_input(x_ref, t) if hasattr(ref, "scale_model_input") else x_ref
        # scale_model_input on its own, on diffusers' latent, then on ours for the model
        in_check = ours.scale_model_input(x_ref.numpy(), i)
        assert in_check.dtype == np.float32
        np.testing.assert_allclose(
            in_check, in_ref.numpy(), rtol=0, atol=1e-6 * float(in_ref.abs().max())
        )
        in_ours = ours.scale_model_input(x_ours, i)
        scale = max(scale if running else 0.0, float(x_ref.abs().max()))
        step_noise = draw(SHAPE)
        extra = {} if step_noise is None else {"noise": step_noise}
        x_ours = ours.step(np.float32(0.5) * in_ours + noise, i, x_ours, **extra)
        x_ref = ref.step(0.5 * in_ref + torch.from_numpy(noise), t, x_ref).prev_sample
        assert x_ours.dtype == np.float32 and x_ours.shape == SHAPE
        ref_np = x_ref.numpy()
        scale = max(scale, float(np.abs(ref_np).max()))
        err = float(np.abs(x_ours - ref_np).max()) / scale
        assert err < TOL, f"step {i} (t={float(t)}): relative error {err:.3g}"
        worst = max(worst, err)
    return worst


def _pair(cls_name: str, config: dict):
    ref = getattr(diffusers, cls_name).from_config(config)
    ours = schedulers.scheduler_from_config(dict(ref.config, _class_name=cls_name))
    assert type(ours).__name__ == cls_name
    return ref, ours


# class -> its cases, each a trajectory against diffusers (the flow-match ones are below)
TRAJECTORIES = {
    "EulerDiscreteScheduler": EULER_CASES,
    "DDIMScheduler": DDIM_CASES,
    "DPMSolverMultistepScheduler": {
        **DPM_CASES,
        **{f"sde-{k}": v for k, v in DPM_SDE_CASES.items()},
    },
    "PNDMScheduler": PNDM_CASES,
    "EulerAncestralDiscreteScheduler": EULER_A_CASES,
    "HeunDiscreteScheduler": HEUN_CASES,
    "KDPM2DiscreteScheduler": KDPM2_CASES,
    "LCMScheduler": LCM_CASES,
}


@pytest.mark.parametrize(
    ("cls_name", "case"),
    [pytest.param(c, k, id=f"{c}-{k}") for c, cases in TRAJECTORIES.items() for k in cases],
)
def test_trajectory(cls_name, case):
    config, steps = TRAJECTORIES[cls_name][case]
    ref, ours = _pair(cls_name, config)
    assert ours.stochastic == (cls_name in STOCHASTIC or "sde" in case)
    # zero-terminal-SNR Euler(a): sigma_max = 4096, measured against the running scale
    running = cls_name.startswith("Euler") and bool(config.get("rescale_betas_zero_snr"))
    _run(ref, ours, steps, seed=sum(map(ord, case)), running=running)
    if cls_name == "PNDMScheduler":
        # every model call is a scheduled timestep: one more than asked with skip_prk_steps
        # (the Heun-like start), nine more with the Runge-Kutta start (12 calls for 3 steps)
        extra = 1 if config.get("skip_prk_steps") else 9
        assert len(ours.timesteps) == steps + extra
    if cls_name in ("HeunDiscreteScheduler", "KDPM2DiscreteScheduler"):
        assert len(ours.timesteps) == 2 * steps - 1


TCD_CASES = {  # (config, steps, eta): TCD's gamma is the pipeline's `eta` (default 0)
    "sdxl-4-gamma0.3": ({**SDXL_EULER, "original_inference_steps": 50}, 4, 0.3),
    "sdxl-8-deterministic": ({**SDXL_EULER, "original_inference_steps": 50}, 8, 0.0),
    "gamma1-lcm-like": ({**SD_BETAS, "set_alpha_to_one": False}, 6, 1.0),
    "vpred-gamma0.5-original-100": (
        {**SD_BETAS, "prediction_type": "v_prediction", "original_inference_steps": 100},
        5,
        0.5,
    ),
    "sample-pred": ({**SD_BETAS, "prediction_type": "sample"}, 3, 0.2),
    "one-step": ({**SDXL_EULER, "thresholding": True}, 1, 0.3),  # TCD never thresholds
}


@pytest.mark.parametrize("case", TCD_CASES)
def test_tcd_trajectory(case):
    """diffusers' TCDScheduler.step defaults to eta 0.3 but its pipelines pass their own
    eta (0.0 unless given): both sides get the case's."""
    import functools

    config, steps, eta = TCD_CASES[case]
    ref, ours = _pair("TCDScheduler", config)
    ref.step = functools.partial(ref.step, eta=eta)
    ours.eta = eta
    assert ours.stochastic == (eta > 0)
    _run(ref, ours, steps, seed=sum(map(ord, case)))


def test_stochastic_steps_need_noise():
    x = np.zeros(SHAPE, np.float32)
    for sched in (schedulers.EulerAncestralDiscreteScheduler(), schedulers.LCMScheduler()):
        sched.set_timesteps(4)
        assert sched.stochastic
        with pytest.raises(ValueError, match="noise"):
            sched.step(x, 0, x)
        with pytest.raises(ValueError, match="noise"):
            sched.step(x, 0, x, noise=np.zeros((1, 4, 4, 4), np.float32))
    lcm = schedulers.LCMScheduler()
    lcm.set_timesteps(4)
    lcm.step(x, 3, x)  # the last LCM step returns its estimate: no noise needed
    with pytest.raises(ValueError, match=r"1\.\.50"):
        lcm.set_timesteps(51)  # a subset of the distillation's 50-step grid


def test_pndm_steps_in_order():
    pndm = schedulers.PNDMScheduler(**SD15)
    pndm.set_timesteps(5)
    x = np.zeros(SHAPE, np.float32)
    pndm.step(x, 0, x)
    with pytest.raises(ValueError, match="history"):
        pndm.step(x, 3, x)


def test_flow_match_sd3():
    _run(*_pair("FlowMatchEulerDiscreteScheduler", SD3), 28, seed=4)


@pytest.mark.parametrize(
    ("config", "steps", "seq_len"),
    [(FLUX_DEV, 28, 4096), (FLUX_DEV, 20, 1024), (FLUX_SCHNELL, 4, 4096)],
)
def test_flow_match_flux(config, steps, seq_len):
    """As FluxPipeline calls it: sigmas = linspace(1, 1/n, n) and mu from calculate_shift."""
    mu = calculate_shift(
        seq_len,
        config["base_image_seq_len"],
        config["max_image_seq_len"],
        config["base_shift"],
        config["max_shift"],
    )
    sigmas = np.linspace(1.0, 1 / steps, steps)
    _run(*_pair("FlowMatchEulerDiscreteScheduler", config), steps, seed=5, mu=mu, sigmas=sigmas)


def test_calculate_shift():
    """pipeline_flux.calculate_shift: mu linear in tokens, 0.5 at 256 and 1.15 at 4096.

    (Compared with values, not by importing pipeline_flux: that pulls in transformers.)
    """
    assert calculate_shift(256) == pytest.approx(0.5, abs=1e-12)
    assert calculate_shift(4096) == pytest.approx(1.15, abs=1e-12)
    assert calculate_shift(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840, abs=1e-12)


def test_flow_match_dynamic_without_sigmas():
    mu = calculate_shift(256)
    _run(*_pair("FlowMatchEulerDiscreteScheduler", FLUX_DEV), 12, seed=6, mu=mu)


def test_dpm_solver_flow_sigmas_shifted_by_mu():
    """use_dynamic_shifting: mu sets flow_shift = e^mu, and it stays for later calls, as
    diffusers writes it into its config; mu without the flag is refused."""
    config = {
        "use_flow_sigmas": True,
        "prediction_type": "flow_prediction",
        "use_dynamic_shifting": True,
        "solver_order": 3,
    }
    ref, ours = _pair("DPMSolverMultistepScheduler", config)
    worst = _run(ref, ours, 12, seed=7, mu=0.9)
    assert worst < TOL and ours.flow_shift == pytest.approx(np.exp(0.9))
    _run(ref, ours, 6, seed=8)  # no mu: the shift set above
    plain = schedulers.scheduler_from_config(
        {"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": True}
    )
    with pytest.raises(ValueError, match="mu needs use_dynamic_shifting"):
        plain.set_timesteps(10, mu=0.5)


@pytest.mark.parametrize(
    ("name", "key"),
    [
        *(("DPMSolverMultistepScheduler", k) for k in ("karras", "exponential", "beta", "lu")),
        # UniPC maps its Karras sigmas into flow ones (tests/unit/test_scheduler_unipc.py)
        *(("UniPCMultistepScheduler", k) for k in ("exponential", "beta")),
    ],
)
def test_flow_sigmas_with_a_vp_sigma_schedule_is_refused(name, key):
    """diffusers converts the VP training sigmas (up to ~157) and reads them as flow
    sigmas (alpha = 1 - sigma): NaN from the first step. Refused instead of a black image."""
    config = {"_class_name": name, "use_flow_sigmas": True, "prediction_type": "flow_prediction"}
    flag = "use_lu_lambdas" if key == "lu" else f"use_{key}_sigmas"
    reference = getattr(diffusers, name).from_config({**config, flag: True})
    reference.set_timesteps(4)
    assert reference.sigmas.max() > 100  # VP sigmas, where flow sigmas are at most 1
    with pytest.raises(ValueError, match=rf"{flag} with use_flow_sigmas samples NaN"):
        schedulers.scheduler_from_config({**config, flag: True})


@pytest.mark.parametrize(
    ("cls_name", "variance_type"),
    [
        ("DDPMScheduler", None),  # a DPM-Solver config's, carried over
        ("DPMSolverMultistepScheduler", "fixed_small"),  # a DDPM config's
        ("DPMSolverSinglestepScheduler", "fixed_large"),
    ],
)
def test_a_variance_type_carried_over_from_another_class_samples_as_diffusers(
    cls_name, variance_type
):
    ref, ours = _pair(cls_name, {**SD15, "variance_type": variance_type})
    assert _run(ref, ours, 8, seed=4) < TOL


@pytest.mark.parametrize("value", ["learned", "learned_range"])
def test_dpm_solver_refuses_a_learned_variance(value):
    config = {"_class_name": "DPMSolverMultistepScheduler", "variance_type": value}
    with pytest.raises(ValueError, match=f"variance_type='{value}'.*predicts its variance"):
        schedulers.scheduler_from_config(config)


def test_pndm_runge_kutta_start_needs_four_steps():
    config = {"_class_name": "PNDMScheduler", **SD15, "skip_prk_steps": False}
    scheduler = schedulers.scheduler_from_config(config)
    with pytest.raises(ValueError, match="takes at least 4 steps, not 3; run more steps"):
        scheduler.set_timesteps(3)
    scheduler.set_timesteps(4)
    assert len(scheduler.timesteps) == 13  # as diffusers': 12 Runge-Kutta calls, then PLMS


def test_euler_custom_sigmas():
    ref, ours = _pair("EulerDiscreteScheduler", SDXL_EULER)
    sigmas = np.array([14.0, 8.0, 4.0, 2.0, 1.0, 0.5, 0.1, 0.0])
    _run(ref, ours, len(sigmas) - 1, seed=7, sigmas=sigmas)


def test_scale_model_input_and_init_noise_sigma():
    ref, ours = _pair("EulerDiscreteScheduler", SDXL_EULER)
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    # "leading" spacing: sqrt(sigma_max^2 + 1), not sigma_max
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    sigma_max = float(ours.sigmas.max())
    assert ours.init_noise_sigma == pytest.approx((sigma_max**2 + 1) ** 0.5, rel=1e-6)
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    for i in (0, 5, 9):
        expected = ref.scale_model_input(torch.from_numpy(x), ref.timesteps[i]).numpy()
        ref._step_index = None  # diffusers fixes its index on first use; reset per probe
        np.testing.assert_allclose(ours.scale_model_input(x, i), expected, rtol=1e-6)
    for name, config in [
        ("DDIMScheduler", SD15),
        ("DPMSolverMultistepScheduler", SD_BETAS),
        ("FlowMatchEulerDiscreteScheduler", SD3),
    ]:
        _, other = _pair(name, config)
        other.set_timesteps(10)
        assert other.init_noise_sigma == 1.0
        np.testing.assert_array_equal(other.scale_model_input(x, 3), x)


@pytest.mark.parametrize(
    ("cls_name", "config"),
    [
        ("EulerDiscreteScheduler", SDXL_EULER),
        ("DDIMScheduler", SD15),
        ("DPMSolverMultistepScheduler", {**SD_BETAS, "use_karras_sigmas": True}),
        ("FlowMatchEulerDiscreteScheduler", FLUX_DEV),
    ],
)
def test_from_saved_config(tmp_path, cls_name, config):
    """scheduler_config.json as diffusers writes it (with _class_name, _diffusers_version)."""
    getattr(diffusers, cls_name).from_config(config).save_config(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == cls_name and "_diffusers_version" in saved
    ours = schedulers.scheduler_from_config(saved)
    assert type(ours).__name__ == cls_name
    ours.set_timesteps(6, mu=0.8 if cls_name.startswith("Flow") else None)
    assert len(ours.timesteps) == 6


def test_unknown_class_names_supported_ones():
    with pytest.raises(ValueError, match="IPNDMScheduler") as info:  # no numpy port
        schedulers.scheduler_from_config({"_class_name": "IPNDMScheduler"})
    for name in (
        "EulerDiscreteScheduler",
        "HeunDiscreteScheduler",
        "KDPM2DiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "DDIMScheduler",
        "DPMSolverMultistepScheduler",
        "PNDMScheduler",
        "LCMScheduler",
        "FlowMatchEulerDiscreteScheduler",
        "DEISMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        "DDPMScheduler",
        "DPMSolverSDEScheduler",
    ):
        assert name in str(info.value)
    with pytest.raises(ValueError, match="None"):
        schedulers.scheduler_from_config({"beta_start": 0.1})


@pytest.mark.parametrize(
    ("cls_name", "config", "key"),
    [
        ("EulerDiscreteScheduler", {"prediction_type": "sample"}, "prediction_type"),
        ("EulerDiscreteScheduler", {"timestep_type": "karras"}, "timestep_type"),
        ("EulerDiscreteScheduler", {"interpolation_type": "log_linear"}, "interpolation_type"),
        ("DDIMScheduler", {"thresholding": True}, "thresholding"),
        ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}, "final_sigmas_type"),
        (
            "DPMSolverMultistepScheduler",
            {
                "algorithm_type": "sde-dpmsolver",
                "final_sigmas_type": "sigma_min",
                "solver_order": 3,
            },
            "solver_order",
        ),
        (
            "DPMSolverMultistepScheduler",
            {
                "algorithm_type": "dpmsolver",
                "final_sigmas_type": "sigma_min",
                "prediction_type": "flow_prediction",
            },
            "flow_prediction",
        ),
        ("DPMSolverMultistepScheduler", {"variance_type": "learned_range"}, "variance_type"),
        ("DPMSolverMultistepScheduler", {"thresholding": True}, "thresholding"),
        ("DPMSolverMultistepScheduler", {"time_shift_type": "linear"}, "time_shift_type"),
        ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}, "stochastic_sampling"),
        ("FlowMatchEulerDiscreteScheduler", {"invert_sigmas": True}, "invert_sigmas"),
        ("PNDMScheduler", {"prediction_type": "sample"}, "prediction_type"),
        ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "karras"}, "timestep_spacing"),
        ("LCMScheduler", {"thresholding": True}, "thresholding"),
    ],
)
def test_unsupported_values_raise(cls_name, config, key):
    with pytest.raises(ValueError, match=key):
        schedulers.scheduler_from_config({"_class_name": cls_name, **config})


def test_misuse_raises():
    flux = schedulers.scheduler_from_config(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", **FLUX_DEV}
    )
    with pytest.raises(ValueError, match="mu"):
        flux.set_timesteps(10)
    ddim = schedulers.DDIMScheduler()
    with pytest.raises(ValueError, match="sigmas"):
        ddim.set_timesteps(10, sigmas=np.ones(10))
    dpm = schedulers.DPMSolverMultistepScheduler()
    dpm.set_timesteps(5)
    x = np.zeros(SHAPE, np.float32)
    dpm.step(x, 0, x)
    with pytest.raises(ValueError, match="history"):
        dpm.step(x, 2, x)
    with pytest.raises(IndexError):
        dpm.step(x, 5, x)
    with pytest.raises(IndexError):  # numpy would silently wrap -1 to the last sigma
        flux.step(x, -1, x)
    heun = schedulers.HeunDiscreteScheduler(**SD_BETAS)
    heun.set_timesteps(3)
    assert len(heun.timesteps) == 5
    with pytest.raises(ValueError, match="call 1 is a second half, and needs call 0 just before"):
        heun.step(x, 1, x)
    heun.step(x, 0, x)
    heun.step(x, 1, x)
    with pytest.raises(ValueError, match="needs call 2 just before"):
        heun.step(x, 3, x)
    with pytest.raises(ValueError, match="sigmas"):
        heun.set_timesteps(3, sigmas=np.ones(4))


@pytest.mark.parametrize(
    "sched",
    [schedulers.DPMSolverMultistepScheduler(**SD_BETAS), schedulers.PNDMScheduler(**SD15)],
    ids=lambda s: type(s).__name__,
)
def test_history_restarts_at_step_zero(sched):
    """A second pass from step 0 without set_timesteps repeats the first exactly."""
    sched.set_timesteps(6)
    rng = np.random.default_rng(8)
    start, noise = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    runs = []
    for _ in range(2):
        x = start
        for i in range(len(sched.timesteps)):
            x = sched.step(np.float32(0.5) * x + noise, i, x)
        runs.append(x)
    np.testing.assert_array_equal(runs[0], runs[1])


def test_imports_only_numpy_and_stdlib():
    """The runtime is torch-free: no torch, diffusers or transformers, even lazily."""
    files = sorted(Path(schedulers.__file__).parent.glob("*.py"))
    assert len(files) > 1
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            for root in roots:
                assert root == "numpy" or root in sys.stdlib_module_names, (path.name, root)


def test_flow_dpm_solver_is_a_flow_matching_sampler():
    """`flow-dpm++2m` samples SD3 (its shift becomes flow_shift); plain DPM-Solver++ is a VP
    sampler and is refused for it, naming the flow choices; and back again."""
    sd3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", **SD3}
    switched = schedulers.switch_scheduler(sd3, "flow-dpm++2m")
    assert switched["_class_name"] == "DPMSolverMultistepScheduler"
    assert switched["use_flow_sigmas"] and switched["flow_shift"] == 3.0
    assert switched["prediction_type"] == "flow_prediction"
    with pytest.raises(
        ValueError, match=r"one of: flow-euler, flow-heun, flow-dpm\+\+2m, flow-unipc,"
    ):
        schedulers.switch_scheduler(sd3, "dpm++2m")
    back = schedulers.switch_scheduler(switched, "flow-euler")
    assert back["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    sd15 = {"_class_name": "PNDMScheduler", **SD_BETAS}
    with pytest.raises(ValueError, match="samples the flow matching process"):
        schedulers.switch_scheduler(sd15, "flow-dpm++2m")


@pytest.mark.parametrize(
    ("key", "classes"),
    [
        ("rescale_betas_zero_snr", schedulers.ZERO_SNR_CLASSES),
        ("use_beta_sigmas", schedulers.SIGMA_SCHEDULE_CLASSES),  # and Karras, exponential
    ],
)
def test_class_sets_are_diffusers_own(key, classes):
    """The ported classes whose diffusers class takes `key`."""
    import inspect

    have = {
        name
        for name in schedulers.scheduler_names()
        if name.endswith("Scheduler")
        and key in inspect.signature(getattr(diffusers, name)).parameters
    }
    assert have == classes


def test_spacing_classes_are_diffusers_own():
    """The ported classes whose diffusers class takes timestep_spacing, but LCM and TCD,
    whose schedules ignore it."""
    import inspect

    have = {
        name
        for name in schedulers.scheduler_names()
        if name.endswith("Scheduler")
        and "timestep_spacing" in inspect.signature(getattr(diffusers, name)).parameters
    }
    assert have - {"LCMScheduler", "TCDScheduler"} == schedulers.SPACING_CLASSES


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_with_spacing_samples_as_diffusers_from_config(name, spacing):
    """SDXL's config (leading, steps_offset 1) on another spacing, as
    `from_config(config, timestep_spacing=...)` builds it (SDXL-Lightning: trailing)."""
    config = {"_class_name": name, **SD15, "timestep_spacing": "leading"}
    spaced = schedulers.with_spacing(config, spacing)
    assert spaced["timestep_spacing"] == spacing and config["timestep_spacing"] == "leading"
    plain = {k: v for k, v in config.items() if not k.startswith("_")}
    ref = getattr(diffusers, name).from_config(plain, timestep_spacing=spacing)
    ours = schedulers.scheduler_from_config(spaced)
    for n in (4, 8):
        ref.set_timesteps(n)
        ours.set_timesteps(n)
        np.testing.assert_allclose(np.asarray(ours.timesteps), ref.timesteps.numpy(), atol=1e-4)
    assert _run(ref, ours, 4, seed=5) < TOL


def test_with_spacing_refusals():
    with pytest.raises(ValueError, match=r"FlowMatchEulerDiscreteScheduler has no timestep spac"):
        schedulers.with_spacing({"_class_name": "FlowMatchEulerDiscreteScheduler"}, "trailing")
    with pytest.raises(ValueError, match=r"LCMScheduler has no timestep spacing; .*Euler"):
        schedulers.with_spacing({"_class_name": "LCMScheduler"}, "trailing")
    with pytest.raises(ValueError, match=r"unknown spacing 'uniform'; use one of: leading"):
        schedulers.with_spacing({"_class_name": "EulerDiscreteScheduler"}, "uniform")


def test_with_sigmas_replaces_the_schedule():
    dpm = {"_class_name": "DPMSolverMultistepScheduler", **SD_BETAS, "use_karras_sigmas": True}
    beta = schedulers.with_sigmas({**dpm, "use_lu_lambdas": True}, "beta")
    assert beta["use_beta_sigmas"] and "use_karras_sigmas" not in beta
    assert "use_lu_lambdas" not in beta  # Lu would win over Beta in diffusers
    ours = schedulers.scheduler_from_config(beta)
    ref = diffusers.DPMSolverMultistepScheduler.from_config(
        {k: v for k, v in beta.items() if not k.startswith("_")}
    )
    assert _run(ref, ours, 12, seed=3) < TOL  # what diffusers samples on Beta sigmas
    with pytest.raises(ValueError, match=r"DDIMScheduler has no exponential sigmas; .*Euler"):
        schedulers.with_sigmas({"_class_name": "DDIMScheduler"}, "exponential")
    with pytest.raises(ValueError, match="unknown sigmas 'cosine'"):
        schedulers.with_sigmas(dpm, "cosine")


def test_switching_a_zero_snr_model_to_a_class_without_it_warns():
    zero_snr = {"_class_name": "EulerDiscreteScheduler", **SD_BETAS, "rescale_betas_zero_snr": True}
    lost = schedulers.switch_scheduler(zero_snr, "deis")
    warning = schedulers.switch_warning(zero_snr, lost)
    assert warning.startswith("DEISMultistepScheduler has no rescale_betas_zero_snr")
    assert "DDIMScheduler" in warning  # names the classes that keep it
    kept = schedulers.switch_scheduler(zero_snr, "ddim")
    assert schedulers.switch_warning(zero_snr, kept) is None
    plain = {"_class_name": "EulerDiscreteScheduler", **SD_BETAS}
    assert schedulers.switch_warning(plain, schedulers.switch_scheduler(plain, "deis")) is None


def test_presets_carry_stable_diffusions_settings():
    """`ddim` and `pndm` set what SD's own configs of those classes set; class names are
    diffusers' from_config exactly (DDIM's default clips x0 to [-1, 1]: wrong for latents)."""
    euler = {"_class_name": "EulerDiscreteScheduler", **SD_BETAS, "steps_offset": 1}
    ddim = schedulers.switch_scheduler(euler, "ddim")
    assert ddim["clip_sample"] is False and ddim["steps_offset"] == 1
    assert not schedulers.scheduler_from_config(ddim).clip_sample
    plain = schedulers.switch_scheduler(euler, "DDIMScheduler")
    assert schedulers.scheduler_from_config(plain).clip_sample
    plms = schedulers.scheduler_from_config(schedulers.switch_scheduler(euler, "pndm"))
    plms.set_timesteps(20)
    assert len(plms.timesteps) == 21  # the Heun-like start, no Runge-Kutta steps
    karras = schedulers.switch_scheduler(euler, "dpm++2m-sde-karras")
    assert karras["use_karras_sigmas"] and karras["algorithm_type"] == "sde-dpmsolver++"


def test_takes_noise_lines_draws_up_with_diffusers():
    """The runtime draws step noise only for the calls that use it, as diffusers does: DPM2
    a's second halves, DDPM's steps from t > 0, every step of Euler a, none of Euler's."""
    dpm2a = schedulers.KDPM2AncestralDiscreteScheduler(**SD_BETAS)
    dpm2a.set_timesteps(3)
    assert [schedulers.takes_noise(dpm2a, i) for i in range(5)] == [False, True, False, True, False]
    ddpm = schedulers.DDPMScheduler(**SD15)
    ddpm.set_timesteps(4)  # leading, offset 1: 751, 501, 251, 1
    assert [schedulers.takes_noise(ddpm, i) for i in range(4)] == [True] * 4
    ddpm = schedulers.DDPMScheduler(**SD_BETAS, timestep_spacing="leading")
    ddpm.set_timesteps(4)  # 750, 500, 250, 0
    assert [schedulers.takes_noise(ddpm, i) for i in range(4)] == [True, True, True, False]
    euler_a = schedulers.EulerAncestralDiscreteScheduler(**SD_BETAS)
    euler_a.set_timesteps(3)
    assert all(schedulers.takes_noise(euler_a, i) for i in range(3))
    euler = schedulers.EulerDiscreteScheduler(**SD_BETAS)
    euler.set_timesteps(3)
    assert not any(schedulers.takes_noise(euler, i) for i in range(3))
