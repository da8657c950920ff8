"""LMSDiscreteScheduler: linear multistep on the probability-flow ODE ("LMS").

The k-diffusion `sample_lms` sampler of Karras et al.'s VE parametrisation x = x0 + sigma * eps
("Elucidating the Design Space of Diffusion-Based Generative Models", arXiv:2206.00364):
an Adams-Bashforth method in sigma, each step from sigma_i to sigma_{i+1} integrating the
Lagrange polynomial through the last `order` slopes dx/dsigma (fewer at the start: order
min(i + 1, 4)). Port of diffusers.LMSDiscreteScheduler (scheduling_lms_discrete.py), whose
pipelines call `step(..., order=4)` by default: here that is the attribute `lms_order`, which
the runtime may set before a run. The tables are Euler's (this subclasses the Euler port:
same spacings, linear sigma interpolation, Karras sigmas with unrounded timesteps, final
sigma 0, init_noise_sigma), built from LMS's own keys only (no zero-SNR: diffusers' LMS
ignores it in a converted config), and a carried sigma_min/max for the exponential and Beta
schedules only, where diffusers' LMS reads them.

Dtypes: the tables as Euler's (float32 sigmas); the coefficients in float64 from the float32
sigmas; the step arithmetic float64, cast to float32 (diffusers: float32).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.polynomial import polynomial as P

from ._common import as_f32, check_step, check_steppable, choice, reject_args, restarts
from .euler import EulerDiscreteScheduler


def lms_coefficients(sigmas: np.ndarray, i: int, order: int) -> list[float]:
    """Coefficients of the last `order` slopes (newest first) for the step from sigmas[i]
    to sigmas[i + 1]: the integrals over that step of the Lagrange basis polynomials
    through sigmas[i], sigmas[i - 1], ..., sigmas[i - order + 1].

    diffusers integrates each basis polynomial with scipy.integrate.quad (epsrel 1e-4; its
    21-point Gauss-Kronrod rule is already exact for these degree <= 3 polynomials, up to
    the float32 rounding of its torch integrand). The integrand *is* a polynomial in tau, so
    we integrate it exactly with numpy's polynomial tools instead: no scipy in the runtime.
    """
    nodes = [float(sigmas[i - k]) for k in range(order)]
    lo, hi = float(sigmas[i]), float(sigmas[i + 1])
    coeffs = []
    for j in range(order):
        others = [s for k, s in enumerate(nodes) if k != j]
        denom = float(np.prod([nodes[j] - s for s in others]))
        basis = P.polyint(P.polyfromroots(others) / denom)  # polyfromroots([]) = [1.0]
        coeffs.append(float(P.polyval(hi, basis) - P.polyval(lo, basis)))
    return coeffs


class LMSDiscreteScheduler(EulerDiscreteScheduler):
    """diffusers.LMSDiscreteScheduler, order `lms_order` (diffusers' step(order=4))."""

    order = 1  # one denoiser call per step (diffusers' class attribute)
    stochastic = False
    lms_order = 4

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        **config: Any,
    ) -> None:
        # only LMS's own keys reach the Euler tables; other keys of a converted config
        # (Euler's zero-SNR, final_sigmas_type, ...) are ignored, as there. A carried
        # sigma_min/max bounds the exponential and Beta schedules, not Karras': diffusers'
        # LMS reads it in those two conversions only
        bounded = not use_karras_sigmas
        super().__init__(
            sigma_min=config.get("sigma_min") if bounded else None,
            sigma_max=config.get("sigma_max") if bounded else None,
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            use_karras_sigmas=use_karras_sigmas,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            use_exponential_sigmas=use_exponential_sigmas,
            use_beta_sigmas=use_beta_sigmas,
        )
        self.prediction_type = choice(
            type(self).__name__,
            "prediction_type",
            prediction_type,
            ("epsilon", "v_prediction", "sample"),
        )
        self._derivatives: list[np.ndarray] = []
        self._last_step = -1

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        mu: float | None = None,
        sigmas: np.ndarray | None = None,
    ) -> None:
        reject_args(type(self).__name__, mu=mu, sigmas=sigmas)
        n = num_inference_steps
        if not self.sigma_schedule and n is not None:
            # two equal sigmas (a timestep past the range is clamped to the last one's)
            # make a Lagrange denominator 0: NaN from the next step on, in diffusers too
            check_steppable(self.timestep_spacing, self.num_train_timesteps, n, self.steps_offset)
        super().set_timesteps(num_inference_steps)
        self._derivatives, self._last_step = [], -1

    def step(self, model_output: np.ndarray, step_index: int, sample: np.ndarray) -> np.ndarray:
        """The slope at sigmas[i] joins the history; the step integrates the Lagrange
        polynomial through the last min(i + 1, lms_order) slopes from sigmas[i] to
        sigmas[i + 1] (from a begin index, see below). Steps run in order; the begin index
        (0 unless set_begin_index moved it) restarts the history."""
        name = type(self).__name__
        i = step_index
        check_step(name, i, len(self.timesteps))
        max_order = self.lms_order
        if isinstance(max_order, bool) or not isinstance(max_order, int) or max_order < 1:
            raise ValueError(f"{name}: lms_order must be a positive integer, got {max_order!r}")
        if restarts(name, i, self._last_step, self._begin_index):
            self._derivatives = []
        self._last_step = i
        x = np.asarray(sample, dtype=np.float64)
        out = np.asarray(model_output, dtype=np.float64)
        sigma = float(self.sigmas[i])
        if self.prediction_type == "epsilon":
            pred_x0 = x - sigma * out
        elif self.prediction_type == "v_prediction":
            pred_x0 = out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        else:  # "sample"
            pred_x0 = out
        self._derivatives = [*self._derivatives, (x - pred_x0) / sigma][-max_order:]
        # diffusers' order is min(step_index + 1, order), from the step index, not the
        # history's length: from an img2img begin index b > 0 its first steps weight the
        # slopes known so far with the first coefficients of a higher-order rule (zip
        # drops the rest: at b >= 3 the first step is 55/24 of Euler's for equal spacing).
        # Mirrored, being well defined; from step 0 the two lengths are equal
        order = min(i + 1, max_order)
        coeffs = lms_coefficients(self.sigmas, i, order)[: len(self._derivatives)]
        prev = x + sum(c * d for c, d in zip(coeffs, reversed(self._derivatives), strict=True))
        return as_f32(prev)
