"""`gateway run`, `gateway check` and `gateway config sample`: the gateway and its config."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import click

from gateway.cli.options import config_option, load
from gateway.cli.output import exit_with_problems, fail, print_problems
from gateway.config import check_config, sample_config
from gateway.errors import ConfigError, FieldgateError


@click.command("run")
@config_option
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def run(config_path: Path, log_level: str) -> None:
    """Run the gateway until SIGTERM or Ctrl-C.

    \b
    Example:
      gateway run -c /etc/fieldgate/gateway.yaml
    """
    # Until the daemon's handlers are in place (opening the log, loading rules: seconds on a
    # Pi), a SIGHUP (`systemctl reload`) would kill it; note it and reload once running.
    early_reload: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, _frame: early_reload.append(signum))
    from gateway.daemon import Gateway  # the wiring imports paho etc.; keep --help fast

    cfg = load(config_path)
    problems = check_config(cfg)
    if problems:
        exit_with_problems(problems, f"{config_path}: ")
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        gw = Gateway(cfg)
        gw.install_signal_handlers()
        if early_reload:
            gw.request_reload()
        code = gw.run()
    except ConfigError as err:  # e.g. rules: what `check` reports, alike (line and code)
        exit_with_problems(err.problems, f"{config_path}: ")
    except FieldgateError as err:
        fail(err)
    raise SystemExit(code)


@click.command("check")
@config_option
@click.option("--cloud", is_flag=True, help="The file is a `gateway cloud ingest` config "
              "(also detected: broker: or group: and no gateway_id:).")
def check(config_path: Path, cloud: bool) -> None:
    """Validate a config file without touching the network; prints "ok" or one line per problem.

    \b
    Example:
      gateway check -c gateway.yaml
      gateway check --cloud -c cloud.yaml
    """
    from gateway.cli.cloud import check_cloud, is_cloud_config

    if cloud or is_cloud_config(config_path):
        check_cloud(config_path)
        return
    cfg = load(config_path)
    problems = check_config(cfg)
    if cfg.rules:
        from gateway.rule_service import load_groups

        try:
            load_groups(cfg.rules, max_device_id=cfg.ingest.max_device_id)
        except ConfigError as err:
            problems.extend(err.problems)
    print_problems(problems, f"{config_path}: ")
    if problems:
        raise SystemExit(2)
    click.echo("ok")


@click.group("config")
def config_group() -> None:
    """Config file helpers."""


@config_group.command("sample")
@click.option("--cloud", is_flag=True, help="The `gateway cloud ingest` worker's config "
              "instead (deploy/cloud.example.yaml).")
def config_sample(cloud: bool) -> None:
    """Print a commented sample config built from the config models.

    \b
    Example:
      gateway config sample > /etc/fieldgate/gateway.yaml
      gateway config sample --cloud > /etc/fieldgate/cloud.yaml
    """
    if cloud:
        from gateway.cloud.config import sample_cloud_config

        click.echo(sample_cloud_config(), nl=False)
        return
    click.echo(sample_config(), nl=False)
