"""How the `gateway` command speaks to its user when something is wrong.

A user's mistake is one line (or one line per problem) on stderr, never a traceback:

- problems in a config or rule file: one line per problem, each after the file's name
  (``gateway.yaml: log.max_age: 'forever' is not a duration; …``); exit 2;
- a usage mistake on the command line (an option's value, a missing argument):
  ``error: <what, and what to write>``; exit 2, click's code for usage errors;
- a failure while working (broker down, InfluxDB refused, no running gateway):
  ``error: <what>``; exit 1.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import IO, Any, NoReturn

import click


class UsageMistake(click.UsageError):
    """A usage error shown as the one line ``error: <message>``, exit 2.

    Without click's usage banner: every other error of ours reads as one line too, and
    scripts and tests match that line.
    """

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.format_message()}", file=file, err=True)


def print_problems(problems: Iterable[str], prefix: str = "") -> None:
    """One line per problem on stderr, each after ``prefix`` (e.g. the config file's name)."""
    for line in problems:
        click.echo(f"{prefix}{line}", err=True)


def exit_with_problems(problems: Iterable[str], prefix: str = "") -> NoReturn:
    """Print the problems and exit 2: the input was wrong, not the run."""
    print_problems(problems, prefix)
    raise SystemExit(2)


def fail(err: object, code: int = 1) -> NoReturn:
    """``error: <err>`` on stderr and exit ``code`` (1: a failure while working)."""
    click.echo(f"error: {err}", err=True)
    raise SystemExit(code)


def when(ts: float | None) -> str:
    """An epoch time as UTC for a person, ``-`` for none."""
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
