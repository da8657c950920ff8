"""The flow-matching sigma shifts that diffusers' flow schedulers share (FlowMatchEuler, and
UniPC and DPM-Solver on flow sigmas): the static shift of SD3, the resolution-dependent
time shift of FLUX (mu), and the stretch to a terminal sigma (LTX-Video's)."""

from __future__ import annotations

import math

import numpy as np

from ._common import ONE
from ._common import alpha_sigma_lambda as vp_alpha_sigma_lambda


def static_shift(shift: float, sigmas: np.ndarray) -> np.ndarray:
    """SD3's shift: sigma' = shift sigma / (1 + (shift - 1) sigma) (Esser et al. 2024)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(kind: str, mu: float, t: np.ndarray) -> np.ndarray:
    """diffusers' time_shift with sigma = 1: "exponential" e^mu / (e^mu + 1/t - 1), or
    "linear" mu / (mu + 1/t - 1). numpy with Python scalars keeps t's dtype (float32 for
    given float32 sigmas, as diffusers)."""
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
    return mu / (mu + (1 / t - 1) ** 1.0)


def stretch_to_terminal(sigmas: np.ndarray, terminal: float) -> np.ndarray:
    """Stretch the schedule so that its last sigma is `terminal` (shift_terminal)."""
    one_minus = 1 - sigmas
    return 1 - one_minus / (one_minus[-1] / (1 - terminal))


def alpha_sigma_lambda(sigma: np.float32, flow: bool) -> tuple[np.float32, ...]:
    """(alpha_t, sigma_t, log-SNR lambda_t) at `sigma`, float32 as diffusers' tensors: the
    VP conversion, or with `flow` rectified flow's x = (1 - s) x0 + s eps (the
    `_sigma_to_alpha_sigma_t` of diffusers' DPM-Solver and UniPC with use_flow_sigmas)."""
    if not flow:
        return vp_alpha_sigma_lambda(sigma)
    alpha_t, sigma_t = ONE - sigma, sigma
    with np.errstate(divide="ignore"):  # sigma = 0 at the end: lambda = +inf
        return alpha_t, sigma_t, np.log(alpha_t) - np.log(sigma_t)
