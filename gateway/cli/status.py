"""`gateway status`: watch a running gateway through its /metrics endpoint and its log."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import click

from gateway.cli.options import config_option, load, positive_duration
from gateway.cli.output import fail


@click.command("status")
@config_option
@click.option("--once", is_flag=True,
              help="Print one snapshot and exit (for scripts and SSH sessions).")
@click.option("--interval", default="1s", show_default=True, help="Redraw this often (live).")
def status(config_path: Path, once: bool, interval: str) -> None:
    """Watch a running gateway: devices, sparklines, actuators, links, sink depths, events.

    A row per device with its latest values and a sparkline of the last minute, the
    state of its actuators (the last command and its answer), the site/cloud/influx
    links, readings per second, how many records each sink still owes, and a feed of
    alerts, commands and link changes. Everything comes from the gateway itself: its
    /metrics endpoint (metrics.listen) and its log file, read-only. Live until Ctrl-C;
    with --once (or when the output is not a terminal) one snapshot, plain text.

    \b
    Example:
      gateway status -c /etc/fieldgate/gateway.yaml
      gateway status -c gateway.yaml --once | grep waiting
    """
    import threading

    from rich.console import Console

    from gateway.status import StatusError, print_once, run_live, watcher_for
    every = positive_duration(interval, "--interval")
    cfg = load(config_path)
    try:
        watcher = watcher_for(cfg, str(config_path))
    except StatusError as err:
        fail(err)
    console = Console()
    try:
        if once or not console.is_terminal:
            print_once(watcher, console)
            return
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: the way out
            run_live(watcher, console, interval=every, stop=stop)
    finally:
        watcher.close()
