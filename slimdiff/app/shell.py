"""The process around a `slimdiff` command: user errors and click's usage errors as one
line with exit code 2, signals, closed streams, and logging on stderr."""

from __future__ import annotations

import logging
import os
import signal
import sys

import click

from slimdiff.errors import Terminated, UserError, disk_error, out_of_memory


def _usage_error(err: click.UsageError) -> None:
    # click prints usage and a hint over several lines; slimdiff's errors are one line.
    command = err.ctx.command_path if err.ctx is not None else "slimdiff"
    click.secho(f"error: {err.format_message()} (see `{command} --help`)", fg="red", err=True)
    sys.exit(2)


class Group(click.Group):
    """Turns UserError and click's usage errors into one line and exit code 2."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as err:
            _usage_error(err)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as err:
            _usage_error(err)
        except UserError as err:
            click.secho(f"error: {err}", fg="red", err=True)
            sys.exit(err.exit_code)
        except BrokenPipeError:  # stdout piped into `head` or a reader that quit: done
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # no second error at exit's flush
            sys.exit(141)  # 128 + SIGPIPE, as a shell tool ends
        except Exception as err:  # memory or disk that ran out: one line; anything else a bug
            known = out_of_memory(err, ctx.invoked_subcommand) or disk_error(err)
            if known is None:
                raise
            click.secho(f"error: {known}", fg="red", err=True)
            sys.exit(known.exit_code)
        except KeyboardInterrupt as err:
            terminated = isinstance(err, Terminated)
            click.echo("terminated" if terminated else "interrupted", err=True)
            sys.exit(err.exit_code if terminated else 130)


def _terminate(signum: int, frame) -> None:
    raise Terminated(signum)


def _closed_streams_to_devnull() -> None:
    """A command run with stdout or stderr closed (`>&-`) writes there into /dev/null, as
    to a full pipe, rather than failing on the first log line."""
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))  # noqa: SIM115 (for the process's life)


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*TracerWarning.*")


def prepare(verbose: int) -> None:
    """Streams, signals, threads and logging for the command about to run."""
    from slimdiff.threads import prepare_process, threads_from_env

    _closed_streams_to_devnull()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _terminate)
    threads_from_env()  # a bad SLIMDIFF_THREADS fails here, with one line, not mid-run
    prepare_process()  # OpenMP must not spin; it reads this when torch is imported
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    from rich.console import Console
    from rich.logging import RichHandler

    # logs and progress on stderr: stdout carries what a command prints (paths, tables)
    handler = RichHandler(show_path=False, console=Console(stderr=True))
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler])
    # Progress of long work (slimdiff/progress.py) shows by default; off a terminal it is
    # the only sign of life of a long compress.
    logging.getLogger("slimdiff.progress").setLevel(min(level, logging.INFO))
    _quiet_libraries()
