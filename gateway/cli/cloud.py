"""`gateway cloud ingest` and `gateway cloud dlq`: the cloud side of a fleet (README
"Fleet ingest")."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from gateway.cli.output import exit_with_problems, fail, print_problems, when

if TYPE_CHECKING:
    from gateway.cloud.config import CloudConfig

DEFAULT_CLOUD_CONFIG = "/etc/fieldgate/cloud.yaml"
cloud_config_option = click.option(
    "-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
    envvar="FIELDGATE_CLOUD_CONFIG", default=DEFAULT_CLOUD_CONFIG, show_default=True,
    help="Worker config (YAML, `gateway config sample --cloud`); also $FIELDGATE_CLOUD_CONFIG.",
)


def is_cloud_config(path: Path) -> bool:
    """The file is a worker's config (broker:/group:, no gateway_id:); False if unreadable
    (the gateway's loader then says why)."""
    from gateway.cloud.config import looks_like_cloud, read_yaml
    from gateway.errors import ConfigError

    try:
        return looks_like_cloud(read_yaml(path))
    except ConfigError:
        return False


def check_cloud(path: Path) -> None:
    """`gateway check` of a worker's config: "ok", or one line per problem and exit 2."""
    from gateway.cloud.config import check_cloud_config

    problems = check_cloud_config(load_cloud(path))
    print_problems(problems, f"{path}: ")
    if problems:
        raise SystemExit(2)
    click.echo("ok")


def load_cloud(path: Path) -> CloudConfig:
    from gateway.cloud.config import load_cloud_config
    from gateway.errors import ConfigError

    try:
        return load_cloud_config(path)
    except ConfigError as err:
        exit_with_problems(err.problems, f"{path}: ")


@click.group("cloud")
def cloud_group() -> None:
    """Cloud side of a fleet: gateways' uplink into InfluxDB."""


@cloud_group.command("ingest")
@cloud_config_option
@click.option("--client-id", default=None,
              help="MQTT client id of this worker (overrides broker.client_id); each worker "
              "of a group needs its own, the same across its restarts.")
@click.option("--metrics", "metrics_listen", default=None,
              help="host:port for /metrics (overrides metrics.listen); 'off' for none.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def ingest(config_path: Path, client_id: str | None, metrics_listen: str | None,
           log_level: str) -> None:
    """Write the gateways' uplink (telemetry, events, status) from the cloud broker to
    InfluxDB, on a shared subscription: run several to share the load. Stops on SIGTERM
    or Ctrl-C after writing and acknowledging what it holds.

    \b
    Example:
      gateway config sample --cloud > cloud.yaml   # edit it
      gateway check --cloud -c cloud.yaml
      gateway cloud ingest -c cloud.yaml --client-id ingest-1 --metrics 127.0.0.1:9118
    """
    from gateway.cloud.config import IngestMetrics, check_cloud_config
    from gateway.cloud.worker import IngestWorker
    from gateway.errors import ConfigError, FieldgateError

    cfg = load_cloud(config_path)
    if metrics_listen is not None:
        try:
            metrics = IngestMetrics(listen=None if metrics_listen == "off" else metrics_listen)
        except ValueError as err:
            fail(f"--metrics {metrics_listen!r}: {str(err).splitlines()[-1].strip()}", 2)
        cfg = cfg.model_copy(update={"metrics": metrics})
    problems = check_cloud_config(cfg)
    if problems:
        exit_with_problems(problems, f"{config_path}: ")
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        worker = IngestWorker(cfg, client_id=client_id)
        worker.install_signal_handlers()
        code = worker.run()
    except ConfigError as err:
        exit_with_problems(err.problems, f"{config_path}: ")
    except FieldgateError as err:
        fail(err)
    raise SystemExit(code)


@cloud_group.command("dlq")
@cloud_config_option
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1),
              help="Newest dead letters to show.")
def dlq(config_path: Path, limit: int) -> None:
    """Show the worker's dead letters (messages it could not use), newest first, with a
    count by reason.

    \b
    Example:
      gateway cloud dlq -c cloud.yaml --limit 5
    """
    from gateway.cloud.state import IngestState
    from gateway.errors import FieldgateError

    cfg = load_cloud(config_path)
    if not cfg.state_path.exists():
        fail(f"no state file {str(cfg.state_path)!r} yet: no worker has run with this config")
    try:
        state = IngestState(cfg.state_path, dlq_max_rows=cfg.dlq_max_rows)
    except FieldgateError as err:
        fail(err)
    counts = state.dead_letter_counts()
    click.echo("dead letters: " + (", ".join(f"{r} {n}" for r, n in sorted(counts.items()))
                                   or "none"))
    for row in state.dead_letters(limit):
        payload = row.payload[:80].decode("utf-8", "replace")
        click.echo(f"{row.id}  {when(row.at)}  {row.reason}  {row.topic}  {row.detail}  "
                   f"{payload!r}")
    for gateway, (hwm, lost) in state.marks().items():
        click.echo(f"gateway {gateway}: high-water seq {hwm}, lost {lost}")
    state.close()
