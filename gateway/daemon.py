"""Wiring: builds the log, the ingest loop and the sinks from the config and runs them.

This is the only module (with the CLI) that knows the concrete sink classes. Each part runs
in its own thread and talks to the others only through the durable log.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Protocol

from gateway.config import GatewayConfig
from gateway.errors import FieldgateError
from gateway.ingest.service import IngestService
from gateway.log.store import LogStore
from gateway.metrics import GatewayMetrics
from gateway.sinks import uplink

log = logging.getLogger(__name__)


class Sink(Protocol):
    def run(self) -> None: ...
    def stop(self) -> None: ...


SinkFactory = Callable[[GatewayConfig, LogStore, GatewayMetrics], Sink]


def _uplink(cfg: GatewayConfig, store: LogStore, metrics: GatewayMetrics) -> Sink | None:
    return uplink.UplinkSink(cfg, store, metrics) if cfg.cloud is not None else None


# The sinks this gateway knows, by name; each returns None when its section is not configured.
SINKS: dict[str, Callable[[GatewayConfig, LogStore, GatewayMetrics], Sink | None]] = {
    uplink.NAME: _uplink,
}


class Gateway:
    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.metrics = GatewayMetrics()
        self.store = LogStore(cfg.log, cfg.gateway_id)
        self.metrics.watch_log(self.store.counter_snapshot)
        self.sinks: list[Sink] = [
            sink for make in SINKS.values() if (sink := make(cfg, self.store, self.metrics))
        ]
        self.ingest = IngestService(cfg, self.store, self.metrics)
        self._watch_gauges()
        self._stopping = threading.Event()
        self.failure: str | None = None

    def _guard(self, target: Callable[[], None], what: str) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except FieldgateError as err:
                self.failure = str(err)
                log.error("%s stopped: %s", what, err)  # noqa: TRY400 - a known error, one line
            except Exception:
                self.failure = f"{what} crashed"
                log.exception("%s crashed", what)
            finally:
                self._stopping.set()
        return run

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

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (or request_stop), stop cleanly; returns an exit code."""
        if self.cfg.metrics.listen:
            try:
                self.metrics.serve(self.cfg.metrics.listen)
            except FieldgateError:
                self.store.close()
                raise
        threads = [
            threading.Thread(target=self._guard(s.run, type(s).__name__), name=type(s).__name__,
                             daemon=True)
            for s in self.sinks
        ]
        ingest = threading.Thread(target=self._guard(self.ingest.run, "Ingest"), name="ingest",
                                  daemon=True)
        for thread in [*threads, ingest]:
            thread.start()
        log.info("Gateway %r running: site %r, %d sink(s)", self.cfg.gateway_id,
                 self.ingest.link.where, len(self.sinks))
        self._stopping.wait()
        # Ingest first: its last commit is what the sinks then flush.
        self.ingest.stop()
        ingest.join(timeout=5)
        for sink in self.sinks:
            sink.stop()
        for thread in threads:
            thread.join(timeout=5)
        self.store.close()
        log.info("Gateway stopped")
        return 0 if self.failure is None else 1

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
