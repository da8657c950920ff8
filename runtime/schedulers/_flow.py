"""The flow-matching sigma shifts that diffusers' flow schedulers share (FlowMatchEuler, and
UniPC and DPM-Solver on flow sigmas): the static shift of SD3, the resolution-dependent
time shift of FLUX (mu), and the stretch to a terminal sigma (LTX-Video's)."""

from __future__ import annotations

import math

import numpy as np


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
