"""DPM-Solver's update coefficients, shared by the multistep ("DPM++ 2M") and singlestep
("DPM++ 2S") ports, in diffusers' float32 expressions.

An update from sigma_s to sigma_t over the log-SNR step h = lambda_t - lambda_s is

    x_t = k_x x_s + k0 D0 + k1 D1 + k2 D2 (+ noise_std z)

with D0 the solver's quantity at the start (x0 for DPM-Solver++, Lu et al. 2022b,
arXiv:2211.01095; the noise eps for DPM-Solver, Lu et al. 2022a, arXiv:2206.00927) and D1,
D2 divided differences of the later ones. The "sde-" forms are the SDE solvers of the
DPM-Solver++ paper (section 5; the noise-prediction one is diffusers' "sde-dpmsolver").
"""

from __future__ import annotations

import numpy as np

from ._common import F32, ONE

ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")
HALF = F32(0.5)
_TWO = F32(2.0)


def data_prediction(algorithm: str) -> bool:
    """DPM-Solver++ integrates the data prediction x0, DPM-Solver the noise eps."""
    return algorithm.endswith("++")


def solver_quantity(
    algorithm: str,
    prediction_type: str,
    model_output: np.ndarray,
    sample: np.ndarray,
    alpha_t: np.float32,
    sigma_t: np.float32,
) -> np.ndarray:
    """The model output as the solver's quantity at (alpha_t, sigma_t): x0 or eps."""
    if data_prediction(algorithm):
        if prediction_type == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t
        if prediction_type == "v_prediction":
            return alpha_t * sample - sigma_t * model_output
        if prediction_type == "flow_prediction":  # sigma_t is the flow sigma itself
            return sample - sigma_t * model_output
        return model_output  # "sample"
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return (sample - alpha_t * model_output) / sigma_t
    return alpha_t * model_output + sigma_t * sample  # v_prediction


def base_coefficients(
    algorithm: str,
    h: np.float32,
    alpha_s: np.float32,
    sigma_s: np.float32,
    alpha_t: np.float32,
    sigma_t: np.float32,
) -> tuple[np.float32, np.float32]:
    """(k_x, k0): the first-order update's weights of x_s and D0."""
    if algorithm == "dpmsolver++":
        return sigma_t / sigma_s, -(alpha_t * (np.exp(-h) - ONE))
    if algorithm == "dpmsolver":
        return alpha_t / alpha_s, -(sigma_t * (np.exp(h) - ONE))
    if algorithm == "sde-dpmsolver++":
        return sigma_t / sigma_s * np.exp(-h), alpha_t * (ONE - np.exp(F32(-2.0) * h))
    return alpha_t / alpha_s, -(_TWO * (sigma_t * (np.exp(h) - ONE)))  # sde-dpmsolver


def phi2(algorithm: str, h: np.float32, alpha_t: np.float32, sigma_t: np.float32) -> np.float32:
    """The first divided difference's weight in the Heun forms (the phi_2 term)."""
    if algorithm == "dpmsolver++":
        return alpha_t * ((np.exp(-h) - ONE) / h + ONE)
    if algorithm == "dpmsolver":
        return -(sigma_t * ((np.exp(h) - ONE) / h - ONE))
    if algorithm == "sde-dpmsolver++":
        m2h = F32(-2.0) * h
        return alpha_t * ((ONE - np.exp(m2h)) / m2h + ONE)
    return -(_TWO * (sigma_t * ((np.exp(h) - ONE) / h - ONE)))  # sde-dpmsolver


def phi3(algorithm: str, h: np.float32, alpha_t: np.float32, sigma_t: np.float32) -> np.float32:
    """The second divided difference's weight (the phi_3 term), third order only; diffusers
    has none for sde-dpmsolver (the classes refuse that pairing)."""
    if algorithm == "dpmsolver++":
        return -(alpha_t * ((np.exp(-h) - ONE + h) / (h * h) - HALF))
    if algorithm == "dpmsolver":
        return -(sigma_t * ((np.exp(h) - ONE - h) / (h * h) - HALF))
    if algorithm == "sde-dpmsolver++":
        m2h = F32(-2.0) * h
        return alpha_t * ((ONE - np.exp(m2h) + m2h) / (m2h * m2h) - HALF)
    raise ValueError("sde-dpmsolver has no third-order update")


def noise_std(algorithm: str, h: np.float32, sigma_t: np.float32) -> np.float32:
    """The fresh noise's standard deviation in an SDE step (0 for the ODE solvers)."""
    if algorithm == "sde-dpmsolver++":
        return sigma_t * np.sqrt(ONE - np.exp(F32(-2) * h))
    if algorithm == "sde-dpmsolver":
        return sigma_t * np.sqrt(np.exp(F32(2) * h) - ONE)
    return F32(0.0)
