"""The sigma schedules a VP scheduler's config may ask for instead of its interpolated one.

diffusers' `use_karras_sigmas`, `use_exponential_sigmas` and `use_beta_sigmas` (at most one
of them) replace the n sigmas read off the training schedule with n sigmas from sigma_max
down to sigma_min:

- Karras et al. (2022, arXiv:2206.00364) eq. 5, rho = 7 (`karras_sigmas` in _common);
- exponential: evenly spaced in log sigma, k-diffusion's `get_sigmas_exponential`;
- beta: Lee et al., "Beta Sampling is All You Need" (2024, arXiv:2407.12173): sigma_min +
  (sigma_max - sigma_min) * F^-1(1 - i / (n - 1)), F the Beta(0.6, 0.6) CDF, which spends
  more steps at both ends of the trajectory.

diffusers computes the Beta quantiles with scipy.stats.beta.ppf. The runtime imports only
numpy and the standard library, so `beta_ppf` inverts the regularized incomplete beta
function itself: its continued fraction (Numerical Recipes, 3rd ed., section 6.4, modified
Lentz) and bisection to float64 resolution, within 1e-12 of scipy (tests check).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import numpy as np

from ._common import (
    F32,
    ONE,
    VPNoise,
    alpha_sigma_lambda,
    alphas_cumprod_f32,
    check_steppable,
    check_steps,
    karras_sigmas,
    sigma_to_t,
    trailing_timesteps,
)

SCHEDULES = ("karras", "exponential", "beta")
BETA_ALPHA = BETA_BETA = 0.6  # diffusers' _convert_to_beta defaults; no config key sets them


def sigma_schedule(
    owner: str,
    use_karras_sigmas: bool | None,
    use_exponential_sigmas: bool | None,
    use_beta_sigmas: bool | None,
    flow: bool = False,
    flow_ok: tuple[str, ...] = (),
) -> str | None:
    """Which of SCHEDULES the config asks for, or None; more than one is refused, as
    diffusers refuses it. With `flow` (use_flow_sigmas) any but those in `flow_ok` is
    refused: diffusers converts the VP training sigmas (up to ~157) and then reads them as
    flow sigmas (alpha = 1 - sigma < 0), so its samples are NaN: a black image. (UniPC
    maps its Karras sigmas into flow ones, s / (1 + s): `flow_ok` there.)"""
    flags = (use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)
    chosen = [name for name, flag in zip(SCHEDULES, flags, strict=True) if flag]
    if len(chosen) > 1:
        keys = ", ".join(f"use_{name}_sigmas" for name in chosen)
        raise ValueError(f"{owner}: {keys} are all set; set at most one of them")
    if chosen and flow and chosen[0] not in flow_ok:
        raise ValueError(
            f"{owner}: use_{chosen[0]}_sigmas with use_flow_sigmas samples NaN (diffusers "
            "converts VP sigmas, then reads them as flow sigmas); use one of them (no "
            "--sigmas on a flow-matching model)"
        )
    return chosen[0] if chosen else None


def converted_sigmas(
    schedule: str,
    lo: float,
    hi: float,
    n: int,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> np.ndarray:
    """n descending float64 sigmas on `schedule` (one of SCHEDULES), from `sigma_max` down
    to `sigma_min` where a config sets them, else from `hi` down to `lo` (the ends of the
    schedule being converted)."""
    lo = sigma_min if sigma_min is not None else lo
    hi = sigma_max if sigma_max is not None else hi
    if schedule == "karras":
        return karras_sigmas(lo, hi, n)
    if schedule == "exponential":
        return np.exp(np.linspace(math.log(hi), math.log(lo), n))
    quantiles = [beta_ppf(float(q), BETA_ALPHA, BETA_BETA) for q in 1 - np.linspace(0, 1, n)]
    return np.array([lo + p * (hi - lo) for p in quantiles])


class MultistepTables(VPNoise):
    """The VP tables of DPM-Solver's family (DPM-Solver++ 2M and 2S, UniPC, DEIS) and how a
    schedule sets them: float32 alpha-bars, log-SNR lambda and training sigmas, as
    diffusers' torch builds them; int64 timesteps, exposed as float32. img2img's noise is
    the VP one from these sigmas (VPNoise)."""

    def _init_tables(
        self,
        owner: str,
        num_train_timesteps: int,
        beta_start: float,
        beta_end: float,
        beta_schedule: str,
        trained_betas: Any,
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        ac = alphas_cumprod_f32(
            owner,
            num_train_timesteps,
            beta_start,
            beta_end,
            beta_schedule,
            trained_betas,
            rescale_betas_zero_snr,
        )
        if rescale_betas_zero_snr:
            ac[-1] = 2**-24  # diffusers: close to 0 so the first sigma is finite (4096)
        self.alphas_cumprod = ac
        self._lambda_t = np.log(np.sqrt(ac)) - np.log(np.sqrt(ONE - ac))
        self._train_sigmas = np.sqrt((ONE - ac) / ac)
        # before set_timesteps diffusers exposes the training schedule; so do we
        self.sigmas = self._train_sigmas
        self._t = np.arange(num_train_timesteps - 1, -1, -1, dtype=np.int64)
        self.timesteps = self._t.astype(F32)
        self.num_inference_steps: int | None = None

    def _set_tables(self, t: np.ndarray, sig: np.ndarray, last_sigma: float) -> None:
        """A schedule's timesteps `t` and sigmas `sig`, the final sigma appended: every
        set_timesteps of the family ends here, so this also starts the run at step 0."""
        self.sigmas = np.concatenate([sig, [last_sigma]]).astype(F32)
        self._t = t.astype(np.int64)
        self.timesteps = self._t.astype(F32)
        self.num_inference_steps = len(self._t)
        self._new_schedule()

    def _alpha_sigma_lambda(self, sigma: np.float32) -> tuple[np.float32, ...]:
        """(alpha_t, sigma_t, lambda_t) at a VP sigma (DPM-Solver++ and UniPC override it
        for flow sigmas): add_noise's alpha_t x0 + sigma_t eps."""
        return alpha_sigma_lambda(sigma)


def multistep_timesteps(
    spacing: str, n_train: int, n: int | None, steps_offset: int, last: int | None = None
) -> np.ndarray:
    """The spacing of DPM-Solver's family (DPM-Solver++, its singlestep form, UniPC, DEIS):
    "linspace" and "leading" take n + 1 points from `last` - 1 (n_train; fewer when
    lambda_min_clipped trims the noisiest end) down to 0 and drop the last; "trailing" is
    Euler's. float64, unrounded where diffusers leaves them so."""
    n = check_steps(n, n_train)
    last = n_train if last is None else last
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy()
    if spacing == "leading":
        return (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1] + steps_offset
    return trailing_timesteps(last, n_train, n)


def check_multistep_steps(
    spacing: str, n_train: int, n: int, steps_offset: int, last: int | None = None
) -> None:
    """Refuse `n` steps of multistep_timesteps' spacing whose interpolated sigmas repeat (a
    timestep repeated, or past the range and clamped): DPM-Solver++, DEIS and UniPC divide
    by the step in log-SNR, so diffusers samples NaN there (see check_steppable). A
    converted schedule (Karras, ...) takes only the count from these timesteps: unchecked."""
    check_steppable(spacing, n_train, n, steps_offset, partial(multistep_timesteps, last=last))


def multistep_sigmas(
    t: np.ndarray,
    train_sigmas: np.ndarray,
    schedule: str | None,
    sigma_min: float | None,
    sigma_max: float | None,
    round_karras: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas) of DPM-Solver's family: the training sigmas at the integer
    timesteps `t`, or, with a converted `schedule`, its sigmas between sigma_min/max (the
    training ends unless a config sets them) and their fractional timesteps, rounded for
    Karras where diffusers rounds them (`round_karras`)."""
    if not schedule:
        return t, np.interp(t.astype(np.int64), np.arange(len(train_sigmas)), train_sigmas)
    ends = float(train_sigmas[0]), float(train_sigmas[-1])
    sig = converted_sigmas(schedule, *ends, len(t), sigma_min, sigma_max)
    t = sigma_to_t(sig, np.log(train_sigmas))
    return (t.round() if schedule == "karras" and round_karras else t), sig


def beta_ppf(q: float, a: float, b: float) -> float:
    """The q-quantile of Beta(a, b): x with I_x(a, b) = q, by bisection (I is monotone)."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} outside [0, 1]")
    if q in (0.0, 1.0):
        return q
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):  # float64 resolution reached
            break
        if betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    # the continued fraction converges fast below the mean; above it, use I_x(a, b) =
    # 1 - I_{1-x}(b, a)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _continued_fraction(b, a, 1.0 - x) / b


def _continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b), evaluated by the modified Lentz method."""
    tiny, eps = 1e-300, 1e-16
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # even term d_2m
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),  # odd term
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            delta = c * d
            h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge: {a}, {b}, {x}")
