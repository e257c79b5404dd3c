"""The uplink sink: readings from the log to the cloud broker, batched, QoS 1, in order.

Batches go to ``fieldgate/<gateway_id>/telemetry`` as ``{"gateway": ..., "readings": [...]}``
with every reading carrying its ``seq``. At most ``uplink.max_inflight`` batches wait for
their PUBACK; the cursor advances over the acknowledged prefix only, so a crash or a cut
link resends (at-least-once) and never skips. paho resends unacknowledged batches itself
after a reconnect; a batch the broker refuses (negative PUBACK) is sent again after a delay.
"""

from __future__ import annotations

import gzip
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson

from gateway import __version__
from gateway.config import GatewayConfig
from gateway.log.reader import LogReader
from gateway.log.store import KIND_EVENT, LogStore
from gateway.metrics import GatewayMetrics
from gateway.mqtt.link import Backoff, MqttLink

log = logging.getLogger(__name__)

NAME = "uplink"
# On shutdown, how long to keep forwarding what is already durable before disconnecting.
_DRAIN_ON_STOP = 2.0
# The loop wakes for every site message anyway, and each wake-up runs step(), which sees new
# readings; this is only how long the sink may sleep when nothing at all happens.
_POLL_MAX = 1.0
# A negative PUBACK with this reason (packet too large) halves the batch size, down to this.
_PACKET_TOO_LARGE = 0x95
_MIN_BATCH_BYTES = 4096


@dataclass(slots=True)
class _Batch:
    mid: int
    first: int     # first seq in the batch
    end: int       # seq after the last reading in the batch
    readings: int
    state: int = 0  # 0 in flight, 1 acknowledged, -1 refused


class UplinkSink:
    def __init__(self, cfg: GatewayConfig, store: LogStore, metrics: GatewayMetrics) -> None:
        assert cfg.cloud is not None
        self._cfg = cfg
        self._up = cfg.uplink
        self._store = store
        self._metrics = metrics
        self._reader = LogReader(cfg.log.path)
        prefix = f"fieldgate/{cfg.gateway_id}"
        self._telemetry_topic = f"{prefix}/telemetry"
        self._status_topic = f"{prefix}/status"
        self._events_prefix = f"{prefix}/events/"
        self._head = b'{"gateway":' + orjson.dumps(cfg.gateway_id) + b',"readings":['
        self._next = store.cursor(NAME)     # next seq to publish
        self._inflight: deque[_Batch] = deque()
        self._by_mid: dict[int, _Batch] = {}
        self._waiting_since: float | None = None
        self._retry_at = 0.0
        self._retry = Backoff(self._up.backoff_min, self._up.backoff_max)
        self._last_status = 0.0
        self._max_bytes = self._up.batch_max_bytes
        self._failures = 0
        self.link = MqttLink(
            name="cloud",
            link=cfg.cloud,
            client_id=cfg.cloud_client_id,
            clean_start=True,
            backoff=Backoff(self._up.backoff_min, self._up.backoff_max),
            max_inflight=self._up.max_inflight + 4,  # room for status messages
            will=(self._status_topic, self._status("offline", reason="connection lost")),
            on_connected=self._publish_status,
            on_published=self._on_published,
            on_state=lambda up: metrics.link_up.labels("cloud").set(int(up)),
        )

    # -- status -------------------------------------------------------------------------------

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
            **extra,
        })

    def _publish_status(self) -> None:
        self._last_status = time.monotonic()
        self.link.publish(self._status_topic, self._status("online"), qos=1, retain=True,
                          content_type="application/json")

    # -- acknowledgements -----------------------------------------------------------------------

    def _on_published(self, mid: int, reason: int) -> None:
        batch = self._by_mid.pop(mid, None)
        if batch is None:
            return  # a status message
        if reason < 0x80:
            batch.state = 1
        else:
            batch.state = -1
            self._metrics.uplink_rejected.inc()
            if reason == _PACKET_TOO_LARGE and self._max_bytes > _MIN_BATCH_BYTES:
                # Split and retry: smaller batches from now on (Telegraf's 413 rule).
                self._max_bytes = max(_MIN_BATCH_BYTES, self._max_bytes // 2)
            log.warning("Cloud broker refused batch seq %d-%d (reason 0x%02x); sending it "
                        "again after a delay", batch.first, batch.end - 1, reason)
        inflight = self._inflight
        acked_to = None
        while inflight and inflight[0].state == 1:
            done = inflight.popleft()
            acked_to = done.end
            self._metrics.uplink_batches.inc()
            self._metrics.uplink_readings.inc(done.readings)
        if acked_to is not None:
            self._store.ack(NAME, acked_to)
            self._retry.reset()
        if inflight and inflight[0].state == -1 and all(b.state != 0 for b in inflight):
            # Everything after the refused batch is settled: rewind and resend from it.
            resend = sum(b.readings for b in inflight)
            self._metrics.uplink_resent.inc(resend)
            self._next = inflight[0].first
            inflight.clear()
            self._retry_at = time.monotonic() + self._retry.next_delay()

    # -- publishing ---------------------------------------------------------------------------

    def _publish_due(self, now: float, *, drain: bool = False) -> None:
        up = self._up
        while len(self._inflight) < self._max_inflight() and now >= self._retry_at:
            if self._inflight and self._inflight[0].state == -1:
                return
            available = self._store.next_seq - self._next
            if available <= 0:
                self._waiting_since = None
                return
            if self._waiting_since is None:
                self._waiting_since = now
            if (not drain and available < up.batch_max_readings
                    and now - self._waiting_since < up.batch_max_delay):
                return
            rows = self._reader.read(self._next, max_readings=up.batch_max_readings,
                                     max_bytes=self._batch_bytes())
            if not rows:
                # Everything from here on was removed (cap or age) before it could be sent.
                self._next = max(self._next, self._store.next_seq)
                self._waiting_since = None
                return
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
            if up.gzip:
                payload = gzip.compress(payload, compresslevel=5)
                props.append(("content-encoding", "gzip"))
            mid = self.link.publish(topic, payload, qos=1, user_properties=props,
                                    content_type=content_type)
            readings = sum(r.n for r in rows)
            batch = _Batch(mid, rows[0].seq, rows[-1].seq + rows[-1].n, readings)
            self._inflight.append(batch)
            self._by_mid[mid] = batch
            self._next = batch.end
            self._waiting_since = now if self._store.next_seq > self._next else None
        self.link.flush()

    def _max_inflight(self) -> int:
        # The broker's Receive Maximum bounds our unacknowledged publishes (room for status).
        return max(1, min(self._up.max_inflight, self.link.server_receive_maximum - 2))

    def _batch_bytes(self) -> int:
        limit = self._max_bytes
        if self.link.server_max_packet is not None:
            # Leave room for the fixed header, topic and properties.
            limit = min(limit, self.link.server_max_packet - 512)
        return max(_MIN_BATCH_BYTES, limit) - len(self._head) - 2

    def _can_publish(self, now: float) -> bool:
        return (self.link.connected and len(self._inflight) < self._max_inflight()
                and now >= self._retry_at
                and not (self._inflight and self._inflight[0].state == -1))

    def next_wake(self, now: float) -> float:
        wake = self.link.next_wake(now)
        if self._waiting_since is not None and self._can_publish(now):
            wake = min(wake, max(0.0, self._waiting_since + self._up.batch_max_delay - now))
        elif self._retry_at > now:
            wake = min(wake, self._retry_at - now)
        return min(wake, _POLL_MAX)

    def step(self, now: float) -> None:
        if self.link.connected:
            self._publish_due(now)
            if now - self._last_status >= self._up.status_interval:
                self._publish_status()
        if self.link.failures != self._failures:
            self._metrics.connect_failures.labels("cloud").inc(self.link.failures - self._failures)
            self._failures = self.link.failures

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
