"""Offline checks: what ``gateway check`` (and ``gateway run`` before it starts) verifies
beyond the schema, using the file system but never the network — secrets readable and not
exposed, TLS files present and usable, the log's directory writable."""

from __future__ import annotations

import os
from pathlib import Path

from gateway.config.models import GatewayConfig, Link
from gateway.config.secrets import exposure
from gateway.errors import ConfigError, SecretError


def check_config(cfg: GatewayConfig) -> list[str]:
    """Checks beyond the schema that need the file system but never the network."""
    problems: list[str] = []
    links: list[tuple[str, Link]] = [("site", cfg.site)]
    if cfg.cloud is not None:
        links.append(("cloud", cfg.cloud))
    for name, link in links:
        try:
            link.password()
        except SecretError as err:
            problems.append(f"{name}.password: {err}")
        if link.password_file is not None and link.password_env is not None:
            problems.append(f"{name}: set password_file or password_env, not both")
        for field in ("ca_file", "cert_file", "key_file"):
            value = getattr(link, field)
            if value is not None and not Path(value).is_file():
                problems.append(f"{name}.{field}: {str(value)!r} does not exist")
        if (link.cert_file is None) != (link.key_file is None):
            problems.append(f"{name}: set both cert_file and key_file for mutual TLS")
        elif link.tls and not any(p.startswith(f"{name}.") and "_file" in p for p in problems):
            try:
                link.ssl_context(name)
            except ConfigError as err:
                problems.extend(err.problems)
    try:
        cfg.commands.key()
    except SecretError as err:
        problems.append(f"commands.key: {err}")
    secrets: list[tuple[str, Path | None]] = [("commands.key_file", cfg.commands.key_file)]
    for name, link in links:
        secrets += [(f"{name}.password_file", link.password_file),
                    (f"{name}.key_file", link.key_file)]
    if cfg.influx is not None:
        secrets += [("influx.password_file", cfg.influx.password_file),
                    ("influx.token_file", cfg.influx.token_file)]
    for field, secret in secrets:
        problem = exposure(secret)
        if problem:
            problems.append(f"{field}: {problem}")
    if cfg.log.path.is_dir():
        problems.append(f"log.path: {str(cfg.log.path)!r} is a directory; name a file in it, "
                        "e.g. log.db")
    parent = cfg.log.path.parent
    if not parent.exists():
        problems.append(f"log.path: directory {str(parent)!r} does not exist; create it "
                        "or choose another path")
    elif not os.access(parent, os.W_OK):
        problems.append(f"log.path: directory {str(parent)!r} is not writable by this user")
    problems.extend(_check_influx(cfg))
    return problems


def _check_influx(cfg: GatewayConfig) -> list[str]:
    """``gateway check`` for the influx section: secrets readable, CA file present."""
    influx = cfg.influx
    if influx is None:
        return []
    problems = []
    for what, read in (("password", influx.password), ("token", influx.token)):
        try:
            read()
        except SecretError as err:
            problems.append(f"influx.{what}: {err}")
    if influx.ca_file is not None and not influx.ca_file.is_file():
        problems.append(f"influx.ca_file: {str(influx.ca_file)!r} does not exist")
    return problems
