"""Long work shows progress off a terminal too, and warns once when it will be long."""

from __future__ import annotations

import logging

from slimdiff import progress as progress_mod
from slimdiff.progress import Progress


def test_off_a_terminal_progress_is_logged_and_long_work_warned(caplog, monkeypatch):
    clock = iter(float(t) for t in range(0, 10_000, 40))  # each call: 40 s later
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="slimdiff.progress")
    with Progress("distill", 1000, unit="iterations", hint="lower distill.steps") as p:
        for _ in range(3):
            p.advance(description="loss 0.1")
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "distill: 1000 iterations to do"
    assert "distill: 1/1000 iterations (loss 0.1)" in messages
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # 40 s an iteration, 999 to go: about 11 hours, said once, with what to do.
    assert warnings == [
        "distill: 999 iterations at 40 s each will take about 11.1 h more; lower distill.steps"
    ]
    assert messages[-1].startswith("distill: done (3 iterations in")


def test_short_work_does_not_warn(caplog):
    caplog.set_level(logging.INFO, logger="slimdiff.progress")
    with Progress("calibration", 10) as p:
        for _ in range(10):
            p.advance()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_step_progress_learns_its_total_from_the_first_call(caplog, monkeypatch):
    """The runtime's on_step(done, total): the bar starts at the first call; a run that
    will outlast warn_after (600 s for an image) warns once, with what to do."""
    from slimdiff.progress import StepProgress

    clock = iter(float(t) for t in range(0, 10_000, 40))  # each call: 40 s later
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="slimdiff.progress")
    bar = StepProgress("denoising", hint="fewer --steps")
    for done in range(1, 31):
        bar(done, 30)
    bar.close()
    bar.close()  # a second close does nothing
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "denoising: 30 steps to do"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].endswith("more; fewer --steps")
    assert messages[-1].startswith("denoising: done (30 steps in")
    unused = StepProgress("denoising")
    unused.close()  # never started: nothing logged
    assert len(caplog.records) == len(messages)


def test_one_of_a_unit_is_said_in_the_singular(caplog):
    caplog.set_level(logging.INFO, logger="slimdiff.progress")
    with Progress("denoising", 1, unit="steps") as p:
        p.advance()
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "denoising: 1 step to do"
    assert messages[-1].startswith("denoising: done (1 step in ")


def test_work_that_stops_short_says_no_done(caplog):
    """Ctrl-C or an error mid-run: no "done" line after "interrupted"."""
    import pytest

    from slimdiff.progress import StepProgress

    caplog.set_level(logging.INFO, logger="slimdiff.progress")
    with pytest.raises(KeyboardInterrupt), StepProgress("denoising") as bar:
        bar(1, 30)
        raise KeyboardInterrupt
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["denoising: 30 steps to do"]
