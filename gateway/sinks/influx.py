"""The influx sink: readings and events from the log to InfluxDB, batched, in order.

It reads the durable log with its own cursor, exactly like the uplink, so InfluxDB and the
cloud broker are independent: either can be down for hours while the other keeps flowing,
and each drains on its return. The cursor advances over a batch only once every point in
it was accepted (2xx) or dead-lettered; a crash or a lost response sends the batch again,
and since every point is a pure function of its record (gateway/influx/points.py) the
resend writes the same points: idempotent.

Driven from the gateway's one loop. The only thread is for the blocking HTTP request
itself, one request in flight at a time; its result is handed back through a pipe that the
loop's select watches (``wake_fd``), so a slow or unreachable server never stalls ingest.

What a response means (Telegraf's rules, with dead letters instead of silent drops):

==============================  =========================================================
2xx                             written; next batch
400, 422 (and other 4xx)        split the batch to isolate the bad points; a point refused
                                on its own is dead-lettered (reason ``sink_rejected``, the
                                server's message) and the sink goes on
413                             split, and smaller batches from now on
401, 403                        one log line, back off, keep the data
404                             no such database/bucket: one log line naming it, back off
429, 503                        wait as Retry-After says (else back off)
5xx, no response (refused,      back off with jitter
reset, timeout)
==============================  =========================================================

Every outcome is counted on /metrics (``fieldgate_influx_requests{outcome}``); an episode
of failures is logged once when it starts and once when writes resume.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from fieldkit.units import Precision
from gateway.backoff import Backoff
from gateway.config import GatewayConfig, Influx
from gateway.influx.http import Writer, WriteResult, make_writer
from gateway.influx.points import ReadingEncoder, event_line, health_line
from gateway.influx.thread import WriteThread
from gateway.log.reader import LogReader
from gateway.log.schema import KIND_EVENT
from gateway.log.store import LogStore
from gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)

NAME = "influx"
# Dead letters of points the server refused for good: reason, and topic (which names the
# sink; the payload is the log record, with its seq).
DLQ_REASON = "sink_rejected"
DLQ_TOPIC = f"fieldgate/sink/{NAME}"
# On shutdown, how long to keep writing what is already durable.
_DRAIN_ON_STOP = 2.0
# Longest sleep when nothing happens; every site message wakes the loop anyway.
_POLL_MAX = 1.0
# A 413 halves the batch byte limit, down to this.
_MIN_BATCH_BYTES = 4096
# Retry-After beyond this is not believed (a misconfigured proxy must not park the sink).
_RETRY_AFTER_MAX = 3600.0


class Outcome(StrEnum):
    """How a write request ended (the ``outcome`` label on /metrics)."""

    OK = "ok"
    REJECTED = "rejected_points"
    TOO_LARGE = "too_large"
    AUTH = "auth"
    NOT_FOUND = "not_found"
    THROTTLED = "throttled"
    SERVER_ERROR = "server_error"
    NETWORK = "network"


_BY_STATUS = {
    0: Outcome.NETWORK, 401: Outcome.AUTH, 403: Outcome.AUTH, 404: Outcome.NOT_FOUND,
    408: Outcome.SERVER_ERROR, 413: Outcome.TOO_LARGE, 429: Outcome.THROTTLED,
    503: Outcome.THROTTLED,
}


def classify(status: int) -> Outcome:
    """The outcome of a response with this HTTP status (0: no response)."""
    if 200 <= status < 300:
        return Outcome.OK
    found = _BY_STATUS.get(status)
    if found is not None:
        return found
    return Outcome.REJECTED if 400 <= status < 500 else Outcome.SERVER_ERROR


@dataclass(slots=True)
class _Chunk:
    """Points written in one request: ``text``, one line each, each ended by a newline;
    ``sources`` are their log records (a reading, or an event's body), for dead letters."""

    text: str
    sources: list[Any]
    kinds: tuple[int, int]  # readings, events among the lines

    def lines(self) -> list[str]:
        return self.text.split("\n")[:-1]

    def halves(self) -> tuple[_Chunk, _Chunk]:
        lines = self.lines()
        mid = len(lines) // 2
        first, second = self.sources[:mid], self.sources[mid:]
        return (_Chunk("".join([line + "\n" for line in lines[:mid]]), first, _kinds(first)),
                _Chunk("".join([line + "\n" for line in lines[mid:]]), second,
                       _kinds(second)))


def _kinds(sources: list[Any]) -> tuple[int, int]:
    events = sum(1 for s in sources if isinstance(s, bytes))
    return len(sources) - events, events


@dataclass(slots=True)
class _Batch:
    end: int                                  # the cursor once every chunk is settled
    chunks: list[_Chunk] = field(default_factory=list)  # next to write first


class InfluxSink:
    """The loop's view: ``next_wake``, ``step``, ``finish``, and ``wake_fd`` to select on."""

    link = None  # no MQTT session of its own

    def __init__(self, cfg: GatewayConfig, store: LogStore, metrics: GatewayMetrics,
                 writer: Writer | None = None) -> None:
        assert cfg.influx is not None
        influx: Influx = cfg.influx
        self._cfg = influx
        self._store = store
        self._metrics = metrics
        self._gateway = cfg.gateway_id
        self._site = influx.site_tag(cfg.gateway_id)
        self._links = ["site", *(["cloud"] if cfg.cloud is not None else [])]
        self._precision: Precision = influx.precision
        self._encoder = ReadingEncoder(measurement_name=influx.measurement,
                                       gateway=cfg.gateway_id, site=self._site,
                                       device_labels=cfg.device_labels,
                                       precision=influx.precision)
        self._writer = writer if writer is not None else make_writer(influx)
        self._worker = WriteThread(self._writer)
        self._reader = LogReader(cfg.log.path)
        self._next = store.cursor(NAME)   # next seq to put in a batch
        self._batch: _Batch | None = None  # being written
        # The next batch, read and encoded while the current one is on the wire: the
        # server parses one batch while we encode the next (1.5x the drain rate here).
        self._ready: _Batch | None = None
        self._sent: _Chunk | None = None  # the chunk in flight; None: health or nothing
        self._waiting_since: float | None = None
        self._retry_at = 0.0
        self._retry = Backoff(influx.backoff_min, influx.backoff_max)
        self._max_bytes = influx.batch_max_bytes
        self._failing: Outcome | None = None
        self._next_health = time.monotonic() + influx.health_interval
        self._last_readings: tuple[float, int] | None = None
        self._requests = {o: metrics.influx_requests.labels(o.value) for o in Outcome}
        self._written = {k: metrics.influx_points.labels(k) for k in ("reading", "event",
                                                                      "health")}
        self._up = metrics.link_up.labels(NAME)

    @property
    def wake_fd(self) -> int:
        return self._worker.fd

    # -- batches from the log ---------------------------------------------------------------

    def _take_batch(self, now: float, *, drain: bool) -> _Batch | None:
        cfg = self._cfg
        store = self._store
        available = store.next_seq - self._next
        if available <= 0:
            self._waiting_since = None
            return None
        if self._waiting_since is None:
            self._waiting_since = now
        if (not drain and available < cfg.batch_max_points
                and now - self._waiting_since < cfg.batch_max_delay):
            return None
        texts: list[str] = []
        sources: list[Any] = []
        events = 0
        seq = self._next
        size = 0
        while len(sources) < cfg.batch_max_points and size < self._max_bytes:
            run = self._reader.read_run(seq, max_readings=cfg.batch_max_points - len(sources),
                                        max_bytes=self._max_bytes - size)
            if run is None:
                break
            if run.kind == KIND_EVENT:
                body = run.bodies[0]
                line = event_line(orjson.loads(body), gateway=self._gateway,
                                  site=self._site, precision=self._precision)
                if line:
                    texts.append(line + "\n")
                    sources.append(body)
                    events += 1
            else:
                body = b",".join(run.bodies)
                text, readings = self._encoder.encode_text(orjson.loads(b"[" + body + b"]"))
                texts.append(text)
                sources += readings
            size += len(body) + 1
            seq = run.end
        # Nothing read at all: what lay ahead was removed (cap or age) before it was sent.
        end = max(seq, store.next_seq) if seq == self._next else seq
        self._next = end
        self._waiting_since = now if store.next_seq > end else None
        batch = _Batch(end)
        if sources:
            batch.chunks.append(_Chunk("".join(texts), sources,
                                       (len(sources) - events, events)))
        return batch

    # -- requests -------------------------------------------------------------------------

    def _send_next(self, now: float, *, drain: bool = False) -> None:
        if self._worker.busy or now < self._retry_at:
            return
        if now >= self._next_health:
            self._send_health(now)
            return
        while self._batch is None:
            self._batch, self._ready = self._ready or self._take_batch(now, drain=drain), None
            if self._batch is None:
                return
            self._settle()
        chunk = self._sent = self._batch.chunks[0]
        self._worker.submit(chunk.text.encode())

    def _settle(self) -> None:
        """Once every point of the batch is written or dead-lettered, move the cursor."""
        if self._batch is not None and not self._batch.chunks:
            self._store.ack(NAME, self._batch.end)
            self._batch = None

    def _send_health(self, now: float) -> None:
        self._next_health = now + self._cfg.health_interval
        if self._failing is not None:
            # Backing off: a retry of the data finds out first; health waits its turn.
            self._metrics.influx_health_dropped.inc()
            return
        self._sent = None
        self._worker.submit(self._health().encode())

    def _health(self) -> str:
        store = self._store
        counters = store.counter_snapshot()
        readings = counters.get("readings", 0)
        wall = time.time()
        rate = 0.0
        if self._last_readings is not None:
            then, before = self._last_readings
            rate = (readings - before) / max(wall - then, 1e-3)
        self._last_readings = (wall, readings)
        fields: dict[str, float] = {
            "readings_total": float(readings),
            "readings_per_s": rate,
            "dead_letters_total": float(sum(v for k, v in counters.items()
                                            if k.startswith("dead_letters."))),
            "dropped_total": float(sum(v for k, v in counters.items()
                                       if k.startswith("dropped."))),
            "log_bytes": float(store.bytes),
        }
        for sink, cursor in store.cursors().items():
            fields[f"depth_{sink}"] = float(max(0, store.next_seq - cursor))
        for name in self._links:
            up = self._metrics.registry.get_sample_value("fieldgate_link_connected",
                                                         {"link": name})
            fields[f"link_{name}"] = float(up or 0)
        return health_line(fields, gateway=self._gateway, site=self._site, time=wall,
                           precision=self._precision)

    # -- results ----------------------------------------------------------------------------

    def _on_result(self, result: WriteResult, now: float) -> None:
        outcome = classify(result.status)
        self._requests[outcome].inc()
        chunk, self._sent = self._sent, None
        if chunk is None:  # health: a snapshot, not worth a retry of its own
            if outcome is Outcome.OK:
                self._written["health"].inc()
                return
            self._metrics.influx_health_dropped.inc()
            if outcome in (Outcome.REJECTED, Outcome.TOO_LARGE):
                return
            self._failed(outcome, result, now)
            return
        assert self._batch is not None
        assert self._batch.chunks[0] is chunk
        if outcome is Outcome.OK:
            self._batch.chunks.pop(0)
            self._settle()
            readings, events = chunk.kinds
            self._written["reading"].inc(readings)
            self._written["event"].inc(events)
            self._retry.reset()
            self._up.set(1)
            if self._failing is not None:
                log.info("InfluxDB writes resumed at %s", self._writer.where)
                self._failing = None
            return
        if outcome in (Outcome.REJECTED, Outcome.TOO_LARGE):
            self._up.set(1)
            if outcome is Outcome.TOO_LARGE:
                self._max_bytes = max(_MIN_BATCH_BYTES, self._max_bytes // 2)
            if len(chunk.sources) > 1:
                self._batch.chunks[0:1] = chunk.halves()
            elif self._dead_letter(chunk, result):
                self._batch.chunks.pop(0)
                self._settle()
            else:
                self._retry_at = now + self._retry.next_delay()
            return
        self._failed(outcome, result, now)

    def _failed(self, outcome: Outcome, result: WriteResult, now: float) -> None:
        """The server cannot take writes now: keep the data, wait, try again."""
        self._up.set(0)
        self._episode(outcome, result)
        delay = self._retry.next_delay()
        if outcome is Outcome.THROTTLED and result.retry_after is not None:
            delay = min(result.retry_after, _RETRY_AFTER_MAX)
        self._retry_at = now + delay

    def _dead_letter(self, chunk: _Chunk, result: WriteResult) -> bool:
        source = chunk.sources[0]
        payload = source if isinstance(source, bytes) else orjson.dumps(source)
        detail = f"{NAME}: HTTP {result.status}: {result.message}"
        if not self._store.add_dead_letters([(DLQ_TOPIC, DLQ_REASON, detail, payload)]):
            return False
        self._metrics.influx_rejected.inc()
        log.warning("InfluxDB refused a point, dead-lettered (%s): %s", result.message,
                    chunk.text[:200].rstrip("\n"))
        return True

    def _episode(self, outcome: Outcome, result: WriteResult) -> None:
        """One log line when a kind of failure starts (not one per retry)."""
        if outcome is self._failing:
            return
        self._failing = outcome
        where = self._writer.where
        server = f" ({result.status}: {result.message})" if result.status else \
            f" ({result.message})"
        if outcome is Outcome.AUTH:
            fix = ("check influx.username and password_file/password_env" if
                   self._cfg.api.value == "v1" else "check influx.token_file/token_env")
            log.error("InfluxDB at %s refused our credentials%s; %s. Readings stay in the "
                      "log and are written once it accepts them", where, server, fix)
        elif outcome is Outcome.NOT_FOUND:
            what = (f"database {self._cfg.database!r} (CREATE DATABASE \"{self._cfg.database}\")"
                    if self._cfg.api.value == "v1" else
                    f"bucket {self._cfg.bucket!r} in org {self._cfg.org!r}")
            log.error("InfluxDB at %s has no %s%s; create it or fix influx.%s. Readings stay "
                      "in the log", self._cfg.url, what, server,
                      "database" if self._cfg.api.value == "v1" else "bucket")
        else:
            log.warning("InfluxDB at %s not writable%s; retrying with backoff, readings stay "
                        "in the log", where, server)

    # -- the loop -------------------------------------------------------------------------

    def next_wake(self, now: float) -> float:
        wake = max(0.0, self._next_health - now)
        if self._worker.busy:
            return min(wake, _POLL_MAX)  # the result wakes us through wake_fd
        if self._retry_at > now:
            return min(wake, self._retry_at - now, _POLL_MAX)
        if (self._batch is not None and self._batch.chunks) or self._ready is not None:
            return 0.0
        if self._store.next_seq > self._next:
            if self._store.next_seq - self._next >= self._cfg.batch_max_points:
                return 0.0
            since = self._waiting_since if self._waiting_since is not None else now
            wake = min(wake, max(0.0, since + self._cfg.batch_max_delay - now))
        return min(wake, _POLL_MAX)

    def step(self, now: float) -> None:
        result = self._worker.result()
        if result is not None:
            self._on_result(result, now)
        self._send_next(now)
        if self._worker.busy and self._ready is None and self._failing is None:
            self._ready = self._take_batch(now, drain=False)

    def finish(self) -> None:
        """Write what is already durable (briefly), then stop the worker."""
        import select  # noqa: PLC0415 - only on shutdown

        deadline = time.monotonic() + _DRAIN_ON_STOP
        while time.monotonic() < deadline:
            now = time.monotonic()
            result = self._worker.result()
            if result is not None:
                self._on_result(result, now)
            self._next_health = now + self._cfg.health_interval  # no health on the way out
            if self._failing is None:
                self._send_next(now, drain=True)
            if not self._worker.busy:
                if (self._batch is None and self._ready is None
                        and self._store.next_seq <= self._next):
                    break
                if self._failing is not None:
                    break
            select.select([self._worker.fd], [], [], min(0.05, max(0.0, deadline - now)))
        self._worker.close(timeout=1.0)
        self._reader.close()
