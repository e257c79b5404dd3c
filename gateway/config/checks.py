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
    """Checks beyond the schema that need the file system but never the network; one line
    per problem, naming the field and the fix."""
    links: list[tuple[str, Link]] = [("site", cfg.site)]
    if cfg.cloud is not None:
        links.append(("cloud", cfg.cloud))
    problems: list[str] = []
    for name, link in links:
        problems += link_problems(name, link)
    try:
        cfg.commands.key()
    except SecretError as err:
        problems.append(f"commands.key: {err}")
    problems += _exposed_secret_files(cfg, links)
    problems += _log_path_problems(cfg)
    problems += _influx_problems(cfg)
    problems += _rules_dir_problems(cfg)
    return problems


def _rules_dir_problems(cfg: GatewayConfig) -> list[str]:
    """With rule deployment on, deployed versions can be written: the directory (or the
    directory it would be made in) is writable."""
    if not cfg.downlink.rules:
        return []
    path = cfg.downlink.rules_path(cfg.log.path)
    where = path if path.exists() else path.parent
    if path.exists() and not path.is_dir():
        return [f"downlink.rules_dir: {str(path)!r} is not a directory; remove it or choose "
                "another rules_dir"]
    if where.exists() and not os.access(where, os.W_OK):
        return [f"downlink.rules_dir: {str(where)!r} is not writable by this user; deployed "
                "rule versions are kept there"]
    return []


def link_problems(name: str, link: Link) -> list[str]:
    """A broker link: its password readable, its TLS files present and usable."""
    problems: list[str] = []
    try:
        link.password()
    except SecretError as err:
        problems.append(f"{name}.password: {err}")
    if link.password_file is not None and link.password_env is not None:
        problems.append(f"{name}: set password_file or password_env, not both")
    missing = False
    for field in ("ca_file", "cert_file", "key_file"):
        value = getattr(link, field)
        if value is not None and not Path(value).is_file():
            problems.append(f"{name}.{field}: {str(value)!r} does not exist")
            missing = True
    if (link.cert_file is None) != (link.key_file is None):
        problems.append(f"{name}: set both cert_file and key_file for mutual TLS")
    elif link.tls and not missing:
        try:
            link.ssl_context(name)
        except ConfigError as err:
            problems.extend(err.problems)
    return problems


def _exposed_secret_files(cfg: GatewayConfig, links: list[tuple[str, Link]]) -> list[str]:
    """Secret files that every user of the machine can read (see secrets.exposure)."""
    secrets: list[tuple[str, Path | None]] = [("commands.key_file", cfg.commands.key_file)]
    for name, link in links:
        secrets += [(f"{name}.password_file", link.password_file),
                    (f"{name}.key_file", link.key_file)]
    if cfg.influx is not None:
        secrets += [("influx.password_file", cfg.influx.password_file),
                    ("influx.token_file", cfg.influx.token_file)]
    return [f"{field}: {problem}" for field, secret in secrets if (problem := exposure(secret))]


def _log_path_problems(cfg: GatewayConfig) -> list[str]:
    """The log file can be created: a file name, in a directory that exists and is writable."""
    problems: list[str] = []
    if cfg.log.path.is_dir():
        problems.append(f"log.path: {str(cfg.log.path)!r} is a directory; name a file in it, "
                        "e.g. log.db")
    parent = cfg.log.path.parent
    if not parent.exists():
        problems.append(f"log.path: directory {str(parent)!r} does not exist; create it "
                        "or choose another path")
    elif not os.access(parent, os.W_OK):
        problems.append(f"log.path: directory {str(parent)!r} is not writable by this user")
    return problems


def _influx_problems(cfg: GatewayConfig) -> list[str]:
    """The influx section: secrets readable, CA file present."""
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
