"""The uplink sink: readings from the log to the cloud broker, batched, QoS 1, in order.

Batches go to ``fieldgate/<gateway_id>/telemetry`` as ``{"gateway": ..., "readings": [...]}``
with every reading carrying its ``seq``. At most ``uplink.max_inflight`` batches wait for
their PUBACK; the cursor advances over the acknowledged prefix only, so a crash or a cut
link resends (at-least-once) and never skips. paho resends unacknowledged batches itself
after a reconnect.

A negative PUBACK is sorted by its reason code (``verdict``, the table in README.md):
retried after a delay, retried a bounded number of times, split, or, when it can never be
accepted, copied to the dead-letter table (``gateway log dlq``) so that the cursor moves on:
one record the broker refuses must not stop forwarding. Batches respect the Maximum Packet
Size the broker announced in CONNACK; a single record larger than that is dead-lettered
without being sent (Mosquitto answers an oversize PUBLISH by disconnecting).

When a batch goes (``uplink.batching``): telemetry that does not fill a batch goes at once
when no batch awaits its PUBACK and gathers while one does (``adaptive``, Nagle's rule: the
batches grow with the cloud's round trip), or always gathers for ``batch_max_delay``
(``delay``). An event never waits for a batch: once one is in the log, everything before it
and the event itself go in the same turn of the loop (order per sink is kept).

Gap repair: the cloud link subscribes to ``fieldgate/<gateway_id>/resend``; a request is
answered by ``gateway.resend.Resender`` with messages built here (``message``), inside this
sink's window (``window``, ``live_inflight``), never moving the cursor. Other requests from
the cloud (commands, rule bundles: gateway.downlink) come on the same link: the daemon sets
``request_filters`` and ``on_request``.
"""

from __future__ import annotations

import gzip
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

from gateway import __version__
from gateway.backoff import Backoff
from gateway.config import Batching, GatewayConfig
from gateway.log.reader import LogReader, Row
from gateway.log.schema import KIND_EVENT
from gateway.log.store import LogStore
from gateway.metrics import GatewayMetrics
from gateway.mqtt.link import InboundMessage, MqttLink, packet_size, puback_reason
from gateway.records import BatchState
from gateway.resend import Resender

log = logging.getLogger(__name__)

NAME = "uplink"
# On shutdown, how long to keep forwarding what is already durable before disconnecting.
_DRAIN_ON_STOP = 2.0
# The loop wakes for every site message anyway, and each wake-up runs step(), which sees new
# readings; this is only how long the sink may sleep when nothing at all happens.
_POLL_MAX = 1.0
# A batch refused with a reason that may pass (0x80 unspecified, 0x83 implementation
# specific) is sent this many times in all, then dead-lettered: more rides out longer broker
# trouble, fewer lets one bad record hold up the rest for less time (with backoff_max 60 s,
# 5 tries take up to ~2 minutes).
_RETRY_LIMIT = 5
_PACKET_TOO_LARGE = 0x95
# Largest inbound packet beyond the largest request payload taken: topic, properties, and
# room for a request a little too large to get its "too large" answer.
_INBOUND_SLACK = 64 * 1024
# Bytes of PUBLISH properties we add besides the user properties (content type etc.).
_PROPERTY_SLACK = 64


class Verdict(StrEnum):
    """What the uplink does with a batch after the broker's PUBACK."""

    DELIVERED = "delivered"      # below 0x80, including 0x10 no matching subscribers
    RETRY = "retry"              # send again after a delay, _RETRY_LIMIT times, then dead-letter
    BACK_OFF = "back_off"        # send again after a delay, as long as it takes
    SPLIT = "split"              # send again in halves; a single record: dead-letter
    DEAD_LETTER = "dead_letter"  # can never pass: dead-letter at once


_VERDICTS = {
    0x87: Verdict.DEAD_LETTER,   # not authorized (the broker's ACL)
    0x90: Verdict.DEAD_LETTER,   # topic name invalid
    0x99: Verdict.DEAD_LETTER,   # payload format invalid
    0x97: Verdict.BACK_OFF,      # quota exceeded: it passes once the quota renews
    _PACKET_TOO_LARGE: Verdict.SPLIT,
}


def verdict(code: int) -> Verdict:
    """The uplink's decision for a PUBACK reason code; anything unknown is retried, bounded."""
    if code < 0x80:
        return Verdict.DELIVERED
    return _VERDICTS.get(code, Verdict.RETRY)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One uplink message built from log rows (``UplinkSink.message``)."""

    topic: str
    payload: bytes
    props: list[tuple[str, str]]
    content_type: str
    first: int     # first seq in it
    end: int       # seq after the last one
    readings: int
    size: int      # bytes of the records (before gzip)

    def wire_size(self) -> int:
        """Bytes of the PUBLISH packet (what the broker's Maximum Packet Size bounds)."""
        return packet_size(self.topic, self.payload, _props_size(self.props, self.content_type))


@dataclass(slots=True)
class _Batch:
    mid: int
    first: int     # first seq in the batch
    end: int       # seq after the last reading in the batch
    readings: int
    rows: int      # log records in the batch
    size: int      # bytes of the records (before gzip)
    topic: str
    state: BatchState = BatchState.IN_FLIGHT


class UplinkSink:
    def __init__(self, cfg: GatewayConfig, store: LogStore, metrics: GatewayMetrics) -> None:
        assert cfg.cloud is not None
        self._cfg = cfg
        self._up = cfg.uplink
        self._store = store
        self._metrics = metrics
        # Fields other parts add to the retained status (the daemon wires them; e.g. the
        # running rules version): called for every status message.
        self.status_fields: Callable[[], dict[str, Any]] = dict
        # Requests from the cloud besides resends (the daemon wires gateway.downlink): the
        # filters subscribed with the resend topic, and who gets their messages.
        self.request_filters: list[str] = []
        self.on_request: Callable[[InboundMessage], None] | None = None
        self._reader = LogReader(cfg.log.path, recent=store.recent)
        prefix = f"fieldgate/{cfg.gateway_id}"
        self._telemetry_topic = f"{prefix}/telemetry"
        self._status_topic = f"{prefix}/status"
        self._events_prefix = f"{prefix}/events/"
        self._head = b'{"gateway":' + orjson.dumps(cfg.gateway_id) + b',"readings":['
        self._next = store.cursor(NAME)     # next seq to publish
        self._inflight: deque[_Batch] = deque()
        self._by_mid: dict[int, _Batch] = {}
        self._waiting_since: float | None = None
        self._adaptive = self._up.batching is Batching.ADAPTIVE
        # Events must not wait for a batch. The log counts the events it took; when the
        # count moves, everything logged so far (the new events and what is before them)
        # is sent without waiting: self._urgent_to is the seq up to which that holds.
        # At start, the backlog may hold events too.
        self._events_seen = self._events_logged()
        self._urgent_to = store.next_seq
        self._retry_at = 0.0
        self._retry = Backoff(self._up.backoff_min, self._up.backoff_max)
        self._last_status = 0.0
        # After a "packet too large": (seq the split ends at, byte bound until then).
        self._split: tuple[int, int] | None = None
        self._refused_first = -1   # first seq of the batch refused last, and how often
        self._refusals = 0
        self._logged_codes: set[int] = set()
        self._failures = metrics.link_failures("cloud")
        self.link = MqttLink(
            name="cloud",
            link=cfg.cloud,
            client_id=cfg.cloud_client_id,
            clean_start=True,
            backoff=Backoff(self._up.backoff_min, self._up.backoff_max),
            max_inflight=self._up.max_inflight + 4,  # room for status messages
            # What the cloud sends us is requests (resend, downlink): the broker drops a
            # larger message rather than make a Pi read hundreds of megabytes.
            max_packet_in=_INBOUND_SLACK + max(cfg.downlink.max_command_bytes,
                                               cfg.downlink.max_bundle_bytes
                                               if cfg.downlink.rules else 0),
            will=(self._status_topic, self._status("offline", reason="connection lost")),
            on_connected=self._on_connected,
            on_message=self._on_message,
            on_published=self._on_published,
            on_state=lambda up: metrics.link_up.labels("cloud").set(int(up)),
        )

        self._resend = Resender(self, LogReader(cfg.log.path), metrics, cfg.gateway_id)

    # -- status, and requests from the cloud ----------------------------------------------------

    def _on_connected(self) -> None:
        # Subscribed before the online status goes out: the broker handles a connection's
        # packets in order, so a consumer that sees "online" can ask for a resend.
        self.link.subscribe([(self._resend.topic, None),
                             *((f, None) for f in self.request_filters)], qos=1)
        self.publish_status()

    def _on_message(self, msg: InboundMessage) -> None:
        if msg.topic == self._resend.topic:
            self._resend.on_message(msg)
        elif self.on_request is not None:
            self.on_request(msg)

    def _status(self, state: str, **extra: Any) -> bytes:
        counters = self._store.counter_snapshot()
        return orjson.dumps({
            "state": state,
            "gateway": self._cfg.gateway_id,
            "version": __version__,
            "ts": time.time(),
            "readings": counters.get("readings", 0),
            "dead_letters": sum(v for k, v in counters.items() if k.startswith("dead_letters.")),
            "undelivered": max(0, self._store.next_seq - self._store.cursor(NAME)),
            **self.status_fields(),
            **extra,
        })

    def publish_status(self) -> None:
        self._last_status = time.monotonic()
        self.link.publish(self._status_topic, self._status("online"), qos=1, retain=True,
                          content_type="application/json")

    # -- acknowledgements -----------------------------------------------------------------------

    def _on_published(self, mid: int, reason: int) -> None:
        if self._resend.on_published(mid, reason):
            return
        batch = self._by_mid.pop(mid, None)
        if batch is None:
            return  # a status message or a resend's answer
        action = verdict(reason)
        if action is Verdict.DELIVERED:
            batch.state = BatchState.SETTLED
        else:
            self._metrics.uplink_rejected.labels(f"0x{reason:02x}").inc()
            self._refused(batch, reason, action)
        self._settle()

    def _refused(self, batch: _Batch, code: int, action: Verdict) -> None:
        if action is Verdict.RETRY:
            same = batch.first == self._refused_first
            self._refusals = self._refusals + 1 if same else 1
            self._refused_first = batch.first
            if self._refusals >= _RETRY_LIMIT:
                action = Verdict.DEAD_LETTER
        if action is Verdict.SPLIT:
            if batch.rows == 1:
                action = Verdict.DEAD_LETTER
            else:
                self._split = (batch.end, max(1, batch.size // 2))
        if action is Verdict.DEAD_LETTER:
            settled = self._dead_letter(batch, code, puback_reason(code))
            batch.state = BatchState.SETTLED if settled else BatchState.REFUSED
            return
        batch.state = BatchState.REFUSED
        log.warning("Cloud broker refused batch seq %d-%d (%s, 0x%02x); sending it again%s",
                    batch.first, batch.end - 1, puback_reason(code), code,
                    " in smaller batches" if action is Verdict.SPLIT else " after a delay")

    def _dead_letter(self, batch: _Batch, code: int, why: str) -> bool:
        """Copy the batch's records to the dead-letter table; False if that failed (the batch
        is then retried later)."""
        reason = f"{NAME}_rejected:0x{code:02x}"
        readings = self._store.dead_letter_records(
            batch.first, batch.end, topic=batch.topic, reason=reason,
            detail=f"{NAME}: cloud broker refused it: {why} (0x{code:02x})")
        if readings is None:
            return False
        self._metrics.uplink_dead_lettered.inc(readings)
        if code not in self._logged_codes:  # later ones: counted on /metrics
            self._logged_codes.add(code)
            log.warning("Cloud broker refused seq %d-%d for good (%s, 0x%02x); moved to the "
                        "dead-letter table: gateway log dlq --reason %s", batch.first,
                        batch.end - 1, why, code, reason)
        return True

    def _settle(self) -> None:
        """Move the cursor over the settled prefix; rewind to a refused batch once
        everything sent after it is settled too."""
        inflight = self._inflight
        acked_to = None
        while inflight and inflight[0].state is BatchState.SETTLED:
            done = inflight.popleft()
            acked_to = done.end
            if done.mid >= 0:
                self._metrics.uplink_batches.inc()
                self._metrics.uplink_readings.inc(done.readings)
        if acked_to is not None:
            self._store.ack(NAME, acked_to)
            self._retry.reset()
            if self._split is not None and acked_to >= self._split[0]:
                self._split = None
        if inflight and inflight[0].state is BatchState.REFUSED \
                and all(b.state is not BatchState.IN_FLIGHT for b in inflight):
            # Everything after the refused batch is settled: rewind and resend from it.
            resend = sum(b.readings for b in inflight)
            self._metrics.uplink_resent.inc(resend)
            self._next = inflight[0].first
            inflight.clear()
            self._retry_at = time.monotonic() + (0.0 if self._split else self._retry.next_delay())

    # -- publishing ---------------------------------------------------------------------------

    def _events_logged(self) -> int:
        return self._store.snapshot.counters.get("events", 0)

    def _note_events(self) -> None:
        """New events in the log: send everything up to the log's end without waiting."""
        events = self._events_logged()
        if events != self._events_seen:
            self._events_seen = events
            self._urgent_to = self._store.next_seq

    def _send_now(self, now: float) -> bool:
        """Whether rows that do not fill a batch go now rather than gathering more."""
        assert self._waiting_since is not None
        return (self._next < self._urgent_to
                or (self._adaptive and not self._inflight)
                or now - self._waiting_since >= self._up.batch_max_delay)

    def _publish_due(self, now: float, *, drain: bool = False) -> None:
        self._note_events()
        if self._publish_batches(now, drain=drain):
            # Written now, whichever way the loop above ended: the link buffers publishes
            # until a flush, and the daemon may sleep (coalescing) before its next poll.
            self.link.flush()

    def _publish_batches(self, now: float, *, drain: bool) -> bool:
        """Publish what is due; True if anything was published."""
        up = self._up
        sent = False
        while self.live_inflight() < self._live_window() and now >= self._retry_at:
            if self._inflight and self._inflight[0].state is BatchState.REFUSED:
                return sent
            available = self._store.next_seq - self._next
            if available <= 0:
                self._waiting_since = None
                return sent
            if self._waiting_since is None:
                self._waiting_since = now
            # Adaptive: what is left after a full batch of this turn goes with it, not a turn
            # later behind it (a commit of just over batch_max_readings readings).
            if not drain and available < up.batch_max_readings \
                    and not (sent and self._adaptive) and not self._send_now(now):
                return sent
            rows = self._reader.read(self._next, max_readings=up.batch_max_readings,
                                     max_bytes=self._batch_bytes())
            if not rows:
                # Everything from here on was removed (cap or age) before it could be sent.
                self._next = max(self._next, self._store.next_seq)
                self._waiting_since = None
                return sent
            out = self.message(rows)
            topic, payload, props = out.topic, out.payload, out.props
            size, readings, end = out.size, out.readings, out.end
            limit = self.link.server_max_packet
            wire = out.wire_size()
            if limit is not None and wire > limit:
                if len(rows) > 1:   # the estimate was short: fewer rows, at once
                    self._split = (end, max(1, size // 2))
                    continue
                # One record larger than the broker takes: it can never be sent.
                self._metrics.uplink_rejected.labels(f"0x{_PACKET_TOO_LARGE:02x}").inc()
                batch = _Batch(-1, rows[0].seq, end, readings, 1, size, topic)
                if not self._dead_letter(batch, _PACKET_TOO_LARGE,
                                         f"{wire} bytes > the broker's Maximum Packet Size "
                                         f"{limit}"):
                    self._retry_at = now + self._retry.next_delay()
                    return sent
                batch.state = BatchState.SETTLED
                self._inflight.append(batch)
                self._next = end
                self._settle()
                continue
            mid = self.link.publish(topic, payload, qos=1, user_properties=props,
                                    content_type=out.content_type)
            batch = _Batch(mid, rows[0].seq, end, readings, len(rows), size, topic)
            self._inflight.append(batch)
            self._by_mid[mid] = batch
            self._next = batch.end
            self._waiting_since = now if self._store.next_seq > self._next else None
            sent = True
        return sent

    def message(self, rows: Sequence[Row], extra: Sequence[tuple[str, str]] = ()) -> Outgoing:
        """The uplink message for ``rows`` (a run of telemetry rows or one event, as
        ``LogReader.read`` returns them): topic, payload and properties, byte for byte what
        the uplink sends; the resend answers with the same (``extra`` user properties
        appended)."""
        last = rows[-1].seq + rows[-1].n - 1
        props = [("seq_first", str(rows[0].seq)), ("seq_last", str(last))]
        if rows[0].kind == KIND_EVENT:
            payload = rows[0].body
            topic = f"{self._events_prefix}{orjson.loads(payload).get('type', 'unknown')}"
            content_type = "application/cloudevents+json"
        else:
            payload = self._head + b",".join([r.body for r in rows]) + b"]}"
            topic = self._telemetry_topic
            content_type = "application/json"
        if self._up.gzip:
            payload = gzip.compress(payload, compresslevel=5)
            props.append(("content-encoding", "gzip"))
        props.extend(extra)
        return Outgoing(topic, payload, props, content_type, rows[0].seq,
                        rows[-1].seq + rows[-1].n, sum(r.n for r in rows),
                        sum(len(r.body) for r in rows))

    def _max_inflight(self) -> int:
        # The broker's Receive Maximum bounds our unacknowledged publishes (room for status).
        return max(1, min(self._up.max_inflight, self.link.server_receive_maximum - 2))

    def _live_window(self) -> int:
        """The window less what a resend holds of it (at most half, see gateway.resend)."""
        return self._max_inflight() - self._resend.inflight

    # -- what a resend uses (gateway.resend.UplinkSide) -----------------------------------------

    def window(self) -> int:
        """Batches the uplink and a resend together may have unacknowledged."""
        return self._max_inflight()

    def live_inflight(self) -> int:
        return len(self._inflight)

    def batch_bounds(self) -> tuple[int, int]:
        """(readings, bytes) of records one message may carry."""
        return self._up.batch_max_readings, self._batch_bytes()

    def _batch_bytes(self) -> int:
        limit = self._up.batch_max_bytes
        if self._split is not None:
            limit = min(limit, self._split[1])
        if self.link.server_max_packet is not None:
            # Leave room for the fixed header, topic and properties.
            limit = min(limit, self.link.server_max_packet - 512)
        return max(1, limit - len(self._head) - 2)

    def _can_publish(self, now: float) -> bool:
        return (self.link.connected and self.live_inflight() < self._live_window()
                and now >= self._retry_at
                and not (self._inflight and self._inflight[0].state is BatchState.REFUSED))

    def next_wake(self, now: float) -> float:
        wake = self.link.next_wake(now)
        if self._waiting_since is not None and self._can_publish(now):
            if self._send_now(now):
                wake = 0.0
            else:
                wake = min(wake, max(0.0, self._waiting_since + self._up.batch_max_delay - now))
        elif self._retry_at > now:
            wake = min(wake, self._retry_at - now)
        if self._resend.due():
            wake = 0.0
        return min(wake, _POLL_MAX)

    def step(self, now: float) -> None:
        if self.link.connected:
            # A resend takes its share of the window first, the live uplink the rest.
            resent = self._resend.pump(after_uplink=False)
            self._publish_due(now)
            if self._resend.pump(after_uplink=True) or resent:
                self.link.flush()
            if now - self._last_status >= self._up.status_interval:
                self.publish_status()
        self._failures.update(self.link.failures)

    def finish(self) -> None:
        """Forward what is already durable (briefly), publish offline status, disconnect."""
        deadline = time.monotonic() + _DRAIN_ON_STOP
        while self.link.connected and time.monotonic() < deadline:
            now = time.monotonic()
            self._publish_due(now, drain=True)
            if not self._inflight and self._store.next_seq <= self._next:
                break
            self.link.poll(0.02)
        if self.link.connected:
            self.link.publish(self._status_topic, self._status("offline", reason="shutdown"),
                              qos=1, retain=True, content_type="application/json")
        self.link.close(wait=1.0)
        self._reader.close()
        self._resend.close()


def _props_size(user: list[tuple[str, str]], content_type: str) -> int:
    """Bytes of the PUBLISH properties we send (user properties, content type, slack)."""
    return (sum(5 + len(k.encode()) + len(v.encode()) for k, v in user)
            + 3 + len(content_type.encode()) + _PROPERTY_SLACK)
