"""Helpers shared by the numpy schedulers: config checks, the diffusers schedule maths, and
img2img's begin index and forward noise (`Img2Img` and its noise forms).

Scalars are explicit `np.float32` so numpy 1.x (value-based casting) and 2.x (NEP 50)
give the same dtypes; where diffusers computes in float32 torch we compute in float32
numpy, where it computes in float64 numpy we do too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real
from typing import Any

import numpy as np

F32 = np.float32
ONE = np.float32(1.0)
# diffusers' configs use 1000. Every table is that long, and DPM++ SDE builds a schedule of
# that many steps when it is made: 10**9 (a few bytes of JSON) took minutes and gigabytes
MAX_TRAIN_TIMESTEPS = 100_000
# how far below a refused step count `check_steppable` looks for one that works
_FEWER_STEPS_LOOKED_AT = 100


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


def reject_learned_variance(owner: str, config: dict[str, Any]) -> None:
    """DPM-Solver reads variance_type only to cut a learned variance off the model output
    (DeepFloyd IF's 6 channels), not ported; any other value (a DDPM config's
    "fixed_small", carried over by from_config) samples as None does, as in diffusers."""
    value = config.get("variance_type")
    if value in ("learned", "learned_range"):
        raise ValueError(
            f"{owner}: variance_type={value!r} (a model that predicts its variance) is not "
            "supported by the numpy runtime; pick a supported scheduler config or run diffusers"
        )


def reject_args(owner: str, **args: Any) -> None:
    """set_timesteps arguments of the uniform API that this scheduler has no use for."""
    for key, value in args.items():
        if value is not None:
            raise ValueError(f"{owner}.set_timesteps does not take `{key}`")


def check_train_timesteps(value: Any) -> int:
    """A config's `num_train_timesteps`: a whole number in 1..MAX_TRAIN_TIMESTEPS."""
    whole = isinstance(value, int) and not isinstance(value, bool)
    if not whole or not 0 < value <= MAX_TRAIN_TIMESTEPS:
        raise ValueError(
            f"num_train_timesteps={value!r}: use a whole number from 1 to {MAX_TRAIN_TIMESTEPS} "
            "(diffusers' configs use 1000)"
        )
    return value


def check_steps(n: int | None, n_train: int) -> int:
    """`set_timesteps`' step count: 1..n_train (the training schedule's length)."""
    if n is None or not 0 < n <= n_train:
        raise ValueError(f"num_inference_steps must be in 1..{n_train}, got {n}")
    return n


def check_steppable(
    spacing: str,
    n_train: int,
    n: int,
    steps_offset: int,
    timesteps: Callable[[str, int, int, int], np.ndarray] | None = None,
) -> None:
    """Refuse `n` steps whose timesteps (`timesteps(spacing, n_train, n, steps_offset)`,
    spaced_timesteps by default) leave the training range or repeat one. diffusers fails
    there with the same schedule: an index past its alpha-bar table (DDIM, DDPM, PNDM), or
    NaN where a solver divides by a step of size 0 (LMS, DPM++ SDE, DPM-Solver++, DEIS,
    UniPC: a timestep past the range is clamped to the last one's sigma). SD1.5's "leading"
    spacing with steps_offset 1 does it at 1000 steps, the multistep solvers' at 999 and
    1000, their "linspace" at 1000; "trailing" never does. The ValueError names the most
    steps that work, when a few fewer do."""
    spaced = timesteps or spaced_timesteps
    problem = _unsteppable(spaced(spacing, n_train, n, steps_offset), n_train)
    if problem is None:
        return
    fewer = range(n - 1, max(n - _FEWER_STEPS_LOOKED_AT, 0), -1)
    fits = (
        m for m in fewer if not _unsteppable(spaced(spacing, n_train, m, steps_offset), n_train)
    )
    most = next(fits, 0)
    offset = f" with steps_offset={steps_offset}" if spacing == "leading" else ""
    raise ValueError(
        f"{n} {spacing!r} steps{offset} {problem}, where diffusers fails; use "
        f"{f'at most {most}' if most else 'fewer'} steps, or 'trailing' spacing "
        "(--timestep-spacing trailing)"
    )


def _unsteppable(t: np.ndarray, n_train: int) -> str | None:
    """What is wrong with descending timesteps `t` for check_steppable, or None."""
    last = n_train - 1
    if t.max() > last:
        return f"put a step at timestep {t.max():.10g}, past the training schedule's last ({last})"
    repeated = np.flatnonzero(np.diff(t) == 0)
    if repeated.size:
        return f"repeat timestep {t[repeated[0]]:.10g} (a step of size 0)"
    return None


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


def restarts(owner: str, step_index: int, last_step: int, begin: int) -> bool:
    """A multistep solver's step order: True at `begin` (the run's first step, 0 or
    img2img's set_begin_index: its history starts afresh there, as diffusers' does after
    set_timesteps), ValueError for any step but the one after `last_step` (a skipped or
    repeated step would mix in another trajectory's history) or one before `begin`."""
    if step_index == begin:
        return True
    expected = last_step + 1 if last_step >= begin else begin
    if step_index != expected:
        raise ValueError(
            f"{owner} keeps a history: step {expected} expected, got {step_index} "
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
        betas = _trained_betas(owner, trained_betas, n)
    elif beta_schedule == "linear":
        _check_beta_ends(owner, beta_start, beta_end)
        # torch.linspace(float32) lands within an ulp of the rounded float64 linspace
        betas = np.linspace(beta_start, beta_end, n).astype(F32)
    elif beta_schedule == "scaled_linear":
        _check_beta_ends(owner, beta_start, beta_end)
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


def _trained_betas(owner: str, values: Any, n: int) -> np.ndarray:
    """A config's trained_betas as float32: one beta in [0, 1) per training timestep.
    diffusers takes any list, but a shorter one indexes past its tables mid-run (PNDM at 2
    steps) and a beta >= 1 gives NaN sigmas: refused here, before any graph runs."""
    problem = f"{owner}: trained_betas must list num_train_timesteps ({n}) numbers in [0, 1)"
    try:
        betas = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(problem) from None
    if betas.shape != (n,) or not ((betas >= 0) & (betas < 1)).all():
        raise ValueError(problem)
    return betas.astype(F32)


def _check_beta_ends(owner: str, beta_start: Any, beta_end: Any) -> None:
    """The ends of a linear schedule, each in [0, 1): outside, diffusers' sigmas are NaN
    (a negative end: the square root of scaled_linear is complex) and so is every image."""
    for key, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value < 1:
            raise ValueError(
                f"{owner}: {key}={value!r} must be a number in [0, 1) (Stable Diffusion's "
                "configs use 0.00085 and 0.012)"
            )


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma: log-sigma interpolation (diffusers)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    low_idx = _last_at_or_below(log_sigmas, log_sigma).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def _last_at_or_below(table: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For each of `values`, the last index j with table[j] <= value, or 0 where there is
    none: diffusers' cumsum(dists >= 0).argmax(), without its (len(table), len(values))
    matrix (DPM++ SDE's first schedule at 100000 training steps: 80 GB). Training sigmas
    ascend, where a binary search gives the same index; any other table is done diffusers'
    way, a slice of values at a time."""
    values = np.asarray(values)
    flat = values.reshape(-1)
    if (table[1:] >= table[:-1]).all():  # not np.diff: inf - inf is NaN (underflowed alpha-bars)
        idx = np.maximum(np.searchsorted(table, flat, side="right") - 1, 0)
        idx[np.isnan(flat)] = 0  # a NaN compares false with every entry: none is below it
        return idx.reshape(values.shape)
    rows = max(1, (1 << 22) // max(len(table), 1))
    parts = [
        np.cumsum(flat[k : k + rows] - table[:, np.newaxis] >= 0, axis=0).argmax(axis=0)
        for k in range(0, len(flat), rows)
    ]
    return np.concatenate(parts or [np.zeros(0, np.int64)]).reshape(values.shape)


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


class Img2Img:
    """img2img's `set_begin_index`, `begin_index` and `add_noise`, as diffusers' img2img
    pipelines (SD, SDXL, SD3, FLUX) use them: they keep the schedule's steps from
    begin = t_start * order on (`set_begin_index(begin)` where the class has it) and noise
    the image's latents to timesteps[begin] with the forward process of the scheduler's
    parametrisation, one of the `_noised` forms below, in float32 and diffusers' order of
    operations. Each class mixes in one form and calls `_new_schedule()` from
    set_timesteps, which sets the begin index back to 0 as diffusers' does."""

    _begin_index = 0
    _scheduled = False  # set_timesteps has run: the tables are the run's

    @property
    def begin_index(self) -> int:
        """The step the run starts at: 0 (text-to-image) unless set_begin_index moved it."""
        return self._begin_index

    def _new_schedule(self) -> None:
        """set_timesteps' part: a new schedule starts at step 0 (diffusers resets its
        begin_index to None there, which is 0 for a pipeline's loop)."""
        self._begin_index, self._scheduled = 0, True

    def set_begin_index(self, begin: int) -> None:
        """Start the run at step `begin` (img2img: t_start * order), after set_timesteps and
        before the first step; the loop then runs steps begin..len(timesteps) - 1, and a
        multistep solver's history starts afresh at `begin`. ValueError outside
        0..len(timesteps) - 1, and where diffusers' run from `begin` is ill-defined."""
        name = type(self).__name__
        if not self._scheduled:
            raise ValueError(f"{name}: call set_timesteps before set_begin_index")
        n = len(self.timesteps)
        if isinstance(begin, bool) or not isinstance(begin, (int, np.integer)):
            raise ValueError(f"{name}: the begin index must be an int, got {begin!r}")
        if not 0 <= begin < n:
            raise ValueError(f"{name}: the begin index must be in 0..{n - 1}, got {begin}")
        if begin % self.order:
            # diffusers' Heun-like classes start from an odd index between the two calls
            # of a step, whose sigmas are equal: Heun, DPM2 and flow Heun then return the
            # noisy image unchanged, DPM2 a and DPM++ SDE NaN
            raise ValueError(
                f"{name}: begin index {begin} is odd, but each of its steps takes two "
                "calls (order 2); start at t_start * order, as diffusers' pipelines do"
            )
        refused = self._refused_begin(int(begin))
        if refused:
            raise ValueError(f"{name} cannot start at step {begin}: {refused}")
        self._begin_index = int(begin)

    def _refused_begin(self, begin: int) -> str | None:
        """Why the run cannot start at `begin` (None: it can); see PNDM."""
        return None

    def add_noise(self, original: np.ndarray, noise: np.ndarray, step_index: int) -> np.ndarray:
        """The clean latents `original` noised to timesteps[step_index] with standard-normal
        `noise` of the same shape, float32: diffusers' add_noise (scale_noise for
        FlowMatch) at timesteps[begin:begin + 1] with begin = step_index."""
        name = type(self).__name__
        if not self._scheduled:
            raise ValueError(f"{name}: call set_timesteps before add_noise")
        check_step(name, step_index, len(self.timesteps))
        if np.shape(original) != np.shape(noise):
            raise ValueError(
                f"{name}.add_noise: noise of shape {np.shape(noise)} for latents of shape "
                f"{np.shape(original)}"
            )
        return as_f32(self._noised(as_f32(original), as_f32(noise), step_index))

    def _noised(self, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        raise NotImplementedError


class AlphaBarNoise(Img2Img):
    """sqrt(a) x0 + sqrt(1 - a) eps at the integer timestep `_t[i]` (DDIM, DDPM, PNDM, LCM,
    TCD), as diffusers indexes its float32 alphas_cumprod."""

    def _noised(self, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        a = self.alphas_cumprod[int(self._t[i])]
        return np.sqrt(a) * original + np.sqrt(ONE - a) * noise


class SigmaNoise(Img2Img):
    """x0 + sigma eps, the variance-exploding forward process (Euler's family, EDM)."""

    def _noised(self, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        return original + noise * self.sigmas[i]


class VPNoise(Img2Img):
    """alpha_t x0 + sigma_t eps from the class's `_alpha_sigma_lambda(sigma)`: the VP
    alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha_t, or on flow sigmas 1 - sigma and
    sigma (diffusers' _sigma_to_alpha_sigma_t of DPM-Solver's family)."""

    def _noised(self, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        alpha_t, sigma_t, _ = self._alpha_sigma_lambda(self.sigmas[i])
        return alpha_t * original + sigma_t * noise


class FlowNoise(Img2Img):
    """sigma eps + (1 - sigma) x0, rectified flow's interpolation (diffusers' scale_noise)."""

    def _noised(self, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        sigma = self.sigmas[i]
        return sigma * noise + (ONE - sigma) * original
