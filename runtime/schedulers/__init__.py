"""Numpy ports of the diffusers schedulers that slimdiff's torch-free runtime supports.

Each class mirrors the diffusers class of the same name (diffusers 0.42) closely enough
that a whole denoising trajectory agrees with diffusers' float32 torch one to a few 1e-6
of the latent magnitude; tests/unit/test_schedulers.py checks this against diffusers.
The schedule formulas are the easy part; what keeps the two in step is following
diffusers' dtype path: float32 where it computes in float32 torch (betas, alpha-bars,
sigmas, DPM-Solver's coefficients), float64 where it computes in float64 numpy
(interpolation, Karras sigmas, SD3's default flow schedule), float32 numpy where it does
(FLUX's shifted sigmas). Explicit `np.float32` scalars keep numpy 1.x and 2.x alike.

- `EulerDiscreteScheduler`: Euler method of Karras et al., "Elucidating the Design Space of
  Diffusion-Based Generative Models" (2022, arXiv:2206.00364), Algorithm 2 without churn.
- `HeunDiscreteScheduler`: Heun's method of Karras et al. (2022), Algorithm 1 without churn:
  two denoiser calls per step but the last.
- `KDPM2DiscreteScheduler` ("DPM2"): the same paper's second-order step through the
  geometric midpoint of each sigma pair (k-diffusion's sample_dpm_2).
- `KDPM2AncestralDiscreteScheduler` ("DPM2 a"): DPM2 with fresh noise at each step.
- `LMSDiscreteScheduler`: linear multistep (order 4) on the same sigmas, k-diffusion's
  `sample_lms`, with exact Lagrange-polynomial coefficients.
- `DDIMScheduler`: Song, Meng & Ermon, "Denoising Diffusion Implicit Models" (2021,
  arXiv:2010.02502), deterministic (eta = 0).
- `DPMSolverMultistepScheduler`: multistep DPM-Solver++ (2M, midpoint or Heun) of Lu et al.,
  "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models"
  (2022, arXiv:2211.01095), orders 1-3, its SDE form and DPM-Solver's noise-prediction
  forms, on VP or flow-matching sigmas (SD3, FLUX: `flow-dpm++2m`).
- `DPMSolverSinglestepScheduler` ("DPM++ 2S", not ancestral): singlestep DPM-Solver(++) of
  Lu et al. (2022, arXiv:2206.00927 and arXiv:2211.01095), orders 1-3, and its SDE form.
- `DPMSolverSDEScheduler` ("DPM++ SDE"): k-diffusion's stochastic DPM-Solver++ (r = 1/2),
  two calls per step; its Brownian-tree noise is rebuilt from independent draws.
- `DEISMultistepScheduler`: log-rho multistep DEIS of Zhang & Chen, "Fast Sampling of
  Diffusion Models with Exponential Integrator" (2023, arXiv:2204.13902), orders 1-3.
- `DDPMScheduler`: ancestral sampling of Ho et al., "Denoising Diffusion Probabilistic
  Models" (2020, arXiv:2006.11239), with its fixed variances.
- `EulerAncestralDiscreteScheduler` ("Euler a"): Euler with fresh noise at each step, the
  ancestral sampler of Karras et al. (2022) as k-diffusion has it.
- `PNDMScheduler`: pseudo linear multistep (PLMS) of Liu et al., "Pseudo Numerical Methods
  for Diffusion Models on Manifolds" (2022, arXiv:2202.09778), the SD1.x/SD2 hub default.
- `LCMScheduler`: multistep consistency sampling of Luo et al., "Latent Consistency Models"
  (2023, arXiv:2310.04378), for LCM-distilled models and LCM-LoRA (2-8 steps).
- `TCDScheduler`: the strategic stochastic sampling of Zheng et al., "Trajectory
  Consistency Distillation" (2024, arXiv:2402.19159), for TCD models and TCD-LoRA; its
  gamma is the run's `eta`.
- `UniPCMultistepScheduler`: the predictor-corrector of Zhao et al., "UniPC" (2023,
  arXiv:2302.04867).
- `EDMEulerScheduler`, `EDMDPMSolverMultistepScheduler`: Euler and DPM-Solver++ (2M, its
  SDE form, 3M) on the preconditioned sigmas of Karras et al. (2022, arXiv:2206.00364), for
  EDM-trained models (Playground v2.5).
- `FlowMatchEulerDiscreteScheduler`: Euler on the rectified-flow ODE, Lipman et al., "Flow
  Matching for Generative Modeling" (2023, arXiv:2210.02747), with the timestep shift of
  Esser et al., "Scaling Rectified Flow Transformers" (SD3, 2024, arXiv:2403.03206) and
  FLUX's resolution-dependent shift (`mu`: slimdiff.models.kinds.calculate_shift, from
  diffusers' pipeline_flux.py, which the runtime's conditioning computes).
- `FlowMatchHeunDiscreteScheduler`: Heun on the same ODE, SD3's static shift only.

`use_karras_sigmas`, `use_exponential_sigmas` and `use_beta_sigmas` (Lee et al., "Beta
Sampling is All You Need", arXiv:2407.12173) redraw the sigmas where diffusers does
(_sigmas.py, with its own Beta quantile instead of scipy's).
"leading"/"trailing"/"linspace" spacing and zero-terminal-SNR rescaling follow Lin et al.,
"Common Diffusion Noise Schedules and Sample Steps are Flawed" (2024, arXiv:2305.08891);
v-prediction follows Salimans & Ho, "Progressive Distillation" (2022, arXiv:2202.00512).

Unlike diffusers, `scale_model_input` and `step` take the step index explicitly, so no
hidden counter can drift; the multistep ones (DPM-Solver++, DEIS, LMS, PNDM, UniPC) keep
their model-output history and require steps in order. The stochastic ones (`stochastic`
true: Euler a, DPM2 a, DDPM, DPM++ SDE, LCM, TCD with eta > 0, DPM-Solver++'s SDE forms)
take each step's standard-normal noise as `step(..., noise=)` where `takes_noise` says so,
which the runtime draws from the seed; diffusers draws it from torch's generator, so their
images differ from diffusers' for the same seed (the deterministic ones match it). Only
numpy and the standard library are imported (the runtime is torch-free).

`switch_scheduler` builds another scheduler's config from a bundle's, as diffusers'
`OtherScheduler.from_config(pipe.scheduler.config)` does (`slimdiff run --scheduler`).

Example (the runtime's denoising loop, without guidance):

    sched = scheduler_from_config(json.loads(Path("scheduler/scheduler_config.json").read_text()))
    sched.set_timesteps(30)  # FLUX: set_timesteps(sigmas=np.linspace(1, 1/30, 30), mu=mu)
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(sched.init_noise_sigma)
    for i, t in enumerate(sched.timesteps):
        eps = unet(sched.scale_model_input(x, i), t, cond)
        if takes_noise(sched, i):  # Euler a, LCM, ...: fresh noise at this step
            x = sched.step(eps, i, x, noise=rng.standard_normal(x.shape, dtype=np.float32))
        else:
            x = sched.step(eps, i, x)

img2img, as diffusers' img2img pipelines (SD, SDXL, SD3, FLUX): keep the schedule's last
steps from begin = t_start * sched.order (t_start = n - int(n * strength)), call
`sched.set_begin_index(begin)` after set_timesteps, start from
`x = sched.add_noise(image_latents, rng.standard_normal(shape, dtype=np.float32), begin)`
instead of the scaled noise, and loop `for i in range(begin, len(sched.timesteps))`.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from ._common import check_train_timesteps
from ._sigmas import SCHEDULES
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .deis import DEISMultistepScheduler
from .dpm_sde import DPMSolverSDEScheduler
from .dpm_singlestep import DPMSolverSinglestepScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .edm_dpm_solver import EDMDPMSolverMultistepScheduler
from .edm_euler import EDMEulerScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .flow_match import FlowMatchEulerDiscreteScheduler
from .flow_match_heun import FlowMatchHeunDiscreteScheduler
from .heun import HeunDiscreteScheduler
from .kdpm2 import KDPM2DiscreteScheduler
from .kdpm2_ancestral import KDPM2AncestralDiscreteScheduler
from .lcm import LCMScheduler
from .lms import LMSDiscreteScheduler
from .pndm import PNDMScheduler
from .tcd import TCDScheduler
from .unipc import UniPCMultistepScheduler

__all__ = [
    "SCHEDULER_ALIASES",
    "SIGMA_SCHEDULES",
    "SIGMA_SCHEDULE_CLASSES",
    "SPACING_CLASSES",
    "TIMESTEP_SPACINGS",
    "ZERO_SNR_CLASSES",
    "DDIMScheduler",
    "DDPMScheduler",
    "DEISMultistepScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSDEScheduler",
    "DPMSolverSinglestepScheduler",
    "EDMDPMSolverMultistepScheduler",
    "EDMEulerScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "FlowMatchHeunDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "LCMScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "Scheduler",
    "TCDScheduler",
    "UniPCMultistepScheduler",
    "replaced_schedule",
    "scheduler_from_config",
    "scheduler_names",
    "scheduler_process",
    "switch_scheduler",
    "switch_warning",
    "takes_noise",
    "with_sigmas",
    "with_spacing",
]


class Scheduler(Protocol):
    """What every scheduler here provides; the runtime's denoising loop uses only this."""

    timesteps: np.ndarray  # what the denoiser receives as `timestep` (float32), one per call
    init_noise_sigma: float  # the initial N(0, I) latent is multiplied by this
    stochastic: bool  # True: step() takes `noise`, standard normal of the sample's shape
    order: int  # denoiser calls per step: 2 for Heun, DPM2 (a), DPM++ SDE, flow Heun; else 1

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        mu: float | None = None,
        sigmas: np.ndarray | None = None,
    ) -> None: ...

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray: ...

    def step(self, model_output: np.ndarray, step_index: int, sample: np.ndarray) -> np.ndarray:
        """One denoising step from timesteps[step_index]; returns the previous sample.
        Stochastic schedulers also take `noise=`."""
        ...

    def set_begin_index(self, begin: int) -> None:
        """img2img: start the run at step `begin` (t_start * order), after set_timesteps;
        a multistep history starts afresh there. ValueError outside 0..len(timesteps) - 1
        or where diffusers' run from there is ill-defined (odd for order 2, ...)."""
        ...

    def add_noise(self, original: np.ndarray, noise: np.ndarray, step_index: int) -> np.ndarray:
        """img2img's first latents: clean `original` noised to timesteps[step_index] with
        standard-normal `noise` of its shape, float32, as diffusers' add_noise (FlowMatch:
        scale_noise) at that step."""
        ...


_SCHEDULERS: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler,
        HeunDiscreteScheduler,
        KDPM2DiscreteScheduler,
        KDPM2AncestralDiscreteScheduler,
        LMSDiscreteScheduler,
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        DPMSolverSinglestepScheduler,
        DPMSolverSDEScheduler,
        DEISMultistepScheduler,
        DDPMScheduler,
        PNDMScheduler,
        LCMScheduler,
        TCDScheduler,
        UniPCMultistepScheduler,
        EDMEulerScheduler,
        EDMDPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        FlowMatchHeunDiscreteScheduler,
    )
}

# Short names (the ones other UIs use) for a class and the config values it sets on top of
# the bundle's: "dpm++2m-karras" is DPM-Solver++ 2M on Karras sigmas. "ddim", "ddpm" and
# "pndm" set what Stable Diffusion's own configs of those classes set: no x0 clipping
# (latents are not in [-1, 1]: from a config without the key, DDIM's default
# clip_sample=True ruins every image, accuracy 0.0 on toy:shapes) and PLMS without the
# Runge-Kutta start. "dpm++2s" is diffusers' singlestep DPM-Solver++, not A1111's
# "DPM++ 2S a" (which is ancestral).
# The class names give diffusers' from_config exactly.
SCHEDULER_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2-karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm2-a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm2-a-karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lms-karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {"clip_sample": False}),
    "ddpm": ("DDPMScheduler", {"clip_sample": False}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm++2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpm++2m-sde-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "dpm++2s": ("DPMSolverSinglestepScheduler", {}),
    "dpm++2s-karras": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    "dpm++sde": ("DPMSolverSDEScheduler", {}),
    "dpm++sde-karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "deis": ("DEISMultistepScheduler", {}),
    "deis-karras": ("DEISMultistepScheduler", {"use_karras_sigmas": True}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "edm-euler": ("EDMEulerScheduler", {}),
    "edm-dpm++2m": ("EDMDPMSolverMultistepScheduler", {}),
    "edm-dpm++2m-sde": ("EDMDPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow-heun": ("FlowMatchHeunDiscreteScheduler", {}),
    # DPM-Solver++ 2M and UniPC on flow-matching sigmas (flow_shift: the model's `shift`; a
    # dynamically shifted config, FLUX's, is shifted by the pipeline's mu instead)
    "flow-dpm++2m": (
        "DPMSolverMultistepScheduler",
        {"use_flow_sigmas": True, "prediction_type": "flow_prediction"},
    ),
    "flow-unipc": (
        "UniPCMultistepScheduler",
        {"use_flow_sigmas": True, "prediction_type": "flow_prediction"},
    ),
}


def takes_noise(scheduler: Scheduler, step_index: int) -> bool:
    """Whether call `step_index` of a scheduler adds fresh noise (`step(..., noise=)`): every
    call of a stochastic one, unless it says otherwise (`takes_noise`: DPM2 a's second
    halves only, DDPM's steps from t > 0), so that a stream of draws lines up with
    diffusers' draws, which come only where they are used."""
    if not scheduler.stochastic:
        return False
    own = getattr(scheduler, "takes_noise", None)
    return True if own is None else bool(own(step_index))


def scheduler_from_config(config: dict[str, Any]) -> Scheduler:
    """Build from a diffusers scheduler_config.json dict, picking the class by "_class_name".

    Private keys ("_diffusers_version", "_use_default_values", ...) and keys that do not
    affect the ported code paths are ignored, as diffusers ignores foreign keys; values
    that would change the maths but are not ported raise ValueError, as do sizes out of
    range (num_train_timesteps: every table is that long) and a malformed
    `_use_default_values` (switch_scheduler reads it).
    """
    name = config.get("_class_name")
    if not isinstance(name, str) or name not in _SCHEDULERS:
        raise ValueError(
            f"unsupported scheduler class {name!r}; the numpy runtime supports "
            f"{', '.join(sorted(_SCHEDULERS))}"
        )
    if "num_train_timesteps" in config:
        check_train_timesteps(config["num_train_timesteps"])
    _default_keys(config)
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    return _SCHEDULERS[name](**kwargs)


def _default_keys(config: dict[str, Any]) -> set[str]:
    """The keys the original scheduler_config.json left out (`_use_default_values`, which
    diffusers' save_config writes and slimdiff export keeps); ValueError unless it is a list
    of key names."""
    keys = config.get("_use_default_values", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ValueError(
            "_use_default_values must be a list of config key names, as diffusers writes "
            f"it, not {keys!r:.60}"
        )
    return set(keys)


def scheduler_names() -> list[str]:
    """What `switch_scheduler` takes: the short names, then the class names."""
    return [*SCHEDULER_ALIASES, *sorted(_SCHEDULERS)]


def scheduler_process(class_name: str, config: dict[str, Any] | None = None) -> str:
    """The diffusion process a scheduler samples, from its diffusers name and config:
    FlowMatch* and the DPM-Solver on flow sigmas (rectified flow: SD3, FLUX), EDM*
    (Karras et al.'s preconditioned sigmas: Playground v2.5), the rest the discrete-time
    VP process (SD1.5, SDXL). A model trained for one cannot be sampled with another's
    scheduler."""
    if class_name.startswith("FlowMatch") or (config or {}).get("use_flow_sigmas"):
        return "flow matching"
    return "EDM" if class_name.startswith("EDM") else "discrete-time VP"


SIGMA_KEYS = frozenset(f"use_{name}_sigmas" for name in SCHEDULES)


# The ported classes that honour `rescale_betas_zero_snr` (as their diffusers classes do;
# tests/unit/test_schedulers.py keeps the set equal to diffusers').
ZERO_SNR_CLASSES = frozenset(
    {
        "DDIMScheduler",
        "DDPMScheduler",
        "DPMSolverMultistepScheduler",
        "EulerAncestralDiscreteScheduler",
        "EulerDiscreteScheduler",
        "LCMScheduler",
        "TCDScheduler",
        "UniPCMultistepScheduler",
    }
)


def switch_warning(config: dict[str, Any], switched: dict[str, Any]) -> str | None:
    """What a switch from `config` to `switched` (switch_scheduler's result) silently
    drops that the model depends on, as one line; None when nothing. diffusers' from_config
    drops it the same way: a zero-terminal-SNR model (SD2.1-v style, trained with
    rescaled betas) sampled by a class without rescale_betas_zero_snr gets the ordinary
    schedule, whose last step never reaches pure noise."""
    target = switched.get("_class_name")
    if config.get("rescale_betas_zero_snr") and target not in ZERO_SNR_CLASSES:
        return (
            f"{target} has no rescale_betas_zero_snr: this zero-terminal-SNR model is "
            "sampled on the ordinary beta schedule, which it was not trained for; use one "
            f"of {', '.join(sorted(ZERO_SNR_CLASSES))}"
        )
    return None


def _target(name: str, kept: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    class_name, overrides = SCHEDULER_ALIASES.get(name, (name, {}))
    return class_name, {**kept, **overrides}


def switch_scheduler(config: dict[str, Any], name: str) -> dict[str, Any]:
    """`config` (a scheduler_config.json dict) rewritten for scheduler `name`, a short name
    of SCHEDULER_ALIASES or a class name, as diffusers' `from_config` does: the keys both
    classes know carry over (betas, prediction type, spacing), the new class ignores the
    rest. Raises ValueError for an unknown name, or a sampler of another process (flow
    matching for an SD1.5/SDXL model, a VP sampler for an EDM-trained one, ...).

    Example:
        >>> switch_scheduler({"_class_name": "PNDMScheduler", "beta_schedule": "linear"},
        ...                  "euler-a")["_class_name"]
        'EulerAncestralDiscreteScheduler'
    """
    class_name, overrides = SCHEDULER_ALIASES.get(name, (name, {}))
    if class_name not in _SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; use one of: {', '.join(scheduler_names())}")
    current = str(config.get("_class_name", ""))
    # diffusers' from_config drops the keys the original scheduler_config.json left out
    # (`_use_default_values`, which slimdiff export keeps): they take the new class's
    # defaults (a hub SD1.5 folder's PNDM "leading" spacing becomes Euler's "linspace")
    defaults = _default_keys(config)
    kept = {k: v for k, v in config.items() if not k.startswith("_") and k not in defaults}
    switched = {"_class_name": class_name, **replaced_schedule(kept, overrides), **overrides}
    trained, target = scheduler_process(current, config), scheduler_process(class_name, switched)
    if target != trained:
        allowed = [n for n in scheduler_names() if scheduler_process(*_target(n, kept)) == trained]
        raise ValueError(
            f"{name} cannot replace {current or 'this scheduler'}: it samples the {target} "
            f"process, the model was trained for the {trained} one; use one of: "
            f"{', '.join(allowed) or 'none ported yet'}"
        )
    if switched.get("use_flow_sigmas") and "flow_shift" not in config and "shift" in config:
        # a flow-match config's `shift` is what DPM-Solver calls flow_shift (SD3: 3.0);
        # diffusers' from_config would leave it at 1.0, sampling SD3 off its schedule
        switched["flow_shift"] = config["shift"]
    return switched


def replaced_schedule(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`config` less its sigma-schedule flags when `overrides` sets one: a "-karras" name
    replaces the bundle's schedule (exponential, Beta, DPM-Solver's Lu lambdas) rather
    than clashing with it."""
    if not SIGMA_KEYS & overrides.keys():
        return config
    return {k: v for k, v in config.items() if k not in SIGMA_KEYS | {"use_lu_lambdas"}}


SIGMA_SCHEDULES = SCHEDULES  # what with_sigmas takes: karras, exponential, beta
# The ported classes that take use_karras/exponential/beta_sigmas, all three, as their
# diffusers classes do (tests/unit/test_schedulers.py keeps the set equal to diffusers').
SIGMA_SCHEDULE_CLASSES = frozenset(
    {
        "DEISMultistepScheduler",
        "DPMSolverMultistepScheduler",
        "DPMSolverSDEScheduler",
        "DPMSolverSinglestepScheduler",
        "EulerDiscreteScheduler",
        "FlowMatchEulerDiscreteScheduler",
        "HeunDiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
        "KDPM2DiscreteScheduler",
        "LMSDiscreteScheduler",
        "UniPCMultistepScheduler",
    }
)


# diffusers' timestep spacings: where a schedule of n steps puts its timesteps in the
# training range ("trailing" ends on the last training step: what SDXL-Lightning, Hyper-SD,
# SDXL-Turbo, DMD2 and other few-step distillations sample with)
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# The ported classes whose schedule follows `timestep_spacing`, as their diffusers classes
# (LCM and TCD take the key but their schedules ignore it; tests/unit/test_schedulers.py
# keeps the set equal to diffusers')
SPACING_CLASSES = frozenset(
    {
        "DDIMScheduler",
        "DDPMScheduler",
        "DEISMultistepScheduler",
        "DPMSolverMultistepScheduler",
        "DPMSolverSDEScheduler",
        "EulerAncestralDiscreteScheduler",
        "EulerDiscreteScheduler",
        "HeunDiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
        "KDPM2DiscreteScheduler",
        "LMSDiscreteScheduler",
        "PNDMScheduler",
        "UniPCMultistepScheduler",
    }
)


def with_spacing(config: dict[str, Any], spacing: str) -> dict[str, Any]:
    """`config` (a scheduler_config.json dict) with diffusers' `timestep_spacing` set to
    `spacing` (one of TIMESTEP_SPACINGS), as `from_config(config, timestep_spacing=...)`
    sets it. ValueError for an unknown spacing, or a class without one (flow matching,
    EDM, LCM, TCD, DPM-Solver singlestep), naming the classes that have it.

    Example:
        >>> with_spacing({"_class_name": "EulerDiscreteScheduler"}, "trailing")
        {'_class_name': 'EulerDiscreteScheduler', 'timestep_spacing': 'trailing'}
    """
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; use one of: {', '.join(TIMESTEP_SPACINGS)}")
    name = str(config.get("_class_name", ""))
    if name not in SPACING_CLASSES:
        raise ValueError(
            f"{name or 'this scheduler'} has no timestep spacing; pick a scheduler that has "
            f"one ({', '.join(sorted(SPACING_CLASSES))})"
        )
    return {**config, "timestep_spacing": spacing}


def with_sigmas(config: dict[str, Any], schedule: str) -> dict[str, Any]:
    """`config` (a scheduler_config.json dict) sampling on `schedule`'s sigmas (one of
    SIGMA_SCHEDULES: Karras, exponential or Beta, between the same ends) instead of its
    own: the class's `use_<schedule>_sigmas` key set, the other schedule keys dropped.
    ValueError for an unknown schedule, or a class without that key (DDIM, PNDM, LCM, ...),
    naming the classes that have it.

    Example:
        >>> with_sigmas({"_class_name": "EulerDiscreteScheduler"}, "beta")["use_beta_sigmas"]
        True
    """
    if schedule not in SIGMA_SCHEDULES:
        raise ValueError(f"unknown sigmas {schedule!r}; use one of: {', '.join(SIGMA_SCHEDULES)}")
    key = f"use_{schedule}_sigmas"
    name = str(config.get("_class_name", ""))
    if name not in SIGMA_SCHEDULE_CLASSES:
        raise ValueError(
            f"{name or 'this scheduler'} has no {schedule} sigmas; pick a scheduler that "
            f"has them ({', '.join(sorted(SIGMA_SCHEDULE_CLASSES))})"
        )
    return {**replaced_schedule(config, {key: True}), key: True}
