"""Wiring: builds the log, the ingest side and the sinks from the config and runs them.

This is the only module (with the CLI) that knows the concrete sink classes. Data moves
between the parts through the durable log (ingest appends; the rule engine's events and
the command sender's records are appended too; each sink reads with its own cursor). Three
hand-offs are direct calls wired here, because they are decisions rather than data: ingest
hands each durable batch of readings to the rule engine, the site messages that answer
commands to the command sender (``ingest.service.Answers``), and the rule engine's commands
to the sender, which publishes on the site link. One loop drives all of them, so a reading
costs no thread hand-offs and one wake-up serves every socket that has something: read the
site broker, commit, acknowledge, evaluate due rules, publish due batches, read PUBACKs.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Protocol

from gateway.commands import ACK_FILTER, CommandSender, is_ack_topic
from gateway.config import GatewayConfig
from gateway.errors import FieldgateError
from gateway.events import Event, render
from gateway.ingest.service import Answers, IngestService
from gateway.log.store import LogStore
from gateway.metrics import GatewayMetrics
from gateway.mqtt.link import MqttLink, poll_links
from gateway.records import Reading

if TYPE_CHECKING:
    from gateway.downlink.service import Downlink
    from gateway.rule_service import RuleService
from gateway.sinks import influx, uplink

log = logging.getLogger(__name__)


def pid_path(cfg: GatewayConfig) -> Path:
    """Where a running gateway keeps its pid (beside its log; `gateway rules reload`)."""
    return cfg.log.path.with_name(cfg.log.path.name + ".pid")


class PidLock:
    """The pid file beside the log, locked for the life of the process (flock): a second
    gateway on the same log is refused at start, and a stale file left by a crash is
    taken over (the kernel dropped its lock with the process)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise FieldgateError(
                f"Log {str(path.with_suffix(''))!r} is in use by gateway pid {other}; stop it "
                "first, or give this one another log.path") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


class Sink(Protocol):
    """What the loop needs from a sink. An MQTT sink hands the loop its session (``link``);
    a sink that waits on something else has ``link = None`` and may expose ``wake_fd``, a
    file descriptor that becomes readable when it has work (see ``_wake_fds``)."""

    @property
    def link(self) -> MqttLink | None: ...

    def next_wake(self, now: float) -> float: ...
    def step(self, now: float) -> None: ...
    def finish(self) -> None: ...


SinkFactory = Callable[[GatewayConfig, LogStore, GatewayMetrics], Sink]

# The sinks this gateway knows, by name: (is it configured?, how to build it).
SINKS: dict[str, tuple[Callable[[GatewayConfig], bool], SinkFactory]] = {
    uplink.NAME: (lambda cfg: cfg.cloud is not None, uplink.UplinkSink),
    influx.NAME: (lambda cfg: cfg.influx is not None, influx.InfluxSink),
}


def _wake_fds(sinks: list[Sink]) -> list[int]:
    """File descriptors the loop's select watches besides the MQTT sockets."""
    fds = (getattr(sink, "wake_fd", None) for sink in sinks)
    return [fd for fd in fds if isinstance(fd, int)]


class Gateway:
    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.metrics = GatewayMetrics()
        enabled = [name for name, (configured, _) in SINKS.items() if configured(cfg)]
        self._pid = PidLock(pid_path(cfg))
        try:
            self.store = LogStore(cfg.log, cfg.gateway_id, enabled, event_body=render)
        except FieldgateError:
            self._pid.release()
            raise
        self.metrics.watch_log(self.store.counter_snapshot)
        self.sinks: list[Sink] = [SINKS[name][1](cfg, self.store, self.metrics)
                                  for name in enabled]
        self.commands: CommandSender | None = None
        self.rules: RuleService | None = None
        self.downlink: Downlink | None = None
        # The link the coalescing sleep listens on for requests (cloud control), if any.
        self._listen: MqttLink | None = None
        self.ingest = IngestService(cfg, self.store, self.metrics,
                                    answers=Answers(ACK_FILTER, is_ack_topic,
                                                    self._command_answer,
                                                    self._command_published),
                                    on_readings=(self._durable_readings
                                                 if cfg.rules or cfg.downlink.enabled
                                                 else None))
        # Commands go out on the site session; the rule engine decides on them.
        self.commands = CommandSender(cfg.gateway_id, cfg.commands.key(), self.ingest.link,
                                      self.store, ack_timeout=cfg.commands.ack_timeout,
                                      max_pending=cfg.commands.max_pending,
                                      max_device_id=cfg.ingest.max_device_id)
        if cfg.rules or cfg.downlink.rules:
            # Imported only when rules are configured: numpy costs ~15 MB of RSS.
            from gateway.rule_service import RuleService  # noqa: PLC0415

            self.rules = RuleService(cfg, self.store, self.commands, self.metrics)
        if cfg.downlink.enabled:
            # Imported only when the downlink is on: `cryptography` costs ~8 MB of RSS.
            from gateway.downlink.rules import RuleDeployer  # noqa: PLC0415
            from gateway.downlink.service import Downlink  # noqa: PLC0415

            # Commands and rule bundles from the cloud come on the uplink's cloud link.
            up = next(s for s in self.sinks if isinstance(s, uplink.UplinkSink))
            deployer = None
            if cfg.downlink.rules:
                assert self.rules is not None
                deployer = RuleDeployer(self.rules)
            self.downlink = Downlink(cfg, self.store, up.link, self.commands, self.metrics,
                                     rules=deployer, status_changed=up.publish_status)
            up.request_filters = self.downlink.filters
            up.on_request = self.downlink.on_message
            self._listen = up.link
        rules = self.rules
        if rules is not None:
            # The running rules version goes with the retained status.
            for sink in self.sinks:
                if isinstance(sink, uplink.UplinkSink):
                    sink.status_fields = lambda: {"rules_version": rules.version}
        self._reload = False
        self._watch_gauges()
        self._stopping = threading.Event()

    def _durable_readings(self, readings: list[Reading]) -> None:
        if self.downlink is not None:
            self.downlink.saw_readings(readings)
        if self.rules is not None:
            self.rules.on_readings(readings)

    def request_reload(self, _signum: int | None = None, _frame: FrameType | None = None) -> None:
        self._reload = True

    def _command_answer(self, topic: str, payload: bytes, now: float,
                        dup: bool) -> Event | None:
        assert self.commands is not None
        self.commands.acknowledgement(topic, payload, now, dup=dup)  # logs its own event
        if self.downlink is not None:
            self.downlink.devices.add(topic.split("/")[1])  # a device that answers exists
        return None

    def _command_published(self, packet_id: int, reason: int) -> None:
        if self.commands is not None:
            self.commands.published(packet_id, reason)

    def _watch_gauges(self) -> None:
        """Gauges computed when /metrics is scraped, so they are never stale."""
        # Read from the log's snapshot: the scrape runs in another thread, and the snapshot
        # is replaced whole after each commit, never changed in place.
        store, metrics = self.store, self.metrics
        metrics.log_bytes.set_function(lambda: store.snapshot.bytes)
        metrics.log_full.set_function(lambda: int(store.snapshot.full))
        metrics.pending.set_function(lambda: self.ingest.pending)

        def depth(sink: str) -> Callable[[], int]:
            return lambda: store.snapshot.depth(sink)

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
                self._pid.release()
                raise
        log.info("Gateway %r running: site %r, %d sink(s)", self.cfg.gateway_id,
                 self.ingest.link.where, len(self.sinks))
        code = 0
        # What was built so far lives as long as the process (config, modules, the rules):
        # the collector's full collections need not walk it again, the loop's garbage is
        # short-lived. (A rules reload thaws it for one collection: RuleService.install.)
        gc.freeze()
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
                if self.downlink is not None:
                    self.downlink.finish()
            except FieldgateError as err:
                log.error("Stopping: %s", err)  # noqa: TRY400 - a known error, one line
                code = 1
            finally:
                for sink in self.sinks:
                    sink.finish()
                self.store.close()
                self._pid.release()
        log.info("Gateway stopped")
        return code

    def _loop(self) -> None:
        ingest, sinks = self.ingest, self.sinks
        links = [ingest.link, *(s.link for s in sinks if s.link is not None)]
        wake = _wake_fds(sinks)
        interval = self.cfg.ingest.commit_interval
        stopping = self._stopping
        rules = self.rules
        commands = self.commands
        downlink = self.downlink
        assert commands is not None
        slept = False
        while not stopping.is_set():
            # After a coalescing sleep input is almost always waiting: look at once, and work
            # out how long to wait only when nothing came.
            got = slept and poll_links(links, 0.0, wake)
            if not got:
                now = time.monotonic()
                timeout = min(ingest.next_wake(now), *(s.next_wake(now) for s in sinks),
                              rules.next_wake(now) if rules is not None else 1.0)
                got = poll_links(links, timeout, wake)
            slept = False
            woke = time.monotonic()
            ingest.step(woke)
            if rules is not None:
                if self._reload:
                    self._reload = False
                    rules.reload()
                rules.step(woke)
            commands.step(woke)
            if downlink is not None:
                downlink.step(woke)
            # Sinks step last: events the rules, commands or ingest logged in this turn go
            # out in this turn (the uplink sends an event without waiting for a batch).
            for sink in sinks:
                sink.step(woke)
            if got and not any(link.busy for link in links) and not commands.expecting(woke):
                # Coalesce: let the next messages gather instead of waking for each one,
                # but not past a rule tick (its alerts go out in the same turn: the uplink
                # sends an event as soon as it is in the log).
                rest = interval - (time.monotonic() - woke)
                if rules is not None:
                    rest = min(rest, rules.next_wake(time.monotonic()))
                if rest > 0:
                    # What this turn queued leaves before the sleep: a command to a device,
                    # a reply to the cloud (someone waits for them; the sinks flush their own).
                    for link in links:
                        link.flush()
                    self._sleep(rest)
                    slept = True

    def _sleep(self, seconds: float) -> None:
        """The loop's coalescing sleep; a stop waits for the end of it.

        With cloud control on it listens on the cloud link: a request ends it at once (a
        cloud command waits for no telemetry), while the uplink's PUBACKs that come in the
        meantime are read and the sleep goes on (one short wake-up a batch)."""
        downlink, link = self.downlink, self._listen
        if downlink is None or link is None:
            # A plain sleep: an Event's wait costs ~50 us more CPU per wake-up here (10 a
            # second at 1k readings/s).
            time.sleep(seconds)
            return
        until = time.monotonic() + seconds
        seen = downlink.requests
        while (left := until - time.monotonic()) > 0 and downlink.requests == seen:
            poll_links([link], left)
