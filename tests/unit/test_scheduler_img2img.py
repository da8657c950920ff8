"""img2img with the numpy schedulers against diffusers' own, for every ported class.

As diffusers' img2img pipelines (StableDiffusion(XL)Img2Img, StableDiffusion3Img2Img,
FluxImg2Img) run a scheduler: set_timesteps(n), set_begin_index(b) where the class has it
(DDIM, DDPM and PNDM have none), the image's latents noised to timesteps[b] (add_noise;
FlowMatch: scale_noise), then steps b..len(timesteps) - 1, with b = t_start * order. Ours:
set_timesteps(n), set_begin_index(b), add_noise(clean, noise, b), step(..., i) for i from b.
add_noise must agree to float32 rounding (NOISE_TOL); every step's latent within TOL of the
latent's magnitude, with the denoiser of tests/unit/test_schedulers.py (`_trajectory`).
Stochastic schedulers get the same fresh noise on both sides.
"""

from __future__ import annotations

import contextlib
import functools
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from slimdiff.runtime import schedulers  # noqa: E402

from slimdiff.models.kinds import calculate_shift  # noqa: E402
from tests.unit.test_scheduler_ddpm import CASES as DDPM_CASES  # noqa: E402
from tests.unit.test_scheduler_deis import CASES as DEIS_CASES  # noqa: E402
from tests.unit.test_scheduler_dpm_singlestep import CASES as SINGLESTEP_CASES  # noqa: E402
from tests.unit.test_scheduler_dpm_singlestep import _quiet_diffusers  # noqa: E402, F401
from tests.unit.test_scheduler_edm import CASES as EDM_CASES  # noqa: E402
from tests.unit.test_scheduler_lms import DPM2A_CASES, LMS_CASES  # noqa: E402
from tests.unit.test_scheduler_unipc import CASES as UNIPC_CASES  # noqa: E402
from tests.unit.test_scheduler_unipc import FLOW_SD3  # noqa: E402
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
    SHAPE,
    TCD_CASES,
    TOL,
    _pair,
)

NOISE_TOL = 1e-6  # add_noise: |numpy - diffusers| / the noisy latent's magnitude


def _pick(cases: dict, *names: str, **extras) -> dict[str, tuple[dict, int, dict]]:
    """Named (config, steps) cases of the trajectory tests, with the run's `extras`."""
    return {name: (*cases[name][:2], extras) for name in names}


def _flux(seq_len: int, steps: int) -> dict:
    """set_timesteps' arguments as FluxImg2ImgPipeline passes them."""
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    return {"sigmas": np.linspace(1.0, 1 / steps, steps), "mu": mu}


# class -> {case: (config, steps, extras)}; extras: set_timesteps' "mu"/"sigmas" (FLUX),
# "lms_order", "eta" (TCD's gamma), "running" (zero-terminal SNR: the error is measured
# against the largest latent so far, as in tests/unit/test_schedulers.py)
CASES: dict[str, dict[str, tuple[dict, int, dict]]] = {
    "EulerDiscreteScheduler": {
        **_pick(EULER_CASES, "sd15-leading", "karras", "continuous-vpred-karras"),
        **_pick(EULER_CASES, "zero-snr-trailing-vpred-sigma_min", running=True),
    },
    "EulerAncestralDiscreteScheduler": {
        **_pick(EULER_A_CASES, "sdxl-leading"),
        **_pick(EULER_A_CASES, "zero-snr-trailing-vpred", running=True),
    },
    "HeunDiscreteScheduler": _pick(HEUN_CASES, "sd15-leading", "karras", "linspace-vpred"),
    "KDPM2DiscreteScheduler": _pick(KDPM2_CASES, "sdxl-leading", "karras"),
    "KDPM2AncestralDiscreteScheduler": _pick(DPM2A_CASES, "sd15-leading", "karras"),
    "LMSDiscreteScheduler": {  # LMS_CASES: (config, steps, order)
        name: (*LMS_CASES[name][:2], {"lms_order": LMS_CASES[name][2]})
        for name in ("sd15-leading", "karras", "linspace-vpred", "order2")
    },
    "DDIMScheduler": _pick(DDIM_CASES, "sd15", "zero-snr-trailing-vpred"),
    "DPMSolverMultistepScheduler": {
        **_pick(DPM_CASES, "karras", "karras-few-steps", "order3-karras-vpred"),
        **_pick(DPM_CASES, "dpmsolver-heun-vpred", "flow", "flow-order3-few"),
        "sde-2m-karras": (*DPM_SDE_CASES["2m-karras"], {}),
        "flow-mu": ({**FLOW_SD3, "use_dynamic_shifting": True}, 12, {"mu": 0.9}),
    },
    "DPMSolverSinglestepScheduler": _pick(
        SINGLESTEP_CASES, "order2", "order3", "karras", "dpmsolver-order3-vpred", "sde-order2"
    ),
    "DPMSolverSDEScheduler": {  # tests/unit/test_scheduler_dpm_sde.py's, without torchsde
        "sd15-leading": (SD15, 12, {}),
        "karras": ({**SD_BETAS, "use_karras_sigmas": True}, 10, {}),
    },
    "DEISMultistepScheduler": _pick(
        DEIS_CASES, "sdxl-leading", "karras-few-steps-vpred", "order3-few-steps"
    ),
    "DDPMScheduler": _pick(DDPM_CASES, "sd15-leading", "zero-snr-trailing-vpred"),
    # the Runge-Kutta start is refused from b > 0 (test_pndm_runge_kutta_start_is_refused...)
    "PNDMScheduler": _pick(PNDM_CASES, "sd15-plms", "plms-trailing-vpred"),
    "LCMScheduler": _pick(LCM_CASES, "lcm-sdxl-4", "lcm-8", "vpred-clip-original-100"),
    "TCDScheduler": {  # TCD_CASES: (config, steps, eta)
        name: (*TCD_CASES[name][:2], {"eta": TCD_CASES[name][2]})
        for name in ("sdxl-4-gamma0.3", "sdxl-8-deterministic", "vpred-gamma0.5-original-100")
    },
    "UniPCMultistepScheduler": {
        **_pick(UNIPC_CASES, "sd-defaults-bh2-order2", "order3-bh1-sigma_min", "karras"),
        **_pick(UNIPC_CASES, "noise-prediction-order3-vpred", "zero-snr-trailing-vpred"),
        **_pick(UNIPC_CASES, "flow-sd3"),
        "flow-flux": ({**FLOW_SD3, "use_dynamic_shifting": True}, 12, _flux(4096, 12)),
    },
    "EDMEulerScheduler": _pick(EDM_CASES["EDMEulerScheduler"], "karras", "cosxl-like"),
    "EDMDPMSolverMultistepScheduler": _pick(
        EDM_CASES["EDMDPMSolverMultistepScheduler"],
        "playground-25",
        "order3-few-steps",
        "sde-playground",
    ),
    "FlowMatchEulerDiscreteScheduler": {
        "sd3": (SD3, 28, {}),
        "flux-dev": (FLUX_DEV, 28, _flux(4096, 28)),
        "flux-schnell": (FLUX_SCHNELL, 4, _flux(4096, 4)),
    },
    "FlowMatchHeunDiscreteScheduler": {
        "sd3": (SD3, 10, {}),
        "shift-1": ({**SD3, "shift": 1.0}, 6, {}),
    },
}
BEGINS = ("first", "middle", "last")


def _begin(where: str, ours, steps: int) -> int:
    """0; t_start * order at strength 0.5, as the pipelines compute it; the last valid one
    (= t_start * order at strength 1 / steps, but for PNDM's extra timestep)."""
    if where == "first":
        return 0
    if where == "middle":
        return (steps - int(steps * 0.5)) * ours.order
    return len(ours.timesteps) - 1


def _img2img(ref, ours, steps: int, where, seed: int, extras: dict) -> tuple[float, float]:
    """One img2img run on both sides: (add_noise's relative error, the steps' largest)."""
    kwargs = {k: extras[k] for k in ("mu", "sigmas") if k in extras}
    if "sigmas" not in kwargs:
        kwargs["num_inference_steps"] = steps
    ref.set_timesteps(**kwargs)
    ours.set_timesteps(**kwargs)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-6, atol=1e-4)
    if "lms_order" in extras:
        ref.step = functools.partial(ref.step, order=extras["lms_order"])
        ours.lms_order = extras["lms_order"]
    if "eta" in extras:
        ref.step = functools.partial(ref.step, eta=extras["eta"])
        ours.eta = extras["eta"]
    begin = where if isinstance(where, int) else _begin(where, ours, steps)
    if hasattr(ref, "set_begin_index"):  # as the pipelines test it
        ref.set_begin_index(begin)
    ours.set_begin_index(begin)
    assert ours.begin_index == begin

    rng = np.random.default_rng(seed)
    clean, noise, fake_eps = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(3))
    first = ref.timesteps[begin : begin + 1]
    clean_t, noise_t = torch.from_numpy(clean), torch.from_numpy(noise)
    if hasattr(ref, "scale_noise"):  # FlowMatch
        x_ref = ref.scale_noise(clean_t, first, noise_t)
    else:
        x_ref = ref.add_noise(clean_t, noise_t, first)
    x_ours = ours.add_noise(clean, noise, begin)
    assert x_ours.dtype == np.float32 and x_ours.shape == SHAPE
    noise_err = float(np.abs(x_ours - x_ref.numpy()).max()) / float(x_ref.abs().max())
    assert noise_err < NOISE_TOL, f"add_noise at {begin}: relative error {noise_err:.3g}"

    drawn: list[np.ndarray] = []  # each call's fresh noise, given to both sides
    patch = contextlib.nullcontext()
    if ours.stochastic and hasattr(ref, "noise_sampler"):  # DPM++ SDE's Brownian tree
        from tests.unit.test_scheduler_dpm_sde import BrownianFromDraws

        ref.noise_sampler = BrownianFromDraws(drawn)
    elif ours.stochastic:  # diffusers' randn_tensor returns the call's draw

        def randn_tensor(shape, **kwargs):
            return torch.from_numpy(drawn[-1]).reshape(shape)

        patch = mock.patch(f"{type(ref).__module__}.randn_tensor", randn_tensor)
    running = extras.get("running", False)
    worst = scale = 0.0
    with patch:
        for i in range(begin, len(ref.timesteps)):
            t = ref.timesteps[i]
            in_ref = ref.scale_model_input(x_ref, t) if hasattr(ref, "scale_model_input") else x_ref
            in_ours = ours.scale_model_input(x_ours, i)
            extra = {}
            if schedulers.takes_noise(ours, i):
                drawn.append(rng.standard_normal(SHAPE).astype(np.float32))
                extra["noise"] = drawn[-1]
            scale = max(scale if running else 0.0, float(x_ref.abs().max()))
            x_ours = ours.step(np.float32(0.5) * in_ours + fake_eps, i, x_ours, **extra)
            model_output = 0.5 * in_ref + torch.from_numpy(fake_eps)
            x_ref = ref.step(model_output, t, x_ref).prev_sample
            assert x_ours.dtype == np.float32
            ref_np = x_ref.numpy()
            scale = max(scale, float(np.abs(ref_np).max()))
            err = float(np.abs(x_ours - ref_np).max()) / scale
            assert err < TOL, f"begin {begin}, step {i} (t={float(t)}): relative error {err:.3g}"
            worst = max(worst, err)
    return noise_err, worst


@pytest.mark.parametrize(
    ("cls_name", "case", "where"),
    [
        pytest.param(c, k, w, id=f"{c}-{k}-{w}")
        for c, cases in CASES.items()
        for k in cases
        for w in BEGINS
    ],
)
def test_img2img(cls_name, case, where):
    if cls_name == "DPMSolverSDEScheduler":
        pytest.importorskip("torchsde")  # diffusers' class needs it
    config, steps, extras = CASES[cls_name][case]
    ref, ours = _pair(cls_name, config)
    _img2img(ref, ours, steps, where, sum(map(ord, case + where)), extras)


@pytest.mark.parametrize("begin", [1, 2, 3])
def test_pndm_plms_mirrors_diffusers_from_any_begin(begin):
    """diffusers' PLMS from b > 0 is off by one timestep (PNDMScheduler._step_plms): b = 1
    (its Heun-like start spans the repeated t1) and b = 2, 3 alike, mirrored."""
    ref, ours = _pair("PNDMScheduler", SD15)
    _img2img(ref, ours, 10, begin, begin, {})


@pytest.mark.parametrize(("order", "steps"), [(2, 8), (3, 9)])
def test_singlestep_group_cut_at_every_begin(order, steps):
    """A begin index inside a singlestep group: diffusers lowers the order while the
    history is short (`while model_outputs[-order] is None`), so the cut group restarts at
    first order from the begin index and ends at its own order; mirrored."""
    config = {**SD_BETAS, "solver_order": order, "final_sigmas_type": "sigma_min"}
    for begin in range(steps):
        ref, ours = _pair("DPMSolverSinglestepScheduler", config)
        _img2img(ref, ours, steps, begin, begin, {})


def _default(cls_name: str):
    """The class with diffusers' defaults; PNDM without its Runge-Kutta start, which
    cannot start past step 0 (test_pndm_runge_kutta_start_is_refused_after_step_zero)."""
    prk = {"skip_prk_steps": True} if cls_name == "PNDMScheduler" else {}
    return schedulers.scheduler_from_config({"_class_name": cls_name, **prk})


@pytest.mark.parametrize("cls_name", sorted(schedulers._SCHEDULERS))
def test_order_and_api_on_every_class(cls_name):
    """order is diffusers' class attribute; set_timesteps sets the begin index back to 0,
    and a run from step 0 is text-to-image's again."""
    cls = schedulers._SCHEDULERS[cls_name]
    assert type(cls.order) is int and cls.order == getattr(diffusers, cls_name).order
    ours = _default(cls_name)
    for name in ("set_begin_index", "add_noise"):
        assert callable(getattr(ours, name))
    assert ours.begin_index == 0
    kwargs = {"mu": 0.7} if getattr(ours, "use_dynamic_shifting", False) else {}
    ours.set_timesteps(6, **kwargs)
    ours.set_begin_index(2)
    ours.set_timesteps(6, **kwargs)
    assert ours.begin_index == 0
    x = np.ones(SHAPE, np.float32)
    for i in range(len(ours.timesteps)):
        noise = x if schedulers.takes_noise(ours, i) else None
        x = ours.step(np.float32(0.1) * x, i, x, **({} if noise is None else {"noise": noise}))
    assert np.isfinite(x).all()


@pytest.mark.parametrize("cls_name", sorted(schedulers._SCHEDULERS))
def test_misuse_raises(cls_name):
    ours = _default(cls_name)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match="call set_timesteps before add_noise"):
        ours.add_noise(x, x, 0)
    with pytest.raises(ValueError, match="call set_timesteps before set_begin_index"):
        ours.set_begin_index(0)
    ours.set_timesteps(4, **({"mu": 0.7} if getattr(ours, "use_dynamic_shifting", False) else {}))
    last = len(ours.timesteps) - 1
    for begin in (-1, last + 1, 1.0, True, None):
        with pytest.raises(ValueError, match="begin index must be"):
            ours.set_begin_index(begin)
    assert ours.begin_index == 0
    ours.set_begin_index(np.int64(last))  # what the pipelines' arithmetic may hand over
    assert ours.begin_index == last
    with pytest.raises(IndexError):
        ours.add_noise(x, x, last + 1)
    with pytest.raises(ValueError, match="noise of shape"):
        ours.add_noise(x, x[:, :2], 0)


@pytest.mark.filterwarnings("ignore:Should have t")  # torchsde, on diffusers' odd start
@pytest.mark.parametrize(
    "cls_name",
    [name for name, cls in sorted(schedulers._SCHEDULERS.items()) if cls.order == 2],
)
def test_odd_begin_is_refused(cls_name):
    """diffusers from an odd begin starts between the two calls of a step, whose sigmas are
    equal: Heun, DPM2 and flow Heun return the noisy image unchanged, DPM2 a and DPM++ SDE
    NaN. Refused: the pipelines start at t_start * order."""
    if cls_name == "DPMSolverSDEScheduler":
        pytest.importorskip("torchsde")
    config = SD3 if cls_name.startswith("Flow") else SD_BETAS
    ref, ours = _pair(cls_name, config)
    ref.set_timesteps(5)
    ours.set_timesteps(5)
    with pytest.raises(ValueError, match=r"begin index 3 is odd.*t_start \* order"):
        ours.set_begin_index(3)
    ours.set_begin_index(4)  # even: the last step's first call

    ref.set_begin_index(3)
    rng = np.random.default_rng(0)
    clean, noise = (torch.from_numpy(rng.standard_normal(SHAPE).astype(np.float32)) for _ in "ab")
    first = ref.timesteps[3:4]
    x = (
        ref.scale_noise(clean, first, noise)
        if hasattr(ref, "scale_noise")
        else ref.add_noise(clean, noise, first)
    )
    start = x.clone()
    torch.manual_seed(0)
    for t in ref.timesteps[3:]:
        model_input = ref.scale_model_input(x, t) if hasattr(ref, "scale_model_input") else x
        x = ref.step(0.5 * model_input + noise, t, x).prev_sample
    if cls_name in ("KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler"):
        assert torch.isnan(x).any()
    else:
        assert torch.equal(x, start)


def test_pndm_runge_kutta_start_is_refused_after_step_zero():
    """diffusers' step_prk reads its own first (noisiest) timesteps by a call counter,
    whatever the begin index: the image would be denoised as if at timesteps[0]."""
    ours = schedulers.PNDMScheduler(**{**SD15, "skip_prk_steps": False})
    ours.set_timesteps(10)
    ours.set_begin_index(0)
    with pytest.raises(ValueError, match=r"skip_prk_steps=True.*another scheduler"):
        ours.set_begin_index(5)
    assert ours.begin_index == 0


@pytest.mark.parametrize(
    "cls_name",
    [
        "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        "DEISMultistepScheduler",
        "UniPCMultistepScheduler",
        "LMSDiscreteScheduler",
        "PNDMScheduler",
        "EDMDPMSolverMultistepScheduler",
    ],
)
def test_history_starts_afresh_at_begin(cls_name):
    """A multistep history starts at the begin index: a second pass from there repeats the
    first exactly, and a step before it (or a skipped one) is refused."""
    prk = {"skip_prk_steps": True} if cls_name == "PNDMScheduler" else {}
    ours = schedulers.scheduler_from_config({"_class_name": cls_name, **SD_BETAS, **prk})
    ours.set_timesteps(8)
    ours.set_begin_index(3)
    rng = np.random.default_rng(1)
    start, eps = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    with pytest.raises(ValueError, match="history: step 3 expected, got 0"):
        ours.step(eps, 0, start)
    runs = []
    for _ in range(2):
        x = ours.add_noise(start, eps, 3)
        ours.step(np.float32(0.5) * x + eps, 3, x)
        with pytest.raises(ValueError, match="history: step 4 expected, got 5"):
            ours.step(eps, 5, x)
        for i in range(3, len(ours.timesteps)):
            x = ours.step(np.float32(0.5) * x + eps, i, x)
        runs.append(x)
    np.testing.assert_array_equal(runs[0], runs[1])
