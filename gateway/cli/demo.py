"""`gateway demo`: the whole path on this machine, with temporary brokers and InfluxDB."""

from __future__ import annotations

import logging
import sys

import click

from gateway.cli.output import UsageMistake, fail
from gateway.errors import FieldgateError


@click.command("demo")
@click.option("--duration", default="30s", show_default=True, help="How long sensors publish.")
@click.option("--cut-cloud", default="0s", show_default=True,
              help="Stop the cloud broker this long (after 5 s) to show store-and-forward.")
def demo(duration: str, cut_cloud: str) -> None:
    """Run the whole path on this machine: brokers, gateway, InfluxDB, simulated sensors.

    Needs Mosquitto; with InfluxDB 1.x installed (sudo apt-get install -y mosquitto
    influxdb) the gateway also writes to an influxd it starts, and the demo ends with
    what `gateway query last` and `gateway query alerts` say. On a terminal it shows the
    `gateway status` view live. Everything is temporary and removed at the end. Exits 0
    when every logged reading arrived at the cloud broker (and InfluxDB holds every
    record and the same alerts).

    \b
    Example:
      gateway demo --duration 30s --cut-cloud 10s
    """
    from fieldkit.units import parse_duration
    from gateway.demo import run_demo

    try:
        seconds, cut = parse_duration(duration), parse_duration(cut_cloud)
    except ValueError as err:
        raise UsageMistake(str(err)) from err
    logging.basicConfig(level="WARNING", stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        raise SystemExit(run_demo(seconds, cut))
    except FieldgateError as err:
        fail(err)
