"""A stateless torch sampler: any denoising step of a trajectory, with or without autograd.

Compression passes need to recompute single steps out of order: EcoDiff walks a trajectory
backwards recomputing one step at a time with grad, QuEST builds per-timestep targets.
diffusers' schedulers cannot do this: their `step` reads and advances hidden state
(`_step_index`, DPM-Solver's `model_outputs` history and `lower_order_nums`), so a step
depends on which steps ran before it on that object. `TorchSampler` has the API of the
runtime's numpy schedulers (explicit step index) and carries a multistep solver's history
in an explicit immutable `SamplerState` instead, so `step` is a pure function.

diffusers still computes the schedule tables (a fresh `diffusers.<Class>.from_config(config)
.set_timesteps(...)`, read once), so every spacing, sigma schedule and shift option that
only changes the tables is supported as diffusers has it. The per-step maths is redone
here in torch, with diffusers' float32 dtype path and its order of operations, so a
trajectory agrees with diffusers' (bit for bit on CPU in practice). The per-step scalar
coefficients are computed once, as 0-d float32 tensors in exactly diffusers' expressions,
and then kept on the sampler's device, so a step launches no host sync.

The methods and papers are those of the numpy ports (see `slimdiff.runtime.schedulers`):
Euler (Karras et al. 2022, arXiv:2206.00364, Algorithm 2 without churn), DDIM with eta = 0
(Song et al. 2021, arXiv:2010.02502), multistep DPM-Solver++ 2M (Lu et al. 2022,
arXiv:2211.01095), PLMS (Liu et al. 2022, arXiv:2202.09778; the hub SD1.5 default, with
skip_prk_steps as its config sets), flow-matching Euler (Lipman et al. 2023,
arXiv:2210.02747; SD3's shift, arXiv:2403.03206), Heun (Karras et al., Algorithm 1), DPM2,
Euler ancestral (SDXL-Turbo's), LCM (Luo et al. 2023, arXiv:2310.04378), TCD (Zheng et al.
2024, arXiv:2402.19159), DPM-Solver++ 2M SDE, UniPC and the EDM pair (Playground v2.5's).
Euler a, LCM and TCD are in slimdiff/sampler_stochastic.py, Heun and DPM2 in
sampler_two_call.py, UniPC in sampler_unipc.py, the EDM pair in sampler_edm.py. These are
core modules: they import no slimdiff layer above the core.

Stochastic samplers (`stochastic`: Euler ancestral, LCM, TCD with eta > 0, the SDE solvers)
add noise at each step. It comes from the state's `StepNoise`, which draws what diffusers'
step draws from a seeded CPU generator, in the same order and dtype; a pipeline run with
that generator and the sampler give the same trajectory, and a recomputed step adds the same
noise as the first time.

Example (EcoDiff's time-step checkpointing: a no-grad forward pass keeping only latents
and states, then any step again with grad):

    sampler = TorchSampler.from_config(pipe.scheduler.config, 30, device="cuda")
    x, state = noise * sampler.init_noise_sigma, sampler.initial_state()
    saved = []
    with torch.no_grad():
        for i, t in enumerate(sampler.timesteps):
            saved.append((x, state))
            eps = unet(sampler.scale_model_input(x, i), t, cond).sample
            x, state = sampler.step(eps, i, x, state)
    x_i, state_i = saved[i]  # later, with grad: the same step i, no scheduler to rewind
    eps = masked_unet(sampler.scale_model_input(x_i, i), sampler.timesteps[i], cond).sample
    x_next, _ = sampler.step(eps, i, x_i, state_i)
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from slimdiff.errors import UserError

__all__ = ["SamplerState", "StepNoise", "TorchSampler", "sampler_classes"]

Tensor = torch.Tensor
Coefficients = dict[str, Tensor]


@dataclass(frozen=True, eq=False)
class SamplerState:
    """What a multistep solver carries from one step to the next; empty for the others.

    `x0`: DPM-Solver++'s data predictions of earlier steps, oldest first (differentiable:
    gradients flow through them into the step that made them). `eps` and `start`: PLMS's
    noise predictions (the Adams-Bashforth history) and the sample its Heun-like second
    call restarts from. UniPC keeps its converted outputs in `x0`, the sample its last
    prediction started from in `start` and that prediction's `order`. `step_index`: the step
    this state feeds, None for a state without history, valid at any step (a fresh start).
    `noise`: a stochastic sampler's per-step noise (StepNoise).
    """

    x0: tuple[Tensor, ...] = ()
    step_index: int | None = None
    eps: tuple[Tensor, ...] = ()
    start: Tensor | None = None
    noise: StepNoise | None = None
    order: int = 0  # UniPC: the order of the prediction that made the sample

    def tensors(self) -> tuple[Tensor, ...]:
        """The history's tensors in a fixed order (x0, eps, start): what a backward walk
        carries gradients through (EcoDiff's, compress/prune/train.py)."""
        return (*self.x0, *self.eps, *(() if self.start is None else (self.start,)))

    def with_tensors(self, tensors: tuple[Tensor, ...]) -> SamplerState:
        """This state with its history's tensors replaced, in `tensors()`'s order."""
        tensors = tuple(tensors)
        if len(tensors) != len(self.tensors()):
            raise ValueError(f"{len(tensors)} tensors for a state that holds {len(self.tensors())}")
        n0, n1 = len(self.x0), len(self.x0) + len(self.eps)
        start = tensors[n1] if self.start is not None else None
        return dataclasses.replace(self, x0=tensors[:n0], eps=tensors[n0:n1], start=start)


_EMPTY = SamplerState()


class StepNoise:
    """The noise a stochastic scheduler draws at each step, as diffusers draws it.

    diffusers' stochastic steps (Euler ancestral, LCM, the SDE DPM-Solvers) call
    `randn_tensor(shape, generator=..., dtype=...)` once per step, in step order; with a CPU
    generator the draw happens on the CPU. This draws the same way from a CPU generator
    seeded `seed`, so a pipeline run with `generator=torch.Generator("cpu").manual_seed(seed)`
    and a sampler started with `StepNoise(seed)` add the same noise. Draw k is made once and
    kept: a step recomputed later (EcoDiff's backward walk) gets the same noise, so steps
    stay pure functions of their arguments.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._generator = torch.Generator("cpu").manual_seed(seed)
        self._draws: list[Tensor] = []

    def draw(self, k: int, like: Tensor, dtype: torch.dtype) -> Tensor:
        """Step k's noise: shaped like `like`, on its device, drawn in `dtype` (as the
        scheduler draws it); earlier draws are made first, in order."""
        while len(self._draws) <= k:
            noise = torch.randn(like.shape, generator=self._generator, dtype=dtype)
            self._draws.append(noise.to(like.device))
        noise = self._draws[k]
        if noise.shape != like.shape or noise.dtype != dtype:
            raise ValueError(
                f"step {k}'s noise was drawn as {tuple(noise.shape)} {noise.dtype}, "
                f"now asked for {tuple(like.shape)} {dtype}: one StepNoise per trajectory"
            )
        return noise.to(like.device)


def _upcast(x: Tensor) -> Tensor:
    # diffusers: sample.to(float32). float64 stays float64 (the one departure, so that
    # gradcheck can run in float64); fp16/bf16/fp32 follow diffusers exactly
    return x if x.dtype == torch.float64 else x.to(torch.float32)


class TorchSampler:
    """Stateless torch version of a diffusers scheduler; build with `from_config`.

    Attributes: `timesteps` (what the denoiser receives, in the dtype diffusers' scheduler
    gives it: float32 for Euler/FlowMatch, int64 for DDIM/DPM-Solver; FLUX's pipeline
    divides by 1000 itself), `init_noise_sigma` (float: x_T is N(0, I) noise times it), `num_steps`.
    """

    # config key -> supported values, for keys that change the step maths (not the tables)
    supported: ClassVar[dict[str, tuple[Any, ...]]] = {}

    def __init__(self, scheduler: Any, device: str | torch.device | None = None) -> None:
        self.device = torch.device("cpu" if device is None else device)
        self.config = dict(scheduler.config)
        self.timesteps: Tensor = scheduler.timesteps.to(self.device)
        self.num_steps = len(self.timesteps)
        self.init_noise_sigma = float(getattr(scheduler, "init_noise_sigma", 1.0))
        # per-step coefficients as diffusers computes them: 0-d float32 tensors on the CPU
        rows = [self._coefficients(scheduler, i) for i in range(self.num_steps)]
        self._c = {k: torch.stack([r[k] for r in rows]).to(self.device) for k in rows[0]}

    @classmethod
    def from_config(
        cls,
        config: dict[str, Any],
        num_inference_steps: int | None = None,
        *,
        sigmas: Any = None,
        mu: float | None = None,
        device: str | torch.device | None = None,
        eta: float = 0.0,
    ) -> TorchSampler:
        """Build from a diffusers scheduler config (`pipe.scheduler.config`) by `_class_name`.

        `sigmas`/`mu` go to diffusers' `set_timesteps` as given (FLUX: `sigmas=np.linspace(1,
        1/n, n), mu=calculate_shift(...)`; Euler: custom sigmas including the final one).
        `eta`: what the pipeline passes the step (TCD's gamma; no other sampler takes one).

        Example:
            sampler = TorchSampler.from_config(pipe.scheduler.config, 30)
        """
        import diffusers  # here, not at the top: importing it costs seconds

        name = config.get("_class_name")
        samplers = sampler_classes()
        if name not in samplers:
            raise UserError(
                f"scheduler {name!r} has no torch sampler; supported: {', '.join(samplers)} "
                "(calibrate with one of the model's own process: calibration.scheduler in the "
                "recipe, e.g. DPMSolverMultistepScheduler for a VP model, "
                "EDMDPMSolverMultistepScheduler for an EDM one)"
            )
        sampler_cls = samplers[name]
        try:
            scheduler = getattr(diffusers, name).from_config(config)
        except (ValueError, NotImplementedError) as e:  # diffusers refuses the combination
            raise UserError(f"{name}: {e}") from e
        for key, allowed in sampler_cls.supported.items():
            # read back from diffusers, which normalises aliases ("deis" -> "dpmsolver++")
            value = scheduler.config.get(key, allowed[0])
            if value not in allowed:
                raise UserError(
                    f"{name}: {key}={value!r} is not supported by the torch sampler "
                    f"(supported: {', '.join(map(repr, allowed))})"
                )
        args = {"num_inference_steps": num_inference_steps, "sigmas": sigmas, "mu": mu}
        args = {k: v for k, v in args.items() if v is not None}
        takes = inspect.signature(scheduler.set_timesteps).parameters
        for key in args:
            if key not in takes:
                raise UserError(f"{name}.set_timesteps does not take `{key}`")
        if not args:
            raise UserError(f"{name}: pass num_inference_steps (or sigmas)")
        try:
            scheduler.set_timesteps(**args)
        except ValueError as e:
            raise UserError(f"{name}.set_timesteps: {e}") from e
        if sampler_cls.takes_eta:
            return sampler_cls(scheduler, device, eta=eta)
        if eta:
            raise UserError(f"{name} takes no eta here (eta is TCD's gamma)")
        return sampler_cls(scheduler, device)

    # whether `step` adds noise (drawn from the state's StepNoise); set per class or config
    stochastic: bool = False
    takes_eta: ClassVar[bool] = False  # TCD: its step's eta (gamma), a constructor argument

    def initial_state(self, step_noise: StepNoise | None = None) -> SamplerState:
        """The state before the first step (no history). A stochastic sampler needs
        `step_noise`, the source of its per-step noise; the others ignore it."""
        if not self.stochastic:
            return _EMPTY
        if step_noise is None:
            name = self.config.get("_class_name", type(self).__name__)
            raise ValueError(f"{name} adds noise at each step: pass initial_state(StepNoise(seed))")
        return SamplerState(noise=step_noise)

    def scale_model_input(self, sample: Tensor, step_index: int) -> Tensor:
        """The denoiser's input at step `step_index` (the sample itself except for Euler)."""
        self._check(step_index)
        return sample

    def step(
        self, model_output: Tensor, step_index: int, sample: Tensor, state: SamplerState
    ) -> tuple[Tensor, SamplerState]:
        """One denoising step from `timesteps[step_index]`: `(prev_sample, new_state)`.

        A pure function of its arguments: same inputs, same outputs, in any order.
        """
        raise NotImplementedError

    def sample_loop(
        self,
        denoise_fn: Callable[[Tensor, Tensor, int], Tensor],
        latents: Tensor,
        step_noise: StepNoise | None = None,
    ) -> Tensor:
        """All steps from `latents` (x_T, already scaled by `init_noise_sigma`); the final latent.

        `denoise_fn(model_input, t, i) -> model_output`; runs under the caller's grad mode.

        Example:
            final = sampler.sample_loop(lambda x, t, i: unet(x, t, cond).sample, latents)
        """
        x, state = latents, self.initial_state(step_noise)
        for i in range(self.num_steps):
            out = denoise_fn(self.scale_model_input(x, i), self.timesteps[i], i)
            x, state = self.step(out, i, x, state)
        return x

    def _check(self, step_index: int) -> int:
        i = operator.index(step_index)
        if not 0 <= i < self.num_steps:  # a negative index would wrap around silently
            raise IndexError(f"step_index {i} outside 0..{self.num_steps - 1}")
        return i

    def _row(self, step_index: int) -> Coefficients:
        i = self._check(step_index)
        return {k: v[i] for k, v in self._c.items()}

    def _multistep_row(
        self, step_index: int, state: SamplerState, solver: str
    ) -> tuple[int, Coefficients]:
        """The step's index and coefficients, once `state` is checked to feed this step."""
        i = self._check(step_index)
        if state.step_index is not None and state.step_index != i:
            raise ValueError(f"{solver} state is for step {state.step_index}, not {i}")
        return i, self._row(i)

    def _coefficients(self, scheduler: Any, i: int) -> Coefficients:
        raise NotImplementedError

    def _noise(
        self, state: SamplerState, i: int, like: Tensor, dtype: torch.dtype | None = None
    ) -> Tensor:
        """Step i's noise from the state's StepNoise, in `dtype` (default: `like`'s)."""
        if state.noise is None:
            raise ValueError(f"step {i} adds noise: start from initial_state(StepNoise(seed))")
        return state.noise.draw(i, like, like.dtype if dtype is None else dtype)


_PREDICTIONS = ("epsilon", "v_prediction")


class _EulerSampler(TorchSampler):
    """diffusers.EulerDiscreteScheduler.step with s_churn = 0 (deterministic)."""

    supported: ClassVar = {"prediction_type": _PREDICTIONS}

    def _coefficients(self, scheduler: Any, i: int) -> Coefficients:
        sigma, sigma_next = scheduler.sigmas[i], scheduler.sigmas[i + 1]
        return {
            "sigma": sigma,  # = diffusers' sigma_hat without churn
            "dt": sigma_next - sigma,
            "in_scale": (sigma**2 + 1) ** 0.5,
            "c_out": -sigma / (sigma**2 + 1) ** 0.5,
            "c_skip": sigma**2 + 1,  # a divisor, as in diffusers
        }

    def scale_model_input(self, sample: Tensor, step_index: int) -> Tensor:
        return sample / self._row(step_index)["in_scale"]

    def _euler(self, model_output: Tensor, c: Coefficients, sample: Tensor) -> Tensor:
        """sample + (sample - x0) / sigma * dt, upcast to float32 as diffusers does."""
        sample = _upcast(sample)
        if self.config["prediction_type"] == "epsilon":
            pred_x0 = sample - c["sigma"] * model_output
        else:  # v_prediction in the variance-exploding parametrisation
            pred_x0 = model_output * c["c_out"] + (sample / c["c_skip"])
        derivative = (sample - pred_x0) / c["sigma"]
        return sample + derivative * c["dt"]

    def step(
        self, model_output: Tensor, step_index: int, sample: Tensor, state: SamplerState
    ) -> tuple[Tensor, SamplerState]:
        prev = self._euler(model_output, self._row(step_index), sample)
        return prev.to(model_output.dtype), _EMPTY


class _DDIMSampler(TorchSampler):
    """diffusers.DDIMScheduler.step with eta = 0; computes in the inputs' dtype, as diffusers."""

    supported: ClassVar = {"prediction_type": _PREDICTIONS, "thresholding": (False,)}

    def _coefficients(self, scheduler: Any, i: int) -> Coefficients:
        t = int(scheduler.timesteps[i])
        # diffusers' quirk: back by n_train // n whatever the spacing (see runtime's ddim.py)
        prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        a_t = scheduler.alphas_cumprod[t]
        a_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
        return {
            "sqrt_a": a_t**0.5,
            "sqrt_b": (1 - a_t) ** 0.5,
            "sqrt_a_prev": a_prev**0.5,
            "sqrt_b_prev": (1 - a_prev) ** 0.5,  # diffusers' (1 - a_prev - std**2), std = 0
        }

    def step(
        self, model_output: Tensor, step_index: int, sample: Tensor, state: SamplerState
    ) -> tuple[Tensor, SamplerState]:
        c = self._row(step_index)
        pred_x0 = _vp_x0(self.config, model_output, sample, c)
        if self.config["prediction_type"] == "epsilon":
            pred_eps = model_output
        else:  # v_prediction
            pred_eps = c["sqrt_a"] * model_output + c["sqrt_b"] * sample
        # Song et al. eq. 12 with sigma_t = 0
        return c["sqrt_a_prev"] * pred_x0 + c["sqrt_b_prev"] * pred_eps, _EMPTY


def _vp_x0(config: dict[str, Any], model_output: Tensor, sample: Tensor, c: Coefficients) -> Tensor:
    """x0 from the model output at alpha-bar (`c["sqrt_a"]`, `c["sqrt_b"]`), clipped where
    the config clips it: DDIM's and LCM's expressions."""
    if config["prediction_type"] == "epsilon":
        x0 = (sample - c["sqrt_b"] * model_output) / c["sqrt_a"]
    elif config["prediction_type"] == "sample":
        x0 = model_output
    else:  # v_prediction
        x0 = c["sqrt_a"] * sample - c["sqrt_b"] * model_output
    if config["clip_sample"]:
        r = config["clip_sample_range"]
        x0 = x0.clamp(-r, r)
    return x0


def _alpha_sigma_lambda(sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """VE sigma -> VP (alpha_t, sigma_t) and log-SNR lambda_t, in diffusers' expressions."""
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    sigma_t = sigma * alpha_t
    return alpha_t, sigma_t, torch.log(alpha_t) - torch.log(sigma_t)


class _DPMSolverSampler(TorchSampler):
    """diffusers.DPMSolverMultistepScheduler.step for "dpmsolver++" and "sde-dpmsolver++"
    (DPM++ 2M SDE, Lu et al. 2022 eq. 18 with one noise draw per step), order 1 or 2.

    The state holds the previous step's data prediction x0 (diffusers' `model_outputs`);
    a state without history makes the step first order (diffusers' `lower_order_nums < 1`).
    """

    supported: ClassVar = {
        "algorithm_type": ("dpmsolver++", "sde-dpmsolver++"),
        "solver_order": (1, 2),
        "solver_type": ("midpoint", "heun"),
        "prediction_type": _PREDICTIONS,
        "thresholding": (False,),
        "variance_type": (None,),
        "use_flow_sigmas": (False,),
    }
    # diffusers' VP solver upcasts the sample and draws its noise in float32, then casts
    # the result to the model output's dtype; the EDM one (subclass) does neither
    upcast: ClassVar[bool] = True

    def __init__(self, scheduler: Any, device: str | torch.device | None = None) -> None:
        super().__init__(scheduler, device)
        n, cfg = self.num_steps, self.config
        self.stochastic = cfg["algorithm_type"] == "sde-dpmsolver++"
        # the last step is first order when its target sigma is 0 (or when asked)
        lower_final = (
            cfg["euler_at_final"]
            or (cfg["lower_order_final"] and n < 15)
            or cfg["final_sigmas_type"] == "zero"
        )
        self._first_order = [
            cfg["solver_order"] == 1 or (i == n - 1 and lower_final) for i in range(n)
        ]

    def _alpha_sigma_lambda(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return _alpha_sigma_lambda(sigma)

    def _coefficients(self, scheduler: Any, i: int) -> Coefficients:
        s = scheduler.sigmas
        alpha_s0, sigma_s0, lambda_s0 = self._alpha_sigma_lambda(s[i])
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(s[i + 1])  # sigma 0: h = inf
        h = lambda_t - lambda_s0
        phi = alpha_t * (torch.exp(-h) - 1.0)
        sde_phi = alpha_t * (1 - torch.exp(-2.0 * h))
        inv_r0 = torch.tensor(float("nan"))  # step 0 has no earlier step: never second order
        if i > 0:
            _, _, lambda_s1 = self._alpha_sigma_lambda(s[i - 1])
            inv_r0 = 1.0 / ((lambda_s0 - lambda_s1) / h)
        return {  # diffusers' expressions, dpmsolver++ then sde-dpmsolver++
            "alpha_s": alpha_s0,
            "sigma_s": sigma_s0,
            "ratio": sigma_t / sigma_s0,
            "phi": phi,
            "half_phi": 0.5 * phi,
            "heun": alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0),
            "inv_r0": inv_r0,
            "sde_ratio": sigma_t / sigma_s0 * torch.exp(-h),
            "sde_phi": sde_phi,
            "sde_half_phi": 0.5 * sde_phi,
            "sde_heun": alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0),
            "sde_noise": sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)),
        }

    def _data_prediction(self, model_output: Tensor, sample: Tensor, c: Coefficients) -> Tensor:
        # diffusers' convert_model_output: x0 in the inputs' dtype, before the upcast
        if self.config["prediction_type"] == "epsilon":
            return (sample - c["sigma_s"] * model_output) / c["alpha_s"]
        return c["alpha_s"] * sample - c["sigma_s"] * model_output  # v_prediction

    def step(
        self, model_output: Tensor, step_index: int, sample: Tensor, state: SamplerState
    ) -> tuple[Tensor, SamplerState]:
        i, c = self._multistep_row(step_index, state, "DPM-Solver++")
        x0 = self._data_prediction(model_output, sample, c)
        if self.upcast:
            sample = _upcast(sample)
        second = not (self._first_order[i] or not state.x0)
        d1 = c["inv_r0"] * (x0 - state.x0[-1]) if second else None
        midpoint = self.config["solver_type"] == "midpoint"
        if not self.stochastic:
            prev = c["ratio"] * sample - c["phi"] * x0  # DPM-Solver++(1), i.e. DDIM
            if second:  # Lu et al. Algorithm 2, from the previous step's x0
                prev = prev - c["half_phi"] * d1 if midpoint else prev + c["heun"] * d1
        else:
            # drawn like the converted output x0 (EDM), or in float32 (VP)
            noise = self._noise(state, i, x0, torch.float32 if self.upcast else None)
            prev = c["sde_ratio"] * sample + c["sde_phi"] * x0
            if second:
                prev = prev + (c["sde_half_phi"] if midpoint else c["sde_heun"]) * d1
            prev = prev + c["sde_noise"] * noise
        history = () if self.config["solver_order"] == 1 else (x0,)
        new_state = SamplerState(history, i + 1 if history else None, noise=state.noise)
        # the VP solver casts to the converted output's dtype; the EDM one keeps its own
        return (prev.to(x0.dtype) if self.upcast else prev), new_state


class _FlowMatchSampler(TorchSampler):
    """diffusers.FlowMatchEulerDiscreteScheduler.step (deterministic, no per-token steps)."""

    supported: ClassVar = {"stochastic_sampling": (False,)}

    def _coefficients(self, scheduler: Any, i: int) -> Coefficients:
        return {"dt": scheduler.sigmas[i + 1] - scheduler.sigmas[i]}

    def step(
        self, model_output: Tensor, step_index: int, sample: Tensor, state: SamplerState
    ) -> tuple[Tensor, SamplerState]:
        dt = self._row(step_index)["dt"]
        # x_{t-dt} = x_t + (sigma_next - sigma) * v, with v the predicted velocity
        return (_upcast(sample) + dt * model_output).to(model_output.dtype), _EMPTY


class _PNDMSampler(TorchSampler):
    """diffusers.PNDMScheduler.step_plms with skip_prk_steps (SD1.x/SD2 configs set it).

    The schedule has one more call than steps: call 1 goes back to call 0's timestep and
    steps again with the mean of both outputs (a Heun-like start). The state carries the
    Adams-Bashforth history (`eps`) and call 0's sample (`start`). Without history (a
    fresh start past call 1) a step is first order: diffusers' DDIM-like transfer alone.
    """

    supported: ClassVar = {"prediction_type": _PREDICTIONS, "skip_prk_steps": (True,)}

    def _coefficients(self, scheduler: Any, i: int) -> Coefficients:
        ratio = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        t = int(scheduler.timesteps[i])
        prev_t = t - ratio
        if i == 1:  # diffusers' counter == 1: back to the first timestep
            prev_t, t = t, t + ratio
        a_t = scheduler.alphas_cumprod[t]
        a_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
        b_t, b_prev = 1 - a_t, 1 - a_prev
        return {  # diffusers' _get_prev_sample, in its expressions
            "sqrt_a": a_t**0.5,
            "sqrt_b": b_t**0.5,
            "sample_coeff": (a_prev / a_t) ** (0.5),
            "delta": a_prev - a_t,
            "denom": a_t * b_prev ** (0.5) + (a_t * b_t * a_prev) ** (0.5),
        }

    def step(
        self, model_output: Tensor, step_index: int, sample: Tensor, state: SamplerState
    ) -> tuple[Tensor, SamplerState]:
        i, c = self._multistep_row(step_index, state, "PLMS")
        if i == 1:
            if state.start is None or not state.eps:
                raise ValueError("PLMS step 1 needs step 0's state (its output and sample)")
            eps, start = state.eps, None
            model_output = (model_output + eps[-1]) / 2
            sample = state.start
        else:
            eps, start = (*state.eps[-3:], model_output), sample if i == 0 else None
            e = eps[::-1]  # newest first
            if len(eps) == 2:
                model_output = (3 * e[0] - e[1]) / 2
            elif len(eps) == 3:
                model_output = (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
            elif len(eps) == 4:
                model_output = (1 / 24) * (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3])
        if self.config["prediction_type"] == "v_prediction":
            model_output = c["sqrt_a"] * model_output + c["sqrt_b"] * sample
        prev = c["sample_coeff"] * sample - c["delta"] * model_output / c["denom"]
        return prev, SamplerState(step_index=i + 1, eps=eps, start=start)


_SAMPLERS: dict[str, type[TorchSampler]] = {
    "EulerDiscreteScheduler": _EulerSampler,
    "DDIMScheduler": _DDIMSampler,
    "DPMSolverMultistepScheduler": _DPMSolverSampler,
    "PNDMScheduler": _PNDMSampler,
    "FlowMatchEulerDiscreteScheduler": _FlowMatchSampler,
}


def sampler_classes() -> dict[str, type[TorchSampler]]:
    """diffusers scheduler class name -> its torch sampler class (the EDM pair included)."""
    # they subclass this module's samplers
    from slimdiff.sampler_edm import EDM_SAMPLERS
    from slimdiff.sampler_stochastic import STOCHASTIC_SAMPLERS
    from slimdiff.sampler_two_call import TWO_CALL_SAMPLERS
    from slimdiff.sampler_unipc import UniPCSampler

    return {
        **_SAMPLERS,
        **STOCHASTIC_SAMPLERS,
        **TWO_CALL_SAMPLERS,
        **EDM_SAMPLERS,
        "UniPCMultistepScheduler": UniPCSampler,
    }
