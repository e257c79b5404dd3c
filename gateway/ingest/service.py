"""The ingest side: site broker -> decode -> durable log, acknowledging only what is durable.

The site session is persistent (clean_start false) and acknowledged by hand: a message is
PUBACKed only after the group commit that made its readings (or its dead letter) durable.
A gateway killed at any moment therefore loses nothing; the broker redelivers what was not
acknowledged, and redeliveries of messages that did reach the log are recognised and skipped.

At most ``site.receive_maximum`` messages wait for a commit: reading pauses at that bound
(Mosquitto 2.0 does not hold to the receive maximum we announce, so we bound ourselves and
TCP pushes back). When the log is full under ``when_full: refuse`` the site session is
paused: the gateway disconnects cleanly, the broker queues readings for the session, and
the gateway reconnects once sinks have caught up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import NamedTuple

from gateway.backoff import Backoff
from gateway.config import GatewayConfig
from gateway.ingest.decode import Decoder
from gateway.ingest.redelivery import TAIL_KEYS, Redeliveries, message_key
from gateway.ingest.topics import TopicTemplates
from gateway.log.store import LogStore, Message
from gateway.metrics import GatewayMetrics
from gateway.mqtt.link import InboundMessage, MqttLink
from gateway.records import DeadLetter, Event, Reading

log = logging.getLogger(__name__)

# Site-broker reconnects: the broker is on this machine or this LAN, so retry quickly.
_SITE_BACKOFF_MIN = 0.5
_SITE_BACKOFF_MAX = 15.0
# Housekeeping (expiry, cursor persistence) needs a turn of the loop at least this often.
_IDLE_WAKE = 0.25


class Answers(NamedTuple):
    """Site messages that are not readings but answers for someone else (the devices'
    command acknowledgements): the site session subscribes to ``filter`` too, and each
    message whose topic ``matches`` goes to ``handle(topic, payload, now, dup)`` (``dup``:
    the MQTT DUP flag), which may turn it into an event for the log. ``published`` gets
    (packet id, reason code) of each PUBACK on the site session: the commands that someone
    else publishes on it."""

    filter: str
    matches: Callable[[str], bool]
    handle: Callable[[str, bytes, float, bool], Event | None]
    published: Callable[[int, int], None] | None = None


class IngestService:
    def __init__(self, cfg: GatewayConfig, store: LogStore, metrics: GatewayMetrics,
                 answers: Answers | None = None,
                 on_readings: Callable[[list[Reading]], None] | None = None) -> None:
        """``answers``: see ``Answers``. ``on_readings`` gets every batch of readings once
        it is durable (the rule engine's input)."""
        self._answers = answers
        self._on_readings = on_readings
        self._cfg = cfg
        self._store = store
        # Site messages already logged, for recognising the broker's redeliveries.
        self._redeliveries = Redeliveries(store.recent_keys(TAIL_KEYS))
        self._metrics = metrics
        self._topics = TopicTemplates(cfg.subscriptions)
        self._decoder = Decoder(cfg.ingest, self._topics)
        self._pending: list[InboundMessage] = []
        self._pending_max = cfg.site.receive_maximum
        self._paused = False
        self._ready = False
        self._failures = metrics.link_failures("site")
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
            on_subscribed=self._on_subscribed,
            on_message=self._pending.append,
            on_published=answers.published if answers is not None else None,
            on_state=lambda up: metrics.link_up.labels("site").set(int(up)),
            read_paused=lambda: len(self._pending) >= self._pending_max,
        )

    @property
    def ready(self) -> bool:
        """True once the site broker acknowledged every subscription (the first time)."""
        return self._ready

    @property
    def pending(self) -> int:
        """Messages received and not yet durable (unacknowledged)."""
        return len(self._pending)

    def _drop_pending(self) -> None:
        """Forget messages not yet durable: the broker redelivers the QoS 1 ones (they were
        never acknowledged); QoS 0 ones are gone, and counted."""
        lost = sum(1 for msg in self._pending if msg.qos == 0)
        if lost:
            self._metrics.qos0_dropped.inc(lost)
        self._pending.clear()

    def _on_connected(self) -> None:
        # Anything still pending belongs to the previous connection.
        self._drop_pending()
        filters = list(self._topics.filters)
        if self._answers is not None:
            filters.append((self._answers.filter, None))
        self.link.subscribe(filters, qos=1)

    def _on_subscribed(self) -> None:
        # The line tests and supervisors wait for: from here on readings are taken.
        if not self._ready:
            self._ready = True
            log.info("Ready: site subscriptions in place on %r", self.link.where)

    def next_wake(self, now: float) -> float:
        if self._pending and not self._paused:
            return 0.0
        return min(_IDLE_WAKE, self.link.next_wake(now))

    def step(self, now: float) -> None:
        """One turn of the loop: commit what arrived, housekeeping, pause/resume."""
        if self._pending and not self._paused:
            self._commit()
        self._store.housekeeping()
        if self._store.full and not self._paused:
            self._paused = True
            self.link.pause()
            self._drop_pending()
            log.warning("Site session paused while the log is full; the site broker holds "
                        "new readings")
        elif self._paused and not self._store.full:
            self._paused = False
            self.link.resume()
            log.info("Site session resumed")
        self._failures.update(self.link.failures)

    def finish(self) -> None:
        """Make what arrived durable, acknowledge it, and disconnect (session kept)."""
        if self._pending and not self._paused:
            self._commit()
        self.link.close()

    def _commit(self) -> None:
        now = time.time()
        pending = self._pending
        decode = self._decoder.decode
        store = self._store
        match = self._topics.match
        route = self._answers
        messages: list[Message] = []
        order: list[int] = []  # index into messages, or -1 for a message acked and skipped
        duplicates = 0
        answers: list[Event] = []
        for msg in pending:
            if route is not None and route.matches(msg.topic):
                answer = route.handle(msg.topic, msg.payload, now, msg.duplicate)
                if answer is not None:
                    answers.append(answer)
                order.append(-1)
                continue
            if msg.subscription_ids:
                found = match(msg.topic)
                if found is not None and found.sub_id not in msg.subscription_ids:
                    # A copy sent for an overlapping, less specific subscription.
                    order.append(-1)
                    continue
            key = message_key(msg.topic, msg.payload, msg.packet_id or 0)
            if msg.duplicate and self._redeliveries.is_redelivery(key):
                order.append(-1)
                duplicates += 1
                continue
            order.append(len(messages))
            messages.append(
                Message(msg.topic, msg.payload, key, decode(msg.topic, msg.payload, now),
                        msg.received)
            )
        if answers:
            store.append_events(answers, now)
        result = store.append(messages, now)
        self._redeliveries.logged([m.key for m in messages[:result.accepted]])
        # Acknowledge, in arrival order, everything up to the first message the log refused.
        if result.accepted == len(messages):
            done = len(order)
        else:
            done = 0
            for index in order:
                if index >= result.accepted:
                    break
                done += 1
        if self._on_readings is not None and result.readings:
            durable = [reading for m in messages[:result.accepted]
                       if not isinstance(m.outcome, DeadLetter) for reading in m.outcome]
            self._on_readings(durable)
        self.link.ack_all(pending[:done] if done < len(pending) else pending)
        del pending[:done]
        self.link.flush()
        metrics = self._metrics
        metrics.site_messages.inc(done)
        metrics.commits.inc()
        if duplicates:
            metrics.redeliveries.inc(duplicates)
