"""Which scheduler a run samples with: the bundle's config checked against the numpy ports,
switched (`--scheduler`) or put on another sigma schedule (`--sigmas`), and TCD's eta set.

Each problem is raised before any graph loads: a bundle's is a BundleError, a choice of the
caller's a UserError naming the option.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from slimdiff.runtime.call_checks import check_number
from slimdiff.runtime.manifest import FIX, BundleError, PipelineSpec
from slimdiff.runtime.schedulers import (
    SIGMA_SCHEDULES,
    Scheduler,
    scheduler_from_config,
    switch_scheduler,
    switch_warning,
    with_sigmas,
    with_spacing,
)

from slimdiff.errors import UserError
from slimdiff.models.kinds import timestep_args

__all__ = [
    "check_scheduler",
    "chosen",
    "resampled",
    "respaced",
    "scheduler_problem",
    "set_eta",
    "switched",
]

log = logging.getLogger(__name__)


def set_eta(scheduler: Scheduler, eta: float | None) -> None:
    """TCD's gamma; UserError for a non-number or a value out of 0..1, or for a scheduler
    that takes none (DDIM's eta > 0, its stochastic form, is not ported; the others have
    no eta)."""
    if eta is None:
        return
    value = check_number(eta, "eta", " from 0 to 1")
    if not (np.isfinite(value) and 0 <= value <= 1):
        raise UserError(f"eta {eta}: use a value from 0 to 1")
    if hasattr(scheduler, "eta"):
        scheduler.eta = value
    elif value > 0:
        name = type(scheduler).__name__
        raise UserError(
            f"eta {value:g}: {name} takes no eta here (only TCD's gamma is ported as eta, not "
            "DDIM's stochastic eta nor another's: sample with --scheduler tcd, or leave eta out)"
        )


def scheduler_problem(config: PipelineSpec, scheduler_config: dict) -> str | None:
    """Why the runtime cannot sample with `scheduler_config` for this pipeline, or None.

    Builds the scheduler and sets a schedule at the pipeline's default settings, so an
    unsupported class, or values that break the maths, are found before any graph loads
    (and, at export, before any component is exported) rather than mid-generation.
    """
    lat_h, lat_w = (v // config.vae_scale_factor for v in config.default_size)
    try:
        scheduler = scheduler_from_config(scheduler_config)
        args = timestep_args(config.kind, scheduler_config, config.default_steps, lat_h, lat_w)
        scheduler.set_timesteps(**args)
        timesteps = np.asarray(scheduler.timesteps, np.float64)
    except (ValueError, TypeError, ArithmeticError, KeyError, IndexError) as err:
        return f"{type(err).__name__}: {str(err).partition(chr(10))[0]}"
    if not np.isfinite(timesteps).all():
        return "it gives non-finite timesteps"
    return None


def check_scheduler(root: Path, config: PipelineSpec, scheduler_config: dict) -> None:
    problem = scheduler_problem(config, scheduler_config)
    if problem is not None:
        raise BundleError(
            f"{root}/{config.scheduler}: scheduler config not supported ({problem}); {FIX}"
        )


def chosen(
    root: Path,
    config: PipelineSpec,
    scheduler_config: dict,
    scheduler: str | None = None,
    sigmas: str | None = None,
    spacing: str | None = None,
) -> dict:
    """The scheduler config a run of bundle `root` samples with: its own (checked: a
    BundleError), switched to `scheduler`, put on `sigmas`' schedule and on timestep
    `spacing`, in that order, where given (the caller's choices: UserErrors)."""
    check_scheduler(root, config, scheduler_config)
    if scheduler is not None:
        scheduler_config = switched(config, scheduler_config, scheduler)
        warn_replaced_sigmas(scheduler_config, scheduler, sigmas)
    if sigmas is not None:
        scheduler_config = resampled(config, scheduler_config, sigmas)
    if spacing is not None:
        scheduler_config = respaced(config, scheduler_config, spacing)
    return scheduler_config


def warn_replaced_sigmas(switched_config: dict, scheduler: str, sigmas: str | None) -> None:
    """Warn when `sigmas` replaces the sigma schedule that scheduler preset `scheduler`
    (e.g. euler-karras) brings: both were asked for, the later one wins."""
    own = [s for s in SIGMA_SCHEDULES if switched_config.get(f"use_{s}_sigmas")]
    if sigmas is not None and own and own != [sigmas]:
        log.warning(
            "--scheduler %s samples on %s sigmas, which --sigmas %s replaces",
            scheduler,
            own[0],
            sigmas,
        )


def resampled(config: PipelineSpec, scheduler_config: dict, sigmas: str) -> dict:
    """The scheduler config on `sigmas`' schedule (the caller's choice: UserError)."""
    return _changed(config, with_sigmas, scheduler_config, sigmas, "sigmas")


def respaced(config: PipelineSpec, scheduler_config: dict, spacing: str) -> dict:
    """The scheduler config on diffusers' `spacing` of timesteps (the caller's choice:
    UserError)."""
    return _changed(config, with_spacing, scheduler_config, spacing, "timestep spacing")


def switched(config: PipelineSpec, scheduler_config: dict, name: str) -> dict:
    """The bundle's scheduler config rewritten for scheduler `name` (the caller's choice:
    a problem with it is a UserError, the bundle being fine)."""
    config_out = _changed(config, switch_scheduler, scheduler_config, name, "scheduler")
    warning = switch_warning(scheduler_config, config_out)
    if warning:
        log.warning("scheduler %s: %s", name, warning)
    return config_out


def _changed(config: PipelineSpec, change, scheduler_config: dict, value: str, what: str) -> dict:
    """`change(scheduler_config, value)`, its ValueError and a config the runtime cannot
    sample with both UserErrors naming `what` (--scheduler, --sigmas)."""
    try:
        changed = change(scheduler_config, value)
    except ValueError as err:
        raise UserError(f"{what}: {err}") from None
    problem = scheduler_problem(config, changed)
    if problem is not None:
        raise UserError(f"{what} {value} cannot sample this bundle ({problem}); pick another one")
    return changed
