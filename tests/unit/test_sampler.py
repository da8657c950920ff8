"""The stateless torch sampler against diffusers' schedulers, and its purity and gradients.

Trajectories use the config cases and the tolerance rules of test_schedulers.py (whose
docstring explains them, including zero-terminal-SNR Euler's running scale): the same
input-dependent fake denoiser (0.5 * model_input + fixed noise) drives diffusers and
`TorchSampler`, and every intermediate sample must agree within 1e-5 of the latent's
magnitude.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from slimdiff import sampler as sampler_module  # noqa: E402
from slimdiff.errors import UserError  # noqa: E402
from slimdiff.sampler import SamplerState, StepNoise, TorchSampler  # noqa: E402
from tests.unit import test_scheduler_edm as edm  # noqa: E402
from tests.unit import test_scheduler_unipc as unipc  # noqa: E402
from tests.unit.test_schedulers import (  # noqa: E402
    DDIM_CASES,
    DPM_CASES,
    DPM_SDE_CASES,
    EULER_A_CASES,
    EULER_CASES,
    FLUX_DEV,
    FLUX_SCHNELL,
    HEUN_CASES,
    KDPM2_CASES,
    LCM_CASES,
    PNDM_CASES,
    SD3,
    SD15,
    SD_BETAS,
    SDXL_EULER,
    TCD_CASES,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-5  # as test_schedulers.py
SHAPE = (1, 4, 8, 8)
EULER, DDIM = "EulerDiscreteScheduler", "DDIMScheduler"
DPM, FLOW = "DPMSolverMultistepScheduler", "FlowMatchEulerDiscreteScheduler"
PNDM = "PNDMScheduler"
EULER_A, LCM = "EulerAncestralDiscreteScheduler", "LCMScheduler"
HEUN, KDPM2 = "HeunDiscreteScheduler", "KDPM2DiscreteScheduler"
EDM_DPM, EDM_EULER = edm.DPM, edm.EULER
UNIPC = "UniPCMultistepScheduler"
NOISE_SEED = 11  # the step noise's: diffusers' generator and our StepNoise alike


def _mu(config: dict, seq_len: int) -> float:
    """FLUX's mu (pipeline_flux.calculate_shift): linear in the number of image tokens."""
    lo, hi = config["base_image_seq_len"], config["max_image_seq_len"]
    m = (config["max_shift"] - config["base_shift"]) / (hi - lo)
    return config["base_shift"] + m * (seq_len - lo)


# The runtime's DPM-Solver and UniPC ports cover configs the torch sampler refuses (third
# order, the noise-prediction "dpmsolver" forms, sample and flow predictions, flow
# sigmas): those cases are left out below, and test_torch_sampler_refuses_what_it_lacks
# checks they are refused.
def _torch_has(cls_name: str, config: dict) -> bool:
    supported = sampler_module.sampler_classes()[cls_name].supported
    defaults = getattr(diffusers, cls_name)().config  # what an unset key means
    full = {**defaults, **config}
    return all(full.get(k, allowed[0]) in allowed for k, allowed in supported.items())


_MULTISTEP = {
    **{("DPMSolverMultistepScheduler", k): v for k, v in DPM_CASES.items()},
    **{("DPMSolverMultistepScheduler", f"sde-{k}"): v for k, v in DPM_SDE_CASES.items()},
    **{("UniPCMultistepScheduler", k): v for k, v in unipc.CASES.items()},
}

# name -> (class, config, num_inference_steps, other set_timesteps arguments)
CASES = {
    **{f"euler-{k}": (EULER, c, n, {}) for k, (c, n) in EULER_CASES.items()},
    **{f"ddim-{k}": (DDIM, c, n, {}) for k, (c, n) in DDIM_CASES.items()},
    **{f"dpm-{k}": (DPM, c, n, {}) for k, (c, n) in DPM_CASES.items() if _torch_has(DPM, c)},
    # PLMS only: the Runge-Kutta start (skip_prk_steps False) has no torch sampler
    **{
        f"pndm-{k}": (PNDM, c, n, {}) for k, (c, n) in PNDM_CASES.items() if c.get("skip_prk_steps")
    },
    **{
        f"dpm-sde-{k}": (DPM, c, n, {}) for k, (c, n) in DPM_SDE_CASES.items() if _torch_has(DPM, c)
    },
    **{f"euler-a-{k}": (EULER_A, c, n, {}) for k, (c, n) in EULER_A_CASES.items()},
    **{f"lcm-{k}": (LCM, c, n, {}) for k, (c, n) in LCM_CASES.items()},
    **{f"heun-{k}": (HEUN, c, n, {}) for k, (c, n) in HEUN_CASES.items()},
    **{f"dpm2-{k}": (KDPM2, c, n, {}) for k, (c, n) in KDPM2_CASES.items()},
    # EDM: orders 1 and 2 (the third-order cases have no torch sampler)
    **{
        f"edm-{k}": (cls, c, n, {})
        for cls, cases in edm.CASES.items()
        for k, (c, n) in cases.items()
        if c.get("solver_order", 2) < 3
    },
    **{
        f"unipc-{k}": (UNIPC, c, n, {}) for k, (c, n) in unipc.CASES.items() if _torch_has(UNIPC, c)
    },
    "flow-sd3": (FLOW, SD3, 28, {}),
    "flow-heun-sd3": ("FlowMatchHeunDiscreteScheduler", SD3, 10, {}),
    "flow-heun-shift1-one-step": ("FlowMatchHeunDiscreteScheduler", {**SD3, "shift": 1.0}, 1, {}),
    "flow-dynamic-no-sigmas": (FLOW, FLUX_DEV, 12, {"mu": _mu(FLUX_DEV, 256)}),
    "euler-custom-sigmas": (
        EULER,
        SDXL_EULER,
        None,
        {"sigmas": np.array([14.0, 8, 4, 2, 1, 0.5, 0.1, 0])},
    ),
    # options that change only diffusers' tables: free here (the numpy port rejects them)
    "euler-exponential-sigmas": (EULER, {**SD_BETAS, "use_exponential_sigmas": True}, 20, {}),
    "dpm-lu-lambdas": (DPM, {**SD_BETAS, "use_lu_lambdas": True}, 20, {}),
    "flow-shift-terminal": (FLOW, {**SD3, "shift_terminal": 0.02}, 20, {}),
}
for _config, _steps, _seq in [(FLUX_DEV, 28, 4096), (FLUX_DEV, 20, 1024), (FLUX_SCHNELL, 4, 4096)]:
    _sigmas = np.linspace(1.0, 1 / _steps, _steps)  # as FluxPipeline calls it
    CASES[f"flux-{_steps}-{_seq}"] = (
        FLOW,
        _config,
        None,
        {"sigmas": _sigmas, "mu": _mu(_config, _seq)},
    )


def _build(cls_name, config, steps, kwargs, device=None):
    ref = getattr(diffusers, cls_name).from_config(config)
    ref.set_timesteps(steps, device=device, **kwargs)
    ours = TorchSampler.from_config(
        {**config, "_class_name": cls_name}, steps, device=device, **kwargs
    )
    return ref, ours


def _inputs(seed: int, dtype=torch.float32, device=None):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(SHAPE, generator=gen, dtype=dtype).to(device) for _ in range(2))


def _trajectory(sampler, x, noise):
    """Our run, keeping (sample_i, state_i) for every i and the final sample."""
    state, saved = sampler.initial_state(StepNoise(NOISE_SEED)), []
    for i in range(sampler.num_steps):
        saved.append((x, state))
        x, state = sampler.step(0.5 * sampler.scale_model_input(x, i) + noise, i, x, state)
    return saved, x


def _compare(ref, ours, seed: int, running: bool = False, device=None) -> None:
    assert ours.timesteps.dtype == ref.timesteps.dtype
    assert torch.equal(ours.timesteps.cpu(), ref.timesteps.cpu())
    assert ours.num_steps == len(ref.timesteps)
    assert ours.init_noise_sigma == pytest.approx(float(getattr(ref, "init_noise_sigma", 1.0)))
    latent, noise = _inputs(seed, device=device)
    x_ref = latent * ours.init_noise_sigma
    saved, final = _trajectory(ours, x_ref, noise)
    samples = [x for x, _ in saved[1:]] + [final]
    scale = 0.0
    # diffusers' stochastic steps draw from this, as a pipeline's `generator=` would pass it
    generator = {"generator": torch.Generator("cpu").manual_seed(NOISE_SEED)}
    if "generator" not in inspect.signature(ref.step).parameters:  # PNDM's step has none
        generator = {}
    for i, t in enumerate(ref.timesteps):
        in_ref = ref.scale_model_input(x_ref, t) if hasattr(ref, "scale_model_input") else x_ref
        # scale_model_input on diffusers' own latent, then the step against ours
        in_ours = ours.scale_model_input(x_ref, i)
        tol = 1e-6 * float(in_ref.abs().max())
        torch.testing.assert_close(in_ours, in_ref, rtol=0, atol=tol)
        scale = max(scale if running else 0.0, float(x_ref.abs().max()))
        x_ref = ref.step(0.5 * in_ref + noise, t, x_ref, **generator).prev_sample
        assert samples[i].dtype == x_ref.dtype and samples[i].shape == SHAPE
        scale = max(scale, float(x_ref.abs().max()))
        err = float((samples[i] - x_ref).abs().max()) / scale
        assert err < TOL, f"step {i} (t={float(t)}): relative error {err:.3g}"


@pytest.mark.parametrize(
    ("cls_name", "config", "steps", "kwargs"), [pytest.param(*v, id=k) for k, v in CASES.items()]
)
def test_trajectory_matches_diffusers(cls_name, config, steps, kwargs):
    running = cls_name == EULER and bool(config.get("rescale_betas_zero_snr"))
    _compare(*_build(cls_name, config, steps, kwargs), seed=1, running=running)


@pytest.mark.parametrize(
    ("cls_name", "case"),
    [key for key, (c, _) in _MULTISTEP.items() if not _torch_has(key[0], c)],
)
def test_torch_sampler_refuses_what_it_lacks(cls_name, case):
    """One line naming the key and what the sampler takes (EcoDiff then asks for
    calibration.scheduler before any work)."""
    config, steps = _MULTISTEP[(cls_name, case)]
    with pytest.raises(UserError, match=r"is not supported by the torch sampler \(supported:"):
        TorchSampler.from_config({"_class_name": cls_name, **config}, steps)


@pytest.mark.parametrize("case", TCD_CASES)
def test_tcd_trajectory_matches_diffusers(case):
    """TCD with the eta a pipeline passes its step (diffusers' step default, 0.3, is not
    what its pipelines run: they pass theirs, 0 unless given)."""
    import functools

    config, steps, eta = TCD_CASES[case]
    ref, ours = _build("TCDScheduler", config, steps, {})
    ref.step = functools.partial(ref.step, eta=eta)
    ours = TorchSampler.from_config({**config, "_class_name": "TCDScheduler"}, steps, eta=eta)
    assert ours.stochastic == (eta > 0)
    _compare(ref, ours, seed=sum(map(ord, case)))


def test_only_tcd_takes_an_eta():
    with pytest.raises(UserError, match="LCMScheduler takes no eta"):
        TorchSampler.from_config({**SD_BETAS, "_class_name": LCM}, 4, eta=0.3)
    with pytest.raises(ValueError, match=r"must be in 0\.\.1"):
        TorchSampler.from_config({**SD_BETAS, "_class_name": "TCDScheduler"}, 4, eta=1.5)


ONE_PER_CLASS = {
    "euler-vpred": (EULER, {**SD_BETAS, "prediction_type": "v_prediction"}, 10),
    "ddim-clip": (DDIM, {**SD_BETAS, "clip_sample": True, "clip_sample_range": 1.5}, 10),
    "dpm-midpoint": (DPM, SD_BETAS, 10),
    "dpm-heun": (DPM, {**SD_BETAS, "solver_type": "heun"}, 10),
    "flow-sd3": (FLOW, SD3, 10),
    "pndm-plms": (PNDM, SD15, 10),
    "euler-a": (EULER_A, SD15, 10),
    "lcm": (LCM, SD_BETAS, 6),
    "tcd": ("TCDScheduler", {**SD_BETAS, "prediction_type": "v_prediction"}, 6),
    "dpm-sde": (DPM, {**SD_BETAS, "algorithm_type": "sde-dpmsolver++"}, 10),
    "edm-dpm": (EDM_DPM, edm.PLAYGROUND, 10),
    "edm-dpm-sde-heun": (EDM_DPM, {**edm.SDE, "solver_type": "heun"}, 10),
    "edm-euler-vpred": (EDM_EULER, edm.COSXL, 10),
    "unipc-order3": (UNIPC, {**SD_BETAS, "solver_order": 3}, 10),
    "heun-vpred": (HEUN, {**SD_BETAS, "prediction_type": "v_prediction"}, 10),
    "dpm2-karras-vpred": (
        KDPM2,
        {**SD_BETAS, "use_karras_sigmas": True, "prediction_type": "v_prediction"},
        10,
    ),
    "unipc-bh1-noise-vpred": (
        UNIPC,
        {**SD_BETAS, "solver_type": "bh1", "predict_x0": False, "prediction_type": "v_prediction"},
        10,
    ),
}
MULTISTEP = (DPM, EDM_DPM, UNIPC)  # samplers whose state carries the previous step's x0


@pytest.mark.parametrize("case", ONE_PER_CLASS)
def test_any_step_recomputes_bit_for_bit_in_any_order(case):
    cls_name, config, steps = ONE_PER_CLASS[case]
    sampler = TorchSampler.from_config({**config, "_class_name": cls_name}, steps)
    latent, noise = _inputs(2)
    saved, final = _trajectory(sampler, latent * sampler.init_noise_sigma, noise)
    nexts = [x for x, _ in saved[1:]] + [final]
    for i in (steps // 2, 1, steps - 1):
        x, state = saved[i]
        kept = x.clone()
        out = 0.5 * sampler.scale_model_input(x, i) + noise
        first, first_state = sampler.step(out, i, x, state)
        # another step in between, with another noise source
        sampler.step(out, 0, x, sampler.initial_state(StepNoise(NOISE_SEED + 1)))
        again, again_state = sampler.step(out, i, x, state)
        assert torch.equal(first, nexts[i]) and torch.equal(again, first)
        assert torch.equal(x, kept)  # inputs untouched
        assert len(first_state.x0) == len(again_state.x0)
        for a, b in zip(first_state.x0, again_state.x0, strict=True):
            assert torch.equal(a, b)


def test_dpm_state_carries_the_history_and_is_checked():
    sampler = TorchSampler.from_config({**SD_BETAS, "_class_name": DPM}, 10)
    latent, noise = _inputs(3)
    saved, _ = _trajectory(sampler, latent, noise)
    x, state = saved[5]
    assert state.step_index == 5 and len(state.x0) == 1
    out = 0.5 * x + noise
    second, _ = sampler.step(out, 5, x, state)
    first, _ = sampler.step(out, 5, x, sampler.initial_state())  # a fresh start: first order
    assert not torch.allclose(second, first)
    with pytest.raises(ValueError, match="step 5, not 6"):
        sampler.step(out, 6, x, state)
    order1 = TorchSampler.from_config({**SD_BETAS, "_class_name": DPM, "solver_order": 1}, 10)
    assert order1.step(out, 5, x, state)[1].x0 == ()


def test_plms_state_carries_the_history_and_is_checked():
    sampler = TorchSampler.from_config({**SD15, "_class_name": PNDM}, 10)
    assert sampler.num_steps == 11  # the Heun-like second call at the first timestep
    latent, noise = _inputs(3)
    saved, _ = _trajectory(sampler, latent, noise)
    x, state = saved[6]
    assert state.step_index == 6 and len(state.eps) == 4 and state.start is None
    assert saved[1][1].start is not None and len(saved[1][1].eps) == 1
    out = 0.5 * x + noise
    fourth, _ = sampler.step(out, 6, x, state)
    first, _ = sampler.step(out, 6, x, sampler.initial_state())  # a fresh start: first order
    assert not torch.allclose(fourth, first)
    with pytest.raises(ValueError, match="step 6, not 7"):
        sampler.step(out, 7, x, state)
    with pytest.raises(ValueError, match="step 1 needs step 0's state"):
        sampler.step(out, 1, x, sampler.initial_state())
    # the history a backward walk carries: eps (4 here) then start (absent past call 1)
    assert len(state.tensors()) == 4 and len(saved[1][1].tensors()) == 2
    swapped = state.with_tensors(tuple(t + 1 for t in state.tensors()))
    assert all(torch.equal(a + 1, b) for a, b in zip(state.eps, swapped.eps, strict=True))
    assert swapped.step_index == 6 and swapped.start is None
    restart = saved[1][1].with_tensors(saved[1][1].tensors())
    assert restart.start is saved[1][1].start
    with pytest.raises(ValueError, match="3 tensors for a state that holds 4"):
        state.with_tensors(state.tensors()[:3])


def _one_step(cls_name, config, steps, i, dtype=torch.float64):
    sampler = TorchSampler.from_config({**config, "_class_name": cls_name}, steps)
    shape = (1, 2, 3, 3)
    gen = torch.Generator().manual_seed(4)
    x, out, prev_x0 = (torch.randn(shape, generator=gen, dtype=dtype) for _ in range(3))
    return sampler, x * sampler.init_noise_sigma / 4, out, prev_x0


@pytest.mark.parametrize("case", ONE_PER_CLASS)
def test_step_gradients_pass_gradcheck_in_float64(case):
    cls_name, config, steps = ONE_PER_CLASS[case]
    i = steps // 2
    sampler, x, out, prev_x0 = _one_step(cls_name, config, steps, i)
    inputs = [out.requires_grad_(), x.requires_grad_()]
    if cls_name in MULTISTEP:
        inputs.append(prev_x0.requires_grad_())
    if cls_name == UNIPC:  # its corrector reads the previous step's start sample
        inputs.append((x.detach() * 1.1).requires_grad_())
    if cls_name == HEUN:  # i is a second half: the first half's slope and sample
        inputs += [prev_x0.requires_grad_(), (x.detach() * 1.1).requires_grad_()]
    if cls_name == KDPM2:  # i is a second half: the first half's sample
        inputs.append((x.detach() * 1.1).requires_grad_())
    step_noise = StepNoise(NOISE_SEED) if sampler.stochastic else None

    def fn(out, x, *history):
        extra = {}
        if cls_name == UNIPC:
            *history, start = history
            extra = {"start": start, "order": 1}
        if cls_name == HEUN:
            slope, start = history
            history, extra = (), {"eps": (slope,), "start": start, "step_index": i}
        if cls_name == KDPM2:
            (start,) = history
            history, extra = (), {"start": start, "step_index": i}
        at = {"step_index": i if history else None, **extra}
        state = SamplerState(tuple(history), noise=step_noise, **at)
        prev, new_state = sampler.step(out, i, x, state)
        return (prev, *new_state.tensors())

    assert torch.autograd.gradcheck(fn, inputs)
    # and each input really matters (a detached path would pass gradcheck as a constant)
    grads = torch.autograd.grad(fn(*inputs)[0].sum(), inputs)
    assert all(float(g.abs().sum()) > 0 for g in grads)


def test_sample_loop_backpropagates_to_the_latents():
    sampler = TorchSampler.from_config({**SD_BETAS, "_class_name": DPM}, 6)
    latent, noise = _inputs(5)
    latent.requires_grad_()
    final = sampler.sample_loop(lambda x, t, i: 0.5 * x + noise, latent)
    torch.testing.assert_close(final, _trajectory(sampler, latent, noise)[1], rtol=0, atol=0)
    (grad,) = torch.autograd.grad(final.square().sum(), latent)
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0


@pytest.mark.parametrize(
    ("cls_name", "config"),
    [
        *((EULER, SD15), (DDIM, SD15), (DPM, SD_BETAS), (PNDM, SD15)),
        *((EULER_A, SD15), (LCM, SD_BETAS), (DPM, edm.SDE | SD_BETAS)),
        *((EDM_DPM, edm.PLAYGROUND), (EDM_DPM, edm.SDE), (EDM_EULER, edm.COSXL)),
    ],
)
@pytest.mark.parametrize(
    ("sample_dtype", "out_dtype"),
    [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)],
    ids=["bf16", "fp32-sample-bf16-output"],
)
def test_low_precision_dtype_path_matches_diffusers(cls_name, config, sample_dtype, out_dtype):
    ref, ours = _build(cls_name, config, 10, {})
    x, out = _inputs(6)
    x, out = x.to(sample_dtype), out.to(out_dtype)
    kwargs = (
        {"generator": torch.Generator("cpu").manual_seed(NOISE_SEED)} if ours.stochastic else {}
    )
    expected = ref.step(out, ref.timesteps[0], x, **kwargs).prev_sample
    got, _ = ours.step(out, 0, x, ours.initial_state(StepNoise(NOISE_SEED)))
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected)


def test_flow_match_low_precision_matches_diffusers():
    ref, ours = _build(FLOW, SD3, 10, {})
    x, out = (t.to(torch.bfloat16) for t in _inputs(7))
    expected = ref.step(out, ref.timesteps[0], x).prev_sample
    got, _ = ours.step(out, 0, x, ours.initial_state())
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


def test_unsupported_scheduler_class_names_the_supported_ones():
    with pytest.raises(UserError, match="DEISMultistepScheduler") as info:
        TorchSampler.from_config({"_class_name": "DEISMultistepScheduler"}, 10)
    for name in (
        EULER,
        DDIM,
        DPM,
        FLOW,
        PNDM,
        EULER_A,
        LCM,
        EDM_DPM,
        EDM_EULER,
        UNIPC,
        HEUN,
        KDPM2,
    ):
        assert name in str(info.value)
    with pytest.raises(UserError, match="None"):
        TorchSampler.from_config({"beta_start": 0.1}, 10)


@pytest.mark.parametrize(
    ("cls_name", "config", "key"),
    [
        (EULER, {"prediction_type": "sample"}, "prediction_type"),
        (DDIM, {"thresholding": True}, "thresholding"),
        (
            DPM,
            {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"},
            "algorithm_type",
        ),
        (DPM, {"algorithm_type": "sde-dpmsolver"}, "final_sigmas_type"),  # diffusers refuses it
        (EDM_DPM, {"solver_order": 3}, "solver_order"),
        (LCM, {"thresholding": True}, "thresholding"),
        (UNIPC, {"thresholding": True}, "thresholding"),
        (UNIPC, {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}, "prediction_type"),
        (DPM, {"solver_order": 3}, "solver_order"),
        (DPM, {"variance_type": "learned_range"}, "variance_type"),
        (FLOW, {"stochastic_sampling": True}, "stochastic_sampling"),
        (PNDM, {"skip_prk_steps": False}, "skip_prk_steps"),
    ],
)
def test_step_changing_config_values_raise(cls_name, config, key):
    with pytest.raises(UserError, match=key):
        TorchSampler.from_config({"_class_name": cls_name, **config}, 10)


def test_bad_timestep_arguments_raise_user_errors():
    with pytest.raises(UserError, match="sigmas"):
        TorchSampler.from_config({"_class_name": DDIM}, 10, sigmas=np.ones(10))
    with pytest.raises(UserError, match="mu"):
        TorchSampler.from_config({"_class_name": FLOW, **FLUX_DEV}, 10)
    with pytest.raises(UserError, match="num_inference_steps"):
        TorchSampler.from_config({"_class_name": EULER})


@pytest.mark.parametrize(
    "cls_name",
    [EULER, DDIM, DPM, FLOW, PNDM, EULER_A, LCM, EDM_DPM, EDM_EULER, UNIPC, HEUN, KDPM2],
)
def test_out_of_range_step_index_raises(cls_name):
    plms = {"skip_prk_steps": True} if cls_name == PNDM else {}
    sampler = TorchSampler.from_config({"_class_name": cls_name, **plms}, 5)
    x = torch.zeros(SHAPE)
    for bad in (-1, sampler.num_steps):
        with pytest.raises(IndexError):
            sampler.step(x, bad, x, sampler.initial_state(StepNoise(0)))
        with pytest.raises(IndexError):
            sampler.scale_model_input(x, bad)


def test_core_module_imports_no_layer_above_the_core():
    files = sorted(Path(sampler_module.__file__).parent.glob("sampler*.py"))
    for node in (n for f in files for n in ast.walk(ast.parse(f.read_text()))):
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            assert not name.startswith(("slimdiff.runtime", "slimdiff.export", "slimdiff.compress"))


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("cls_name", "config", "steps"), [(EULER, SD15, 20), (DDIM, SD15, 20), (DPM, SD_BETAS, 20)]
)
def test_cuda_trajectory_matches_diffusers_with_tables_on_device(cls_name, config, steps):
    ref, ours = _build(cls_name, config, steps, {}, device="cuda")
    assert all(v.device.type == "cuda" for v in ours._c.values())
    assert ours.timesteps.device.type == "cuda"
    _compare(ref, ours, seed=8, device="cuda")


def test_step_noise_draws_in_step_order_once_and_checks_its_use():
    like = torch.zeros(SHAPE)
    late = StepNoise(5)
    third = late.draw(3, like, torch.float32)  # earlier draws are made first, in order
    gen = torch.Generator("cpu").manual_seed(5)
    sequential = [torch.randn(SHAPE, generator=gen) for _ in range(4)]
    assert torch.equal(third, sequential[3])
    assert all(torch.equal(late.draw(k, like, torch.float32), sequential[k]) for k in range(4))
    with pytest.raises(ValueError, match="one StepNoise per trajectory"):
        late.draw(1, torch.zeros(1, 4, 4, 4), torch.float32)
    with pytest.raises(ValueError, match="one StepNoise per trajectory"):
        late.draw(1, like, torch.bfloat16)


@pytest.mark.parametrize("case", ["euler-a", "lcm", "dpm-sde", "edm-dpm-sde-heun"])
def test_stochastic_samplers_need_and_use_their_step_noise(case):
    cls_name, config, steps = ONE_PER_CLASS[case]
    sampler = TorchSampler.from_config({**config, "_class_name": cls_name}, steps)
    assert sampler.stochastic
    latent, noise = _inputs(9)
    x = latent * sampler.init_noise_sigma
    with pytest.raises(ValueError, match="adds noise at each step"):
        sampler.initial_state()
    with pytest.raises(ValueError, match="adds noise: start from"):
        sampler.step(noise, 0, x, SamplerState())

    def final(seed):
        return sampler.sample_loop(lambda x, t, i: 0.5 * x + noise, x, StepNoise(seed))

    assert torch.equal(final(1), final(1))
    assert float((final(1) - final(2)).abs().max()) > 1e-3 * float(final(1).abs().max())


@pytest.mark.parametrize("case", ["euler-vpred", "dpm-midpoint", "edm-dpm", "edm-euler-vpred"])
def test_deterministic_samplers_ignore_step_noise(case):
    cls_name, config, steps = ONE_PER_CLASS[case]
    sampler = TorchSampler.from_config({**config, "_class_name": cls_name}, steps)
    assert not sampler.stochastic
    assert sampler.initial_state(StepNoise(1)) is sampler.initial_state()


@pytest.mark.parametrize(("cls_name", "label"), [(HEUN, "Heun"), (KDPM2, "DPM2")])
def test_two_call_steps_need_the_first_halfs_state(cls_name, label):
    sampler = TorchSampler.from_config({**SD_BETAS, "_class_name": cls_name}, 4)
    assert sampler.num_steps == 7  # 2n - 1 calls
    x = torch.ones(SHAPE)
    _, after = sampler.step(x, 0, x, sampler.initial_state())
    assert after.step_index == 1 and after.start is x
    with pytest.raises(ValueError, match=f"{label} call 1 is a second half: it needs call 0"):
        sampler.step(x, 1, x, sampler.initial_state())
    with pytest.raises(ValueError, match="state is for step 1, not 3"):
        sampler.step(x, 3, x, after)
