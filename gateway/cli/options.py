"""What several commands share: the --config option, reading that config, duration options."""

from __future__ import annotations

from pathlib import Path

import click

from gateway.cli.output import UsageMistake, exit_with_problems
from gateway.config import GatewayConfig, load_config
from gateway.errors import ConfigError

DEFAULT_CONFIG = "/etc/fieldgate/gateway.yaml"
config_option = click.option(
    "-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
    envvar="FIELDGATE_CONFIG", default=DEFAULT_CONFIG, show_default=True,
    help="Config file (YAML); also $FIELDGATE_CONFIG.",
)


def load(path: Path) -> GatewayConfig:
    """The config at ``path``, or one line per problem (after the file's name) and exit 2."""
    try:
        return load_config(path)
    except ConfigError as err:
        exit_with_problems(err.problems, f"{path}: ")


def positive_duration(value: str, name: str = "--since") -> float:
    """Seconds from a duration option (``30s``, ``6h``) that must be longer than 0."""
    from fieldkit.units import parse_duration

    try:
        seconds = parse_duration(value)
    except ValueError as err:
        raise UsageMistake(f"{name}: {err}") from err
    if seconds <= 0:
        raise UsageMistake(f"{name}: {value!r} must be longer than 0s")
    return seconds
