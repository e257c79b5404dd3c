"""Polling a gateway for the status view: `gateway status` and `gateway demo` both run a
StatusWatcher (its /metrics and its log) and draw what it saw."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.markup import escape

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
    """One gateway's /metrics and log, polled into a StatusState; with ``rules_dir`` (the
    config takes rules from the cloud) also the rules version that runs."""

    def __init__(self, metrics: str, log: Path, links: tuple[str, ...] = ("site",), *,
                 rules_dir: Path | None = None) -> None:
        self.metrics_url = metrics
        self._rules_dir = rules_dir
        self._rules_note: tuple[tuple[str, str], ...] = ()
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
        if self._rules_dir is not None:
            self._rules_note = (("rules", rules_version_text(self._rules_dir)),)

    def snapshot(self, notes: tuple[tuple[str, str], ...] = ()) -> Snapshot:
        return self.state.snapshot(self._rules_note + notes)

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
    return StatusWatcher(url, cfg.log.path, links_of(cfg), rules_dir=cfg.downlink.rules_path(
        cfg.log.path) if cfg.downlink.rules else None)


def rules_version_text(root: Path) -> str:
    """The rules version that runs, as the status view shows it (the same one the retained
    status on the cloud broker carries as ``rules_version``)."""
    from gateway.downlink.versions import Action, read_state  # noqa: PLC0415
    from gateway.errors import ConfigError  # noqa: PLC0415

    try:
        state = read_state(root)
    except ConfigError as err:
        return f"? {escape(str(err))}"
    if state is None or not state.history:
        return "version local (the config's rule files; none deployed from the cloud)"
    last = state.history[-1]
    how = "deployed" if last.action is Action.DEPLOYED else "rolled back to"
    at = time.strftime("%Y-%m-%d %H:%M", time.gmtime(last.time))
    return escape(f"version {last.version} ({how} {at} UTC by request {last.request})")


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
