"""Polling a gateway for the status view: `gateway status` and `gateway demo` both run a
StatusWatcher (its /metrics and its log) and draw what it saw."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.live import Live

from gateway.config import GatewayConfig
from gateway.status.sources import (
    LogTail,
    MetricsView,
    StatusError,
    gateway_running,
    metrics_url,
    scrape,
)
from gateway.status.state import WINDOW, Snapshot, StatusState
from gateway.status.view import render


class StatusWatcher:
    """One gateway's /metrics and log, polled into a StatusState."""

    def __init__(self, metrics: str, log: Path, links: tuple[str, ...] = ("site",)) -> None:
        self.metrics_url = metrics
        # A link that never connected has no gauge yet; the config says it should be there.
        self._links = links
        self.tail = LogTail(log)
        self.state = StatusState()

    def poll(self) -> None:
        now = time.time()
        metrics: MetricsView | None = None
        error: str | None = None
        try:
            metrics = scrape(self.metrics_url)
            metrics = replace(metrics, links=dict.fromkeys(self._links, False) | metrics.links)
        except StatusError as err:
            error = str(err)
        try:
            tail = self.tail.poll(since=now - WINDOW - 1)
        except StatusError as err:
            tail = None
            if error is None:
                error = str(err)
        self.state.update(now, metrics, error, tail)

    def snapshot(self, notes: tuple[tuple[str, str], ...] = ()) -> Snapshot:
        return self.state.snapshot(notes)

    def close(self) -> None:
        self.tail.close()


def watcher_for(cfg: GatewayConfig, config_name: str) -> StatusWatcher:
    """A watcher on the gateway that ``cfg`` runs, or StatusError saying, in one line, why
    it cannot be watched: no log yet, not running, /metrics off or not answering."""
    from gateway.daemon import pid_path  # noqa: PLC0415 - the wiring imports paho; keep --help fast

    if not cfg.log.path.exists():
        raise StatusError(f"log {str(cfg.log.path)!r} does not exist: no gateway has run with "
                          f"{config_name} yet (check log.path; start it: gateway run -c "
                          f"{config_name})")
    if gateway_running(pid_path(cfg)) is None:
        raise StatusError(f"no gateway is running with {config_name} (log "
                          f"{str(cfg.log.path)!r} is not held); start it: gateway run -c "
                          f"{config_name} (a stopped gateway's log: gateway log stats -c "
                          f"{config_name})")
    if cfg.metrics.listen is None:
        raise StatusError(f"metrics.listen is null in {config_name}, and gateway status reads "
                          "the gateway's /metrics: set it (e.g. 127.0.0.1:9108) and restart "
                          "the gateway")
    url = metrics_url(cfg.metrics.listen)
    scrape(url)  # fail now, in one line, rather than draw an empty screen
    return StatusWatcher(url, cfg.log.path, links_of(cfg))


def links_of(cfg: GatewayConfig) -> tuple[str, ...]:
    """The links a gateway with this config keeps up (the names on /metrics)."""
    return ("site", *(("cloud",) if cfg.cloud is not None else ()),
            *(("influx",) if cfg.influx is not None else ()))


def print_once(watcher: StatusWatcher, console: Console) -> None:
    """Two polls a second apart (the rate needs two scrapes), then one picture."""
    watcher.poll()
    time.sleep(1.0)
    watcher.poll()
    console.print(render(watcher.snapshot(), width=console.width, height=None))


def run_live(watcher: StatusWatcher, console: Console, *, interval: float,
             stop: threading.Event) -> None:
    """Redraw every ``interval`` seconds on the terminal's alternate screen until ``stop``."""
    watcher.poll()
    with Live(console=console, screen=True, auto_refresh=False) as live:
        while True:
            live.update(render(watcher.snapshot(), width=console.width,
                               height=console.height), refresh=True)
            if stop.wait(interval):
                return
            watcher.poll()
