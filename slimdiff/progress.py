"""Progress of long work, on a terminal and off it, and a warning when it will be long.

On a terminal a rich bar shows (and goes when done). Elsewhere (CI logs, a pipe, `nohup`)
rich draws nothing, so a line goes to the `slimdiff.progress` logger every `every` seconds
and at the end; the CLI shows that logger by default. Either way, once the first 5% or 30 s
are done, work projected past `warn_after` seconds logs one WARNING with the estimate and
what to do about it (`hint`), so a 250k-step distillation on a CPU is not a silent day.

Example:
    with Progress("distill", total=1000, hint="lower distill.steps or use --device cuda") as p:
        for _ in range(1000):
            ...
            p.advance(description=f"distill loss {loss:.3g}")
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

__all__ = ["Progress", "StepProgress"]

log = logging.getLogger("slimdiff.progress")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """A progress bar or periodic log lines for `total` units of work (see module)."""

    def __init__(
        self,
        description: str,
        total: int,
        completed: int = 0,
        *,
        unit: str = "steps",
        hint: str = "",
        warn_after: float = 3600.0,
        every: float = 30.0,
    ) -> None:
        self.description, self.total, self.done = description, total, completed
        self.unit, self.hint, self.warn_after, self.every = unit, hint, warn_after, every
        self._start_done = completed
        self._bar: Any = None
        self._warned = False

    def __enter__(self) -> Progress:
        self._t0 = self._last = time.perf_counter()
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
            from rich.console import Console

            # on stderr, the stream it asked about: stdout is what a command prints
            self._bar = RichProgress(
                *columns, TimeRemainingColumn(), transient=True, console=Console(stderr=True)
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total, completed=self.done)
        else:
            left = self.total - self.done
            log.info("%s: %d %s to do", self.description, left, self._units(left))
        return self

    def _units(self, n: int) -> str:
        """The unit for `n` of them: "1 step", "2 steps" (units are given plural)."""
        return self.unit[:-1] if n == 1 and self.unit.endswith("s") else self.unit

    def advance(self, n: int = 1, description: str | None = None) -> None:
        self.done += n
        now = time.perf_counter()
        if self._bar is not None:
            self._bar.update(self._task, advance=n, description=description or self.description)
        elif now - self._last >= self.every:
            self._last = now
            log.info(
                "%s: %d/%d %s%s",
                self.description,
                self.done,
                self.total,
                self.unit,
                f" ({description})" if description else "",
            )
        self._maybe_warn(now)

    def _maybe_warn(self, now: float) -> None:
        elapsed, progressed = now - self._t0, self.done - self._start_done
        if self._warned or progressed <= 0 or self.done >= self.total:
            return
        if elapsed < 30 and progressed < 0.05 * self.total:
            return
        self._warned = True
        remaining = elapsed / progressed * (self.total - self.done)
        if remaining > self.warn_after:
            log.warning(
                "%s: %d %s at %.3g s each will take about %s more%s",
                self.description,
                self.total - self.done,
                self.unit,
                elapsed / progressed,
                _duration(remaining),
                f"; {self.hint}" if self.hint else "",
            )

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
        elif exc[0] is None:
            spent = time.perf_counter() - self._t0
            log.info(
                "%s: done (%d %s in %s)",
                self.description,
                self.done,
                self._units(self.done),
                _duration(spent),
            )


class StepProgress:
    """A `Progress` for work whose total is known only once it starts: call it as
    `(done, total)` after each unit (the runtime's `on_step`), then `close()`.

    Example:
        with StepProgress("denoising", hint="fewer --steps") as bar:
            pipe(prompt, on_step=bar)
    """

    def __init__(self, description: str, *, hint: str = "", warn_after: float = 600.0) -> None:
        self.description, self.hint, self.warn_after = description, hint, warn_after
        self._progress: Progress | None = None

    def __call__(self, done: int, total: int) -> None:
        if self._progress is None:
            bar = Progress(self.description, total, hint=self.hint, warn_after=self.warn_after)
            self._progress = bar.__enter__()
        self._progress.advance(done - self._progress.done)

    def close(self, *exc: Any) -> None:
        """End the bar: its "done" line, unless `exc` (an exception's type, value and
        traceback) says the work stopped short (Ctrl-C, an error)."""
        if self._progress is not None:
            self._progress.__exit__(*(exc or (None, None, None)))
            self._progress = None

    def __enter__(self) -> StepProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(*exc)
