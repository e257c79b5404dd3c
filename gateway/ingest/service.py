"""The ingest loop: site broker -> decode -> durable log, acknowledging only what is durable.

The site session is persistent (clean_start false) and acknowledged by hand: a message is
PUBACKed only after the group commit that made its readings (or its dead letter) durable.
A gateway killed at any moment therefore loses nothing; the broker redelivers what was not
acknowledged, and redeliveries of messages that did reach the log are recognised and skipped.

The loop coalesces: after a wake-up that found data it sleeps out the rest of
``ingest.commit_interval``, so at a few thousand messages a second each wake-up reads,
decodes and commits a batch instead of one message.
"""

from __future__ import annotations

import logging
import threading
import time

from gateway.config import GatewayConfig
from gateway.ingest.decode import Decoder
from gateway.ingest.topics import TopicTemplates
from gateway.log.store import LogStore, Message, message_key
from gateway.metrics import GatewayMetrics
from gateway.mqtt.link import Backoff, InboundMessage, MqttLink

log = logging.getLogger(__name__)

# Site-broker reconnects: the broker is on this machine or this LAN, so retry quickly.
_SITE_BACKOFF_MIN = 0.5
_SITE_BACKOFF_MAX = 15.0
# QoS 0 messages are not bounded by receive_maximum; this many pending, later ones are dropped
# (counted) while the log refuses.
_QOS0_PENDING_FACTOR = 4
# How often connection-failure counts are copied to metrics.
_GAUGES_EVERY = 1.0


class IngestService:
    def __init__(self, cfg: GatewayConfig, store: LogStore, metrics: GatewayMetrics) -> None:
        self._cfg = cfg
        self._store = store
        self._metrics = metrics
        self._topics = TopicTemplates(cfg.subscriptions)
        self._decoder = Decoder(cfg.ingest, self._topics)
        self._pending: list[InboundMessage] = []
        self._pending_max = cfg.site.receive_maximum * _QOS0_PENDING_FACTOR
        self.qos0_dropped = 0
        self._stop = threading.Event()
        self.link = MqttLink(
            name="site",
            link=cfg.site,
            client_id=cfg.site_client_id,
            clean_start=False,
            session_expiry=cfg.site.session_expiry,
            receive_maximum=cfg.site.receive_maximum,
            manual_ack=True,
            backoff=Backoff(_SITE_BACKOFF_MIN, _SITE_BACKOFF_MAX),
            on_connected=self._on_connected,
            on_message=self._on_message,
            on_state=lambda up: metrics.link_up.labels("site").set(int(up)),
        )

    def stop(self) -> None:
        self._stop.set()

    def _on_connected(self) -> None:
        self._store.remember_tail(self._cfg.site.receive_maximum)
        self.link.subscribe(self._topics.filters, qos=1)

    def _on_message(self, msg: InboundMessage) -> None:
        if msg.qos == 0 and len(self._pending) >= self._pending_max:
            self.qos0_dropped += 1
            return
        self._pending.append(msg)

    def run(self) -> None:
        interval = self._cfg.ingest.commit_interval
        last_gauges = 0.0
        failures = self.link.failures
        while not self._stop.is_set():
            got = self.link.poll(interval if self._pending else 0.25)
            woke = time.monotonic()
            if self._pending:
                self._commit()
            self._store.housekeeping()
            if woke - last_gauges >= _GAUGES_EVERY:
                last_gauges = woke
                if self.link.failures != failures:
                    self._metrics.connect_failures.labels("site").inc(self.link.failures - failures)
                    failures = self.link.failures
            if got:
                rest = interval - (time.monotonic() - woke)
                if rest > 0:
                    time.sleep(rest)
        if self._pending:
            self._commit()
        self.link.close()

    def _commit(self) -> None:
        now = time.time()
        pending = self._pending
        decode = self._decoder.decode
        store = self._store
        messages: list[Message] = []
        order: list[int] = []  # index into messages, or -1 for a skipped redelivery
        duplicates = 0
        match = self._topics.match
        for msg in pending:
            if msg.sub_ids:
                found = match(msg.topic)
                if found is not None and found.sub_id not in msg.sub_ids:
                    # A copy sent for an overlapping, less specific subscription.
                    order.append(-1)
                    continue
            key = message_key(msg.topic, msg.payload)
            if msg.dup and store.is_redelivery(key):
                order.append(-1)
                duplicates += 1
                continue
            order.append(len(messages))
            messages.append(
                Message(msg.topic, msg.payload, key, decode(msg.topic, msg.payload, now),
                        msg.received)
            )
        result = store.append(messages, now)
        # Acknowledge, in arrival order, everything up to the first message the log refused.
        done = 0
        for index in order:
            if index >= result.accepted:
                break
            done += 1
        for msg in pending[:done]:
            if msg.qos:
                self.link.ack(msg.mid, msg.qos)
        del pending[:done]
        self.link.flush()
        metrics = self._metrics
        metrics.site_messages.inc(done)
        metrics.readings.inc(result.readings)
        metrics.commits.inc()
        if duplicates:
            metrics.redeliveries.inc(duplicates)

    @property
    def pending(self) -> int:
        """Messages received and not yet durable."""
        return len(self._pending)
