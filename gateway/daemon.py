"""Wiring: builds the log, the ingest side and the sinks from the config and runs them.

This is the only module (with the CLI) that knows the concrete sink classes. The parts talk
to each other only through the durable log; one loop drives all of them, so a reading costs
no thread hand-offs and one wake-up serves every socket that has something: read the site
broker, commit, acknowledge, publish due batches, read PUBACKs.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Protocol

from gateway.commands import CommandSender
from gateway.config import GatewayConfig
from gateway.errors import FieldgateError
from gateway.events import Event
from gateway.ingest.decode import Reading
from gateway.ingest.service import IngestService
from gateway.log.store import LogStore
from gateway.metrics import GatewayMetrics
from gateway.mqtt.link import MqttLink, poll_links

if TYPE_CHECKING:
    from gateway.rule_service import RuleService
from gateway.sinks import uplink

log = logging.getLogger(__name__)


def pid_path(cfg: GatewayConfig) -> Path:
    """Where a running gateway keeps its pid (beside its log; `gateway rules reload`)."""
    return cfg.log.path.with_name(cfg.log.path.name + ".pid")


class Sink(Protocol):
    """What the loop needs from a sink."""

    link: MqttLink

    def next_wake(self, now: float) -> float: ...
    def step(self, now: float) -> None: ...
    def finish(self) -> None: ...


SinkFactory = Callable[[GatewayConfig, LogStore, GatewayMetrics], Sink]

# The sinks this gateway knows, by name: (is it configured?, how to build it).
SINKS: dict[str, tuple[Callable[[GatewayConfig], bool], SinkFactory]] = {
    uplink.NAME: (lambda cfg: cfg.cloud is not None, uplink.UplinkSink),
}


class Gateway:
    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.metrics = GatewayMetrics()
        enabled = [name for name, (configured, _) in SINKS.items() if configured(cfg)]
        self.store = LogStore(cfg.log, cfg.gateway_id, enabled)
        self.metrics.watch_log(self.store.counter_snapshot)
        self.sinks: list[Sink] = [SINKS[name][1](cfg, self.store, self.metrics)
                                  for name in enabled]
        self.commands: CommandSender | None = None
        self.rules: RuleService | None = None
        self.ingest = IngestService(cfg, self.store, self.metrics,
                                    on_ack=self._command_answer,
                                    on_readings=self._to_rules if cfg.rules else None)
        # Commands go out on the site session; the rule engine decides on them.
        self.commands = CommandSender(cfg.gateway_id, cfg.commands.key(), self.ingest.link,
                                      self.store, ack_timeout=cfg.commands.ack_timeout,
                                      max_pending=cfg.commands.max_pending)
        if cfg.rules:
            # Imported only when rules are configured: numpy costs ~15 MB of RSS.
            from gateway.rule_service import RuleService  # noqa: PLC0415

            self.rules = RuleService(cfg, self.store, self.commands, self.metrics)
        self._reload = False
        self._watch_gauges()
        self._stopping = threading.Event()

    def _to_rules(self, readings: list[Reading]) -> None:
        if self.rules is not None:
            self.rules.on_readings(readings)

    def request_reload(self, _signum: int | None = None, _frame: FrameType | None = None) -> None:
        self._reload = True

    def _command_answer(self, topic: str, payload: bytes, now: float) -> Event | None:
        assert self.commands is not None
        self.commands.acknowledgement(topic, payload, now)  # logs its own event
        return None

    def _watch_gauges(self) -> None:
        """Gauges computed when /metrics is scraped, so they are never stale."""
        store, metrics = self.store, self.metrics
        metrics.log_bytes.set_function(lambda: store.bytes)
        metrics.log_full.set_function(lambda: int(store.full))
        metrics.pending.set_function(lambda: self.ingest.pending)

        def depth(sink: str) -> Callable[[], int]:
            return lambda: max(0, store.next_seq - store.cursors().get(sink, store.next_seq))

        for name in store.cursors():
            metrics.depth.labels(name).set_function(depth(name))

    def request_stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        if not self._stopping.is_set():
            log.info("Stopping (%s)", signal.Signals(signum).name if signum else "requested")
        self._stopping.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (or request_stop), stop cleanly; returns an exit code."""
        if self.cfg.metrics.listen:
            try:
                self.metrics.serve(self.cfg.metrics.listen)
            except FieldgateError:
                self.store.close()
                raise
        log.info("Gateway %r running: site %r, %d sink(s)", self.cfg.gateway_id,
                 self.ingest.link.where, len(self.sinks))
        pid_file = pid_path(self.cfg)
        pid_file.write_text(f"{os.getpid()}\n")
        code = 0
        try:
            self._loop()
        except FieldgateError as err:
            log.error("Stopping: %s", err)  # noqa: TRY400 - a known error, one line
            code = 1
        finally:
            # Ingest first: its last commit is what the sinks then forward.
            try:
                self.ingest.finish()
                if self.rules is not None:
                    self.rules.save()
            except FieldgateError as err:
                log.error("Stopping: %s", err)  # noqa: TRY400 - a known error, one line
                code = 1
            finally:
                for sink in self.sinks:
                    sink.finish()
                self.store.close()
                pid_file.unlink(missing_ok=True)
        log.info("Gateway stopped")
        return code

    def _loop(self) -> None:
        ingest, sinks = self.ingest, self.sinks
        links = [ingest.link, *(s.link for s in sinks)]
        interval = self.cfg.ingest.commit_interval
        stopping = self._stopping
        rules = self.rules
        commands = self.commands
        assert commands is not None
        while not stopping.is_set():
            now = time.monotonic()
            timeout = min(ingest.next_wake(now), *(s.next_wake(now) for s in sinks),
                          rules.next_wake(now) if rules is not None else 1.0)
            got = poll_links(links, timeout)
            woke = time.monotonic()
            ingest.step(woke)
            if rules is not None:
                if self._reload:
                    self._reload = False
                    rules.reload()
                rules.step(woke)
            commands.expire(woke)
            for sink in sinks:
                sink.step(woke)
            if got and not any(link.busy for link in links):
                # Coalesce: let the next messages gather instead of waking for each one.
                rest = interval - (time.monotonic() - woke)
                if rest > 0:
                    stopping.wait(rest)
