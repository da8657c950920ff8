"""PNDMScheduler: pseudo linear multistep sampling (PLMS), the SD1.x/SD2 hub default.

Liu, Ren, Lin & Zhao, "Pseudo Numerical Methods for Diffusion Models on Manifolds" (2022,
arXiv:2202.09778): the transfer part is DDIM's step (their eq. 9), the gradient part a
4th-order Adams-Bashforth combination of the last model outputs, started either by
pseudo Runge-Kutta steps (the paper's PNDM) or, with `skip_prk_steps` (what SD's configs
set), by a Heun-like second call at the first timestep. Port of diffusers.PNDMScheduler
(scheduling_pndm.py) in float32, as diffusers computes it.

diffusers keeps a call counter; here the counter is the step index less the begin index (0
unless img2img's set_begin_index moved it, and only with skip_prk_steps), so steps must
come in order from there, where the history restarts. The schedule has more entries than
`num_inference_steps`: one more with skip_prk_steps, nine more with Runge-Kutta steps;
`timesteps` lists every model call, and the runtime's loop runs over it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._common import (
    F32,
    ONE,
    AlphaBarNoise,
    alphas_cumprod_f32,
    as_f32,
    check_step,
    check_steppable,
    check_steps,
    choice,
    reject_args,
    restarts,
    spaced_timesteps,
)

_ORDER = 4  # pndm_order: Runge-Kutta stages, and the Adams-Bashforth history kept
# Adams-Bashforth weights (newest output first) over a denominator, by how many outputs
# are known; integer numerators keep diffusers' float32 rounding
_AB = {2: ((3, -1), 2), 3: ((23, -16, 5), 12), 4: ((55, -59, 37, -9), 24)}


class PNDMScheduler(AlphaBarNoise):
    """diffusers.PNDMScheduler: PLMS, with or without its Runge-Kutta start."""

    order = 1
    stochastic = False
    init_noise_sigma = 1.0

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        skip_prk_steps: bool = False,
        set_alpha_to_one: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        **config: Any,
    ) -> None:
        name = type(self).__name__
        self.prediction_type = choice(
            name, "prediction_type", prediction_type, ("epsilon", "v_prediction")
        )
        self.timestep_spacing = choice(
            name, "timestep_spacing", timestep_spacing, ("linspace", "leading", "trailing")
        )
        self.num_train_timesteps, self.steps_offset = num_train_timesteps, steps_offset
        self.skip_prk_steps = bool(skip_prk_steps)
        self.alphas_cumprod = alphas_cumprod_f32(
            name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, False
        )
        self.final_alpha_cumprod = ONE if set_alpha_to_one else self.alphas_cumprod[0]
        self._t = np.arange(num_train_timesteps - 1, -1, -1, dtype=np.int64)
        self._prk_count = 0
        self.timesteps = self._t.astype(F32)
        self.num_inference_steps: int | None = None
        self._reset_history()

    def _reset_history(self) -> None:
        self._ets: list[np.ndarray] = []  # model outputs that feed Adams-Bashforth
        self._rk_sum: np.ndarray | float = 0.0  # Runge-Kutta's weighted sum so far
        self._start: np.ndarray | None = None  # the sample the current RK/Heun step starts at
        self._last_step = -1

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        mu: float | None = None,
        sigmas: np.ndarray | None = None,
    ) -> None:
        reject_args(type(self).__name__, mu=mu, sigmas=sigmas)
        n_train, n = self.num_train_timesteps, num_inference_steps
        check_steps(n, n_train)
        # diffusers: an IndexError after the first denoiser call (SD1.5's 1000 steps)
        check_steppable(self.timestep_spacing, n_train, n, self.steps_offset)
        t = spaced_timesteps(self.timestep_spacing, n_train, n, self.steps_offset)
        ascending = t[::-1].round().astype(np.int64)
        if self.skip_prk_steps:
            # the second call repeats the first step's target timestep (Heun-like start)
            prk = np.array([], dtype=np.int64)
            plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
        else:
            if n < _ORDER:  # diffusers fails on numpy broadcasting here
                raise ValueError(
                    f"the Runge-Kutta start (skip_prk_steps=False) takes at least "
                    f"{_ORDER} steps, not {n}; run more steps, or sample with "
                    "skip_prk_steps=True (the `pndm` preset)"
                )
            half = n_train // n // 2  # RK's midpoints sit half a step back
            stages = ascending[-_ORDER:].repeat(2) + np.tile([0, half], _ORDER)
            prk = stages[:-1].repeat(2)[1:-1][::-1]
            plms = ascending[:-3][::-1]
        self.num_inference_steps = n
        self._prk_count = len(prk)
        self._t = np.concatenate([prk, plms]).astype(np.int64)
        self.timesteps = self._t.astype(F32)
        self._reset_history()
        self._new_schedule()

    def _refused_begin(self, begin: int) -> str | None:
        # refused rather than mirrored: diffusers' step_prk counts its calls from the run's
        # start but reads its own first (noisiest) timesteps, so it would denoise the image
        # as if it were at timestep timesteps[0]
        if begin and not self.skip_prk_steps:
            return (
                "the Runge-Kutta start (skip_prk_steps=False) steps from the schedule's first "
                "timesteps whatever the image's; use skip_prk_steps=True (the `pndm` preset) "
                "or another scheduler (ddim, euler)"
            )
        return None

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        return as_f32(sample)

    def step(self, model_output: np.ndarray, step_index: int, sample: np.ndarray) -> np.ndarray:
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        i = step_index
        check_step(type(self).__name__, i, len(self._t))
        if restarts("PNDM", i, self._last_step, self._begin_index):
            self._reset_history()
        self._last_step = i
        sample, model_output = as_f32(sample), as_f32(model_output)
        if i < self._prk_count:
            return self._step_prk(model_output, i, sample)
        return self._step_plms(model_output, i, i - self._begin_index, sample)

    def _step_prk(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        """One stage of the 4-stage pseudo Runge-Kutta start (diffusers' step_prk)."""
        ratio = self.num_train_timesteps // self.num_inference_steps
        t = int(self._t[i])
        prev_t = t - (0 if i % 2 else ratio // 2)
        t = int(self._t[i // 4 * 4])
        stage = i % 4
        if stage == 0:
            self._rk_sum = self._rk_sum + F32(1 / 6) * model_output
            self._ets.append(model_output)
            self._start = sample
        elif stage in (1, 2):
            self._rk_sum = self._rk_sum + F32(1 / 3) * model_output
        else:  # the last stage steps with the whole weighted sum, then starts a new one
            model_output = self._rk_sum + F32(1 / 6) * model_output
            self._rk_sum = 0.0
        start = self._start if self._start is not None else sample
        return self._prev_sample(start, t, prev_t, model_output)

    def _step_plms(
        self, model_output: np.ndarray, i: int, counter: int, sample: np.ndarray
    ) -> np.ndarray:
        """One linear multistep step (diffusers' step_plms) at timesteps[i], the run's call
        `counter` (i - begin).

        From a begin index b > 0 this mirrors diffusers' img2img, which is off by one
        timestep: the schedule [t0, t1, t1, t2, ...] repeats t1 for the Heun-like start
        from b = 0 only, so from b > 0 each later call takes its sample to be at the next
        timestep while it is still at the previous one (at b = 1 the start's second call
        also takes the image, noised to t1, to be at t0)."""
        ratio = self.num_train_timesteps // self.num_inference_steps
        t = int(self._t[i])
        prev_t = t - ratio
        if counter != 1:
            self._ets = [*self._ets[-(_ORDER - 1) :], model_output]
        else:  # the Heun-like second call: back to the first timestep, averaged output
            prev_t, t = t, t + ratio
        ets = self._ets
        if len(ets) == 1 and counter == 0:
            self._start = sample
        elif len(ets) == 1 and counter == 1:
            model_output = (model_output + ets[-1]) / F32(2)
            sample, self._start = self._start, None
        else:
            weights, denom = _AB[len(ets)]
            combined = sum(w * e for w, e in zip(weights, reversed(ets), strict=True))
            model_output = as_f32(combined) / F32(denom)
        return self._prev_sample(sample, t, prev_t, model_output)

    def _prev_sample(
        self, sample: np.ndarray, t: int, prev_t: int, model_output: np.ndarray
    ) -> np.ndarray:
        """x_{t-delta} from x_t and the (combined) model output: eq. 9 of Liu et al."""
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t, b_prev = ONE - a_t, ONE - a_prev
        if self.prediction_type == "v_prediction":
            model_output = np.sqrt(a_t) * model_output + np.sqrt(b_t) * sample
        sample_coeff = np.sqrt(a_prev / a_t)
        denom = a_t * np.sqrt(b_prev) + np.sqrt(a_t * b_t * a_prev)
        return as_f32(sample_coeff * sample - (a_prev - a_t) * model_output / denom)
