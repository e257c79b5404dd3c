"""Secrets named by the config: read from a file or an environment variable when needed
(never stored on a model, never logged), and a secret file every user can read refused.

Named like the standard library's ``secrets``; imports here are absolute, so neither hides
the other.
"""

from __future__ import annotations

import os
from pathlib import Path

from gateway.errors import SecretError

# Field names refused inline in any section: a secret comes from <name>_file or <name>_env.
INLINE_SECRET_NAMES = frozenset({"password", "secret", "key", "token"})


def read_secret(path: Path | None, env: str | None, what: str) -> str | None:
    """Read a secret from a file (first line, stripped) or an environment variable."""
    if path is not None:
        try:
            return path.read_text(encoding="utf-8").splitlines()[0].strip()
        except (OSError, IndexError) as err:
            raise SecretError(f"cannot read {what} from {str(path)!r}: "
                              f"{getattr(err, 'strerror', None) or 'empty file'}") from err
    if env is not None:
        value = os.environ.get(env)
        if value is None:
            raise SecretError(f"environment variable {env!r} for the {what} is not set")
        return value
    return None


def exposure(path: Path | None) -> str:
    """What is wrong with a secret file's permissions (empty when nothing is): like ssh with
    a private key, a secret that every user of the machine can read is refused."""
    if path is None:
        return ""
    try:
        mode = path.stat().st_mode
    except OSError:
        return ""  # reported by the read
    if mode & 0o007:
        return (f"{str(path)!r} can be read or written by every user (mode {mode & 0o777:04o}); "
                f"run: chmod 600 {path} (or 640 with the gateway's group)")
    return ""
