"""Errors raised by Fieldgate.

The tree::

    FieldgateError                 base of everything we raise on purpose
    ├── ConfigError                a config file or value is wrong (one line per problem)
    ├── SecretError                a secret file or variable is missing or unreadable
    └── LogError                   the durable log cannot be used
        └── LogCorruptError        the log file is not a usable SQLite database

Every message says what was wrong, with which value, and what to do. The CLI prints the
message as one line and exits non-zero; nothing here is meant to reach a user as a traceback.
"""

from __future__ import annotations


class FieldgateError(Exception):
    """Base class of every error Fieldgate raises on purpose."""


class ConfigError(FieldgateError):
    """The configuration is invalid.

    ``problems`` holds one line per problem, each naming the field and the fix.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class SecretError(FieldgateError):
    """A secret could not be read from its file or environment variable."""


class LogError(FieldgateError):
    """The durable log cannot be opened or written."""


class LogCorruptError(LogError):
    """The log file exists but is not a usable database."""

    def __init__(self, path: str, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(
            f"Log file {path!r} is unreadable ({detail}); move it aside to start with an "
            f"empty log, or restore it from a backup"
        )
