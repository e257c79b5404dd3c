"""`gateway cloud ingest`: the uplink of a fleet of gateways, from the cloud broker's shared
subscription into InfluxDB, acknowledged only once written.

The loop, one thread (plus the HTTP write's):

1. MQTT v5, persistent session (clean start off), manual acknowledgement, our Receive
   Maximum: the broker sends at most that many unacknowledged messages, so memory is bounded
   however long InfluxDB is away; everything past it waits at the broker.
2. Each message is decoded (gateway/cloud/decode.py) and encoded into line protocol by the
   edge influx sink's encoder (gateway/influx/points.py: same schema, same points), or
   dead-lettered with a reason and acknowledged at once.
3. Whenever no write is in flight, everything pending goes in one request (adaptive
   batching: batches grow with the server's latency, up to influx.batch_max_points).
4. 2xx: the written seq ranges are recorded (gateway/cloud/state.py), then every message of
   the batch is acknowledged. 4xx: the batch is split down to the message the server
   refuses, which is dead-lettered. Anything else: the batch is retried with backoff and
   nothing is acknowledged meanwhile.
5. Every second, holes in a gateway's seqs that waited ``gap_wait`` become resend requests.

A crash anywhere loses nothing: unacknowledged messages come again (to this worker when it
returns with its client id, Mosquitto holding them meanwhile), and their points are the same
points (idempotent writes).
"""

from __future__ import annotations

import fnmatch
import logging
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from types import FrameType
from typing import Any

import orjson

from fieldmqtt import Message
from gateway.backoff import Backoff
from gateway.cloud.config import CloudConfig
from gateway.cloud.decode import BadMessage, Kind, Reason, Uplink, decode
from gateway.cloud.metrics import WorkerMetrics
from gateway.cloud.state import GapNews, GapReport, IngestState, Request
from gateway.influx.http import Writer, WriteResult, make_writer
from gateway.influx.points import ReadingEncoder, event_line, health_line
from gateway.influx.thread import WriteThread
from gateway.mqtt.link import MqttLink, poll_links

log = logging.getLogger(__name__)

READY = "Ready: subscribed"
GAP_EVENT = "io.fieldgate.gateway.gap"
# How often holes and unanswered requests are looked at.
_GAP_CHECK = 1.0
# Gateways whose encoder (tag-set cache) is kept; past this the cache starts over.
_ENCODERS_MAX = 10_000
# On SIGTERM: how long to keep writing what was received before disconnecting (what is
# not written by then stays unacknowledged and comes again).
_DRAIN_ON_STOP = 10.0


class Outcome(StrEnum):
    OK = "ok"
    REJECTED = "rejected"
    TOO_LARGE = "too_large"
    RETRY = "retry"


def classify(status: int) -> Outcome:
    """What to do after a write answered ``status`` (0: no answer); Telegraf's rules."""
    if 200 <= status < 300:
        return Outcome.OK
    if status == 413:
        return Outcome.TOO_LARGE
    if 400 <= status < 500 and status not in (401, 403, 404, 408, 429):
        return Outcome.REJECTED
    return Outcome.RETRY


@dataclass(slots=True)
class _Item:
    """A received message (or a point of our own, ``message`` None) waiting for its write."""

    message: Message | None
    text: str                       # its lines, each ended by a newline ("" for none)
    points: int
    kind: str                       # points' kind on /metrics
    gateway: str = ""
    first: int = 0                  # seq range it covers (0: none)
    last: int = 0


@dataclass(slots=True)
class _Batch:
    items: list[_Item]
    body: bytes = field(default=b"")


class IngestWorker:
    def __init__(self, cfg: CloudConfig, *, client_id: str | None = None,
                 writer: Writer | None = None) -> None:
        self.cfg = cfg
        self.client_id = client_id or cfg.client_id()
        self.metrics = WorkerMetrics()
        self.state = IngestState(cfg.state_path, dlq_max_rows=cfg.dlq_max_rows)
        self.metrics.watch_dead_letters(self.state.dead_letter_counts)
        self._precision = cfg.influx.precision
        self._writes = WriteThread(writer if writer is not None else make_writer(cfg.influx),
                                   "ingest-write")
        self._encoders: dict[str, ReadingEncoder] = {}
        self._pending: list[_Item] = []
        self._split: deque[list[_Item]] = deque()   # halves of a refused batch, next first
        self._sent: _Batch | None = None
        self._retry_at = 0.0
        self._retry = Backoff(cfg.influx.backoff_min, cfg.influx.backoff_max)
        self._failing = False
        self._next_gap_check = 0.0
        self._stop = False
        self._closing = False   # stopping, and done writing: read again for the goodbye
        self._allow = cfg.gateways
        group = cfg.group
        self.filters = [f"$share/{group}/fieldgate/+/telemetry",
                        f"$share/{group}/fieldgate/+/events/#",
                        f"$share/{group}/fieldgate/+/resend/reply",
                        "fieldgate/+/status"]
        self.link = MqttLink(
            name="cloud-ingest", link=cfg.broker, client_id=self.client_id,
            clean_start=False, backoff=Backoff(1.0, 30.0),
            session_expiry=cfg.session_expiry, manual_ack=True,
            receive_maximum=cfg.receive_maximum, max_inflight=100,
            on_connected=self._subscribe, on_subscribed=self._on_subscribed,
            on_message=self._on_message, read_paused=lambda: self._stop and not self._closing,
            on_state=lambda up: self.metrics.link_up.labels("cloud").set(int(up)))

    # -- MQTT -------------------------------------------------------------------------------

    def _subscribe(self) -> None:
        # What came on an earlier connection cannot be acknowledged on this one: the
        # broker sends it again (DUP), so the old copies are dropped, not written twice.
        current = self.link.session.connection
        def fresh(items: list[_Item]) -> list[_Item]:
            return [i for i in items if i.message is None or i.message.connection == current]
        self._pending = fresh(self._pending)
        self._split = deque(kept for batch in self._split if (kept := fresh(batch)))
        self.link.subscribe([(f, None) for f in self.filters], qos=1)

    def _on_subscribed(self) -> None:
        log.info("%s to %s as %r (group %r)", READY, self.link.where, self.client_id,
                 self.cfg.group)

    def _on_message(self, msg: Message) -> None:
        if msg.duplicate:
            self.metrics.redeliveries.inc()
        try:
            up = decode(msg.topic, msg.payload, msg.user_properties)
            self.metrics.messages.labels(up.kind.value).inc()
            self._check_allowed(up.gateway)
            if up.kind is Kind.REPLY:
                self._on_reply(up)
                self._ack(msg)
                return
            self._pending.append(self._item(msg, up))
        except BadMessage as err:
            self._dead_letter(msg, err.reason, err.detail)

    def _check_allowed(self, gateway: str) -> None:
        if self._allow is not None and not any(
                fnmatch.fnmatchcase(gateway, p) for p in self._allow):
            raise BadMessage(Reason.UNKNOWN, f"gateway {gateway!r} is not in gateways")

    def _ack(self, msg: Message) -> None:
        if msg.qos > 0:
            self.link.ack(msg)
            self.metrics.acked.inc()

    def _dead_letter(self, msg: Message, reason: Reason, detail: str) -> None:
        self.state.dead_letter(msg.topic, reason.value, detail, msg.payload, time.time())
        self._ack(msg)

    # -- points -----------------------------------------------------------------------------

    def _encoder(self, gateway: str) -> ReadingEncoder:
        encoder = self._encoders.get(gateway)
        if encoder is None:
            if len(self._encoders) >= _ENCODERS_MAX:
                self._encoders.clear()
            # The uplink carries no site or device labels (yet): site is the gateway's id,
            # as at the edge when influx.site is not set.
            encoder = self._encoders[gateway] = ReadingEncoder(
                measurement_name=self.cfg.influx.measurement, gateway=gateway, site=gateway,
                device_labels={}, precision=self._precision)
        return encoder

    def _item(self, msg: Message, up: Uplink) -> _Item:
        if up.kind is Kind.TELEMETRY:
            text, kept = self._encoder(up.gateway).encode_text(up.readings)
            return _Item(msg, text, len(kept), "reading", up.gateway, up.first, up.last)
        if up.kind is Kind.EVENT:
            line = event_line(up.body, gateway=up.gateway, site=up.gateway,
                              precision=self._precision)
            return _Item(msg, line + "\n" if line else "", 1 if line else 0, "event",
                         up.gateway, up.first, up.last)
        return _Item(msg, self._status_line(up.gateway, up.body, msg.received), 1, "status")

    def _status_line(self, gateway: str, body: dict[str, Any], received: float) -> str:
        """A gateway's retained status as a point in ``fieldgate`` (field ``online``, with
        its counters beside it), at the time it reached us: the last will is rendered when
        the gateway connects, so its own ``ts`` is older than the birth message's."""
        fields = {"online": 1.0 if body.get("state") == "online" else 0.0}
        for name, as_field in (("readings", "readings_total"),
                               ("dead_letters", "dead_letters_total"),
                               ("undelivered", "depth_uplink")):
            value = body.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                fields[as_field] = float(value)
        return health_line(fields, gateway=gateway, site=gateway, time=received,
                           precision=self._precision) + "\n"

    def _gap_items(self, reports: list[GapReport]) -> None:
        """Gap news as metrics, and (detected, lost) as ``io.fieldgate.gateway.gap`` events."""
        now = time.time()
        for r in reports:
            self.metrics.gap_seqs.labels(r.news.value).inc(r.count)
            if r.news is GapNews.REPAIRED:
                log.info("Gap of gateway %r repaired: seqs %d..%d", r.gateway, r.first, r.last)
                continue
            if r.news is GapNews.DETECTED:
                self.metrics.gaps.inc()
                message = (f"gap of {r.count} seqs ({r.first}..{r.last}) from gateway "
                           f"{r.gateway}; resend requested")
                severity = "warning"
            else:
                message = (f"{r.count} seqs ({r.first}..{r.last}) from gateway {r.gateway} "
                           "lost: the gateway says it no longer has them, or did not answer")
                severity = "critical"
            log.warning("%s", message[0].upper() + message[1:])
            event = {"type": GAP_EVENT, "id": f"{r.gateway}-gap-{r.first}-{r.last}-{r.news}",
                     "time": datetime.fromtimestamp(now, UTC).isoformat(),
                     "subject": "", "data": {"rule": f"gap_{r.news}", "severity": severity,
                                             "value": r.count, "message": message,
                                             "from": r.first, "to": r.last}}
            line = event_line(event, gateway=r.gateway, site=r.gateway,
                              precision=self._precision)
            self._pending.append(_Item(None, line + "\n", 1, "gap"))

    # -- gap repair -------------------------------------------------------------------------

    def _on_reply(self, up: Uplink) -> None:
        body = up.body
        request_id = body.get("request_id")
        if not isinstance(request_id, str):
            raise BadMessage(Reason.SHAPE, "a resend reply without request_id")
        error = body.get("error")
        missing: list[tuple[int, int]] = []
        for pair in body.get("missing") or []:
            if isinstance(pair, list) and len(pair) == 2 and all(type(v) is int for v in pair):
                missing.append((pair[0], pair[1]))
        self._gap_items(self.state.answer(up.gateway, request_id, missing=missing,
                                          error=str(error) if error is not None else None,
                                          now=time.time()))

    def _check_gaps(self, now: float) -> None:
        cfg = self.cfg
        requests, reports = self.state.due(time.time(), gap_wait=cfg.gap_wait,
                                           resend_timeout=cfg.resend_timeout,
                                           attempts=cfg.resend_attempts)
        self._gap_items(reports)
        for request in requests:
            self._ask(request)
        for gateway, (hwm, _) in self.state.marks().items():
            self.metrics.high_water.labels(gateway).set(hwm)
        self._next_gap_check = now + _GAP_CHECK

    def _ask(self, r: Request) -> None:
        topic = f"fieldgate/{r.gateway}/resend"
        self.link.session.publish(
            topic, orjson.dumps({"request_id": r.request_id, "from": r.first, "to": r.last}),
            qos=1, content_type="application/json",
            response_topic=f"fieldgate/{r.gateway}/resend/reply",
            correlation_data=r.request_id.encode())
        self.metrics.resend_requests.inc()

    # -- writes -----------------------------------------------------------------------------

    def _next_batch(self) -> list[_Item]:
        if self._split:
            return self._split.popleft()
        limit = self.cfg.influx.batch_max_points
        taken = 0
        points = 0
        for item in self._pending:
            if taken and points + item.points > limit:
                break
            taken += 1
            points += item.points
        items, self._pending = self._pending[:taken], self._pending[taken:]
        return items

    def _send(self, now: float) -> None:
        while not self._writes.busy and now >= self._retry_at and self.link.connected:
            items = self._next_batch()
            if not items:
                return
            body = "".join([item.text for item in items]).encode()
            if not body:  # nothing to write (e.g. readings without a finite metric)
                self._written(items)
                continue
            self._sent = _Batch(items, body)
            self._writes.submit(body)

    def _on_result(self, result: WriteResult, now: float) -> None:
        batch, self._sent = self._sent, None
        assert batch is not None
        outcome = classify(result.status)
        self.metrics.requests.labels(outcome.value).inc()
        if outcome is Outcome.OK:
            if self._failing:
                log.info("Writing to %s again", self._writes.writer.where)
                self._failing = False
            self._retry.reset()
            self._written(batch.items)
            return
        if outcome in (Outcome.REJECTED, Outcome.TOO_LARGE):
            items = batch.items
            if len(items) > 1:
                mid = len(items) // 2
                self._split.extendleft([items[mid:], items[:mid]])
                return
            item = items[0]
            if item.message is not None:
                self.state.dead_letter(item.message.topic, Reason.REJECTED.value,
                                       f"HTTP {result.status}: {result.message}",
                                       item.message.payload, time.time())
            self._written(items, accepted=False)
            return
        if not self._failing:
            log.warning("Cannot write to %s (%s); keeping %d messages unacknowledged and "
                        "retrying with backoff", self._writes.writer.where,
                        f"HTTP {result.status}: {result.message}" if result.status
                        else result.message, len(batch.items))
            self._failing = True
        self._split.appendleft(batch.items)
        self._retry_at = now + (result.retry_after if result.retry_after is not None
                                else self._retry.next_delay())

    def _written(self, items: list[_Item], *, accepted: bool = True) -> None:
        """Points accepted (or, ``accepted`` False, the message dead-lettered): seqs
        recorded (a dead letter's are accounted for, not a gap to repair), then the messages
        acked. Only accepted points count on /metrics."""
        ranges: dict[str, list[tuple[int, int]]] = {}
        for item in items:
            if item.first:
                ranges.setdefault(item.gateway, []).append((item.first, item.last))
        if ranges:
            self._gap_items(self.state.record(ranges, time.time()))
        for item in items:
            if accepted:
                self.metrics.points.labels(item.kind).inc(item.points)
            if item.message is not None:
                self._ack(item.message)

    # -- running ----------------------------------------------------------------------------

    @property
    def unacknowledged(self) -> int:
        held = sum(len(b) for b in self._split) + len(self._pending)
        return held + (len(self._sent.items) if self._sent is not None else 0)

    def install_signal_handlers(self) -> None:
        def stop(_signum: int, _frame: FrameType | None) -> None:
            self._stop = True
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def request_stop(self) -> None:
        self._stop = True

    def run(self) -> int:
        if self.cfg.metrics.listen is not None:
            self.metrics.serve(self.cfg.metrics.listen)
        link = self.link
        wake = [self._writes.fd]
        try:
            while not self._stop:
                now = time.monotonic()
                self._turn(now)
                timeout = min(_GAP_CHECK, max(0.0, self._next_gap_check - now))
                if self._retry_at > now and not self._writes.busy:
                    timeout = min(timeout, self._retry_at - now)
                poll_links([link], timeout, wake)
            self._drain()
        finally:
            self._writes.close(self.cfg.influx.timeout)
            self.state.close()
        log.info("Stopped")
        return 0

    def _turn(self, now: float) -> None:
        result = self._writes.result()
        if result is not None:
            self._on_result(result, now)
        if now >= self._next_gap_check:
            self._check_gaps(now)
        self._send(now)
        self.metrics.pending.set(self.unacknowledged)
        self.link.flush()

    def _drain(self) -> None:
        """Finish the write in flight and write what was received (while InfluxDB takes it),
        acknowledge, then disconnect; the rest stays unacknowledged and comes again."""
        deadline = time.monotonic() + _DRAIN_ON_STOP
        link = self.link
        while time.monotonic() < deadline and link.connected and (
                self._writes.busy or (self.unacknowledged and not self._failing)):
            result = self._writes.result()
            now = time.monotonic()
            if result is not None:
                self._on_result(result, now)
            if self._failing:
                break
            self._send(now)
            link.flush()
            poll_links([link], 0.05, [self._writes.fd])
        self._closing = True
        link.close(wait=1.0)
