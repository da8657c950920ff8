"""Helpers shared by the numpy schedulers: config checks and the diffusers schedule maths.

Scalars are explicit `np.float32` so numpy 1.x (value-based casting) and 2.x (NEP 50)
give the same dtypes; where diffusers computes in float32 torch we compute in float32
numpy, where it computes in float64 numpy we do too.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

F32 = np.float32
ONE = np.float32(1.0)


def choice(owner: str, key: str, value: Any, allowed: tuple[Any, ...]) -> Any:
    if value not in allowed:
        raise ValueError(
            f"{owner}: {key}={value!r} is not supported by the numpy runtime "
            f"(supported: {', '.join(repr(a) for a in allowed)})"
        )
    return value


def reject_non_default(owner: str, config: dict[str, Any], **defaults: Any) -> None:
    """Fail loudly on config keys that would change the maths but are not ported.

    None and falsy values count as the default for flags, as they do in diffusers' `if`s.
    Keys not named here do not affect these code paths and are ignored, as diffusers does.
    """
    for key, default in defaults.items():
        value = config.get(key, default)
        if value is None or value == default or (not default and not value):
            continue
        raise ValueError(
            f"{owner}: {key}={value!r} is not supported by the numpy runtime "
            f"(only {default!r}); pick a supported scheduler config or run diffusers"
        )


def reject_args(owner: str, **args: Any) -> None:
    """set_timesteps arguments of the uniform API that this scheduler has no use for."""
    for key, value in args.items():
        if value is not None:
            raise ValueError(f"{owner}.set_timesteps does not take `{key}`")


def check_steps(n: int | None, n_train: int) -> int:
    """`set_timesteps`' step count: 1..n_train (the training schedule's length)."""
    if n is None or not 0 < n <= n_train:
        raise ValueError(f"num_inference_steps must be in 1..{n_train}, got {n}")
    return n


def check_step(owner: str, step_index: int, num_steps: int | None) -> None:
    """`step_index` within 0..num_steps - 1; `num_steps` None (a scheduler's
    num_inference_steps before set_timesteps) is a ValueError."""
    if num_steps is None:
        raise ValueError("call set_timesteps before step")
    # numpy would wrap a negative index around silently
    if not 0 <= step_index < num_steps:
        raise IndexError(f"{owner}: step_index {step_index} outside 0..{num_steps - 1}")


def check_second_half(owner: str, step_index: int, first: int | None) -> None:
    """Heun's and DPM2's odd calls finish the step the call before began (`first`, the
    index of the last even call, or None): anything else mixes two trajectories."""
    if first is None or first != step_index - 1:
        raise ValueError(
            f"{owner}: call {step_index} is a second half, and needs call {step_index - 1} "
            "just before"
        )


def restarts(owner: str, step_index: int, last_step: int) -> bool:
    """A multistep solver's step order: True at step 0 (its history starts afresh),
    ValueError for any step but the one after `last_step` (a skipped or repeated step
    would mix in another trajectory's history)."""
    if step_index == 0:
        return True
    if step_index != last_step + 1:
        raise ValueError(
            f"{owner} keeps a history: step {last_step + 1} expected, got {step_index} "
            "(call set_timesteps to restart)"
        )
    return False


def check_noise(owner: str, noise: Any, sample: np.ndarray) -> None:
    """A stochastic step's `noise`: given, and of the sample's shape."""
    if noise is None or np.shape(noise) != np.shape(sample):
        raise ValueError(f"{owner} steps need standard-normal `noise` of the sample's shape")


def alpha_sigma_lambda(sigma: np.float32) -> tuple[np.float32, np.float32, np.float32]:
    """VE sigma -> VP (alpha_t, sigma_t) and log-SNR lambda_t, all float32 like diffusers."""
    alpha_t = ONE / np.sqrt(sigma * sigma + ONE)
    sigma_t = sigma * alpha_t
    with np.errstate(divide="ignore"):  # sigma = 0 at the end: lambda = +inf, h = inf
        return alpha_t, sigma_t, np.log(alpha_t) - np.log(sigma_t)


def alphas_cumprod_f32(
    owner: str,
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: Any,
    rescale_betas_zero_snr: bool,
) -> np.ndarray:
    """alpha-bar_t in float32, as diffusers builds it in float32 torch."""
    n = num_train_timesteps
    if trained_betas is None:
        schedules = ("linear", "scaled_linear", "squaredcos_cap_v2")
        choice(owner, "beta_schedule", beta_schedule, schedules)
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=F32)
    elif beta_schedule == "linear":
        # torch.linspace(float32) lands within an ulp of the rounded float64 linspace
        betas = np.linspace(beta_start, beta_end, n).astype(F32)
    elif beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, n).astype(F32) ** 2
    else:  # "squaredcos_cap_v2": diffusers' betas_for_alpha_bar("cosine"), Python floats
        f = [math.cos((i / n + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(n + 1)]
        betas = np.array([min(1 - f[i + 1] / f[i], 0.999) for i in range(n)], dtype=F32)
    # torch.cumprod on CPU accumulates float32 in double (acc_type), so we do too
    alphas_cumprod = np.cumprod((ONE - betas).astype(np.float64)).astype(F32)
    if not rescale_betas_zero_snr:
        return alphas_cumprod
    # rescale_zero_terminal_snr (Lin et al., Algorithm 1), in float32 like diffusers
    sqrt_ab = np.sqrt(alphas_cumprod)
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab * sqrt_ab
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return np.cumprod((ONE - (ONE - alphas)).astype(np.float64)).astype(F32)


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma: log-sigma interpolation (diffusers)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def karras_sigmas(lo: float, hi: float, num_inference_steps: int) -> np.ndarray:
    """Karras et al. (2022) eq. 5 with rho = 7, in float64 like diffusers."""
    rho = 7.0
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho, max_inv_rho = lo ** (1 / rho), hi ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def spaced_timesteps(spacing: str, n_train: int, n: int, steps_offset: int) -> np.ndarray:
    """Euler/DDIM "linspace" (unrounded for Euler: caller rounds), "leading", "trailing"."""
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, n)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (n_train // n)).round()[::-1].copy() + steps_offset
    return trailing_timesteps(n_train, n_train, n)


def trailing_timesteps(start: int, n_train: int, n: int) -> np.ndarray:
    """ "trailing" spacing, `n` points from `start` - 1 down by n_train / n (rounded).

    diffusers' np.arange(start, 0, -n_train / n) yields n + 1 points for 62 step counts of
    1..1000 (61, 103, 121, ...), where the float step leaves a remainder of ~1e-13: the
    extra point rounds to timestep -1, which reads the *noisiest* alpha-bar (a negative
    index) and ruins the image (DDIM, DPM-Solver++, UniPC, DEIS, DDPM alike). We keep the n
    points asked for: a deliberate departure, identical to diffusers for every other count.
    """
    return np.arange(start, 0, -n_train / n).round()[:n] - 1


def as_f32(x: np.ndarray) -> np.ndarray:
    """float32 view/copy: the runtime's latents are float32 whatever the caller passes."""
    return np.asarray(x, dtype=F32)
