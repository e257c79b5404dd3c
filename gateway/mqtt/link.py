"""One MQTT connection, driven by its owner's loop (no paho network thread).

The owner calls ``poll`` in its loop; the link connects and reconnects with capped
exponential backoff and jitter, reads everything the socket has in one go, and writes what
paho queued in one go. paho objects do not leave this module: inbound messages become
``InboundMessage``.
"""

from __future__ import annotations

import logging
import random
import select
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.config import Link
from gateway.mqtt.socket import CoalescingSocket

log = logging.getLogger(__name__)

# A broker that accepted TCP but sends no CONNACK within this time is treated as down.
_CONNACK_TIMEOUT = 10.0
# paho's keepalive bookkeeping runs this often; it only sends a PINGREQ when one is due.
_MISC_EVERY = 0.5


@dataclass(frozen=True, slots=True)
class InboundMessage:
    topic: str
    payload: bytes
    qos: int
    mid: int
    dup: bool
    received: float
    sub_ids: tuple[int, ...] = ()  # MQTT v5 subscription identifiers the broker attached


class Backoff:
    """Capped exponential backoff with jitter: delay n is uniform in [d/2, d], d = min·2ⁿ."""

    def __init__(self, minimum: float, maximum: float) -> None:
        self._min = minimum
        self._max = maximum
        self.attempts = 0

    def next_delay(self) -> float:
        ceiling = min(self._max, self._min * (2 ** min(self.attempts, 30)))
        self.attempts += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempts = 0


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho: untyped


class _Client(paho.Client):
    """paho's client with our coalescing socket in place of the raw one."""

    def _create_socket(self) -> Any:
        return CoalescingSocket(cast(socket.socket, super()._create_socket()))


class MqttLink:
    """A paho MQTT v5 client whose socket is driven by ``poll``.

    ``on_connected`` runs after every successful CONNACK (subscribe or publish a birth
    message there); ``on_message`` gets each inbound PUBLISH; ``on_published`` gets
    (mid, ok) for each PUBACK.
    """

    def __init__(
        self,
        *,
        name: str,
        link: Link,
        client_id: str,
        clean_start: bool,
        backoff: Backoff,
        session_expiry: float = 0.0,
        receive_maximum: int | None = None,
        manual_ack: bool = False,
        max_inflight: int = 20,
        will: tuple[str, bytes] | None = None,
        on_connected: Callable[[], None] | None = None,
        on_message: Callable[[InboundMessage], None] | None = None,
        on_published: Callable[[int, bool], None] | None = None,
        on_state: Callable[[bool], None] | None = None,
    ) -> None:
        self.name = name
        self._link = link
        self._backoff = backoff
        self._clean_start = clean_start
        self._on_connected = on_connected
        self._on_message = on_message
        self._on_published = on_published
        self._on_state = on_state
        self._connected = False
        self._next_attempt = 0.0
        self._connecting_since: float | None = None
        self._last_misc = 0.0
        self._first_attempt = True
        self._outage_logged = False
        self._closing = False
        self.connects = 0
        self.failures = 0

        client = _Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5,
            manual_ack=manual_ack,
        )
        client.max_inflight_messages_set(max_inflight)
        if link.username is not None:
            client.username_pw_set(link.username, link.password())
        if link.tls:
            context = ssl.create_default_context(
                cafile=str(link.ca_file) if link.ca_file else None
            )
            if link.cert_file and link.key_file:
                context.load_cert_chain(str(link.cert_file), str(link.key_file))
            client.tls_set_context(context)
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        props = _properties(PacketTypes.CONNECT)
        if session_expiry > 0:
            props.SessionExpiryInterval = int(session_expiry)
        if receive_maximum is not None:
            props.ReceiveMaximum = receive_maximum
        self._props = props
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        self._client = client

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def where(self) -> str:
        return f"{self._link.host}:{self._link.port}"

    # -- paho callbacks (run inside poll) ---------------------------------------------------

    def _handle_connect(self, _c: Any, _u: Any, _flags: Any, rc: ReasonCode, _p: Any) -> None:
        if rc.is_failure:
            self.failures += 1
            if not self._outage_logged:
                log.error("%s broker %r refused the connection: %s; retrying with backoff",
                          self.name.capitalize(), self.where, rc.getName())
                self._outage_logged = True
            self._schedule_retry()
            return
        self._connected = True
        self._connecting_since = None
        self._backoff.reset()
        self.connects += 1
        if self._outage_logged or self.connects == 1:
            log.info("Connected to %s broker %r", self.name, self.where)
        self._outage_logged = False
        if self._on_state is not None:
            self._on_state(True)
        if self._on_connected is not None:
            self._on_connected()

    def _handle_disconnect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        was = self._connected
        self._connected = False
        if was and self._on_state is not None:
            self._on_state(False)
        if was and not self._closing:
            log.warning("Lost %s broker %r (%s); reconnecting with backoff", self.name,
                        self.where, rc.getName() if rc is not None else "connection lost")
            self._outage_logged = True
        self._schedule_retry()

    def _handle_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        if self._on_message is not None:
            ids = getattr(msg.properties, "SubscriptionIdentifier", None)
            self._on_message(InboundMessage(msg.topic, bytes(msg.payload), msg.qos, msg.mid,
                                            bool(msg.dup), time.time(),
                                            tuple(ids) if ids else ()))

    def _handle_publish(self, _c: Any, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        if self._on_published is not None:
            self._on_published(mid, not rc.is_failure)

    # -- driving ----------------------------------------------------------------------------

    def _schedule_retry(self) -> None:
        self._connecting_since = None
        self._next_attempt = time.monotonic() + self._backoff.next_delay()

    def _socket(self) -> CoalescingSocket | None:
        sock = self._client.socket()
        return sock if isinstance(sock, CoalescingSocket) else None

    def _connect(self) -> None:
        try:
            if self._first_attempt:
                self._client.connect(
                    self._link.host, self._link.port, keepalive=int(self._link.keepalive),
                    clean_start=self._clean_start, properties=self._props,
                )
                self._first_attempt = False
            else:
                self._client.reconnect()
        except (OSError, ValueError) as err:
            self.failures += 1
            if not self._outage_logged:
                log.warning("Cannot reach %s broker %r (%s); retrying with backoff",
                            self.name, self.where, err)
                self._outage_logged = True
            self._schedule_retry()
            return
        self._connecting_since = time.monotonic()
        self.flush()

    def poll(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for traffic and handle it; True if anything was read."""
        now = time.monotonic()
        sock = self._socket()
        if sock is None:
            if self._closing:
                return False
            if now < self._next_attempt:
                time.sleep(max(0.0, min(timeout, self._next_attempt - now)))
                return False
            self._connect()
            return False
        if self._connecting_since is not None and now - self._connecting_since > _CONNACK_TIMEOUT:
            log.warning("No CONNACK from %s broker %r", self.name, self.where)
            self._client.disconnect()
            sock.close()
            self._schedule_retry()
            return False
        wlist = [sock] if sock.wants_write else []
        try:
            readable, writable, _ = select.select([sock], wlist, [], timeout)
        except (OSError, ValueError):
            readable, writable = [], []
        got = False
        if readable:
            sock.fill()
            got = True
            while self._socket() is sock and sock.buffered:
                if self._client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
            if sock.eof and self._socket() is sock:
                self._client.loop_read()
        if time.monotonic() - self._last_misc >= _MISC_EVERY:
            self._last_misc = time.monotonic()
            self._client.loop_misc()
        if writable or self._client.want_write() or sock.wants_write:
            self.flush()
        return got

    def flush(self) -> None:
        """Send everything paho has queued (acks, publishes) in as few writes as possible."""
        sock = self._socket()
        if sock is None:
            return
        if self._client.want_write():
            self._client.loop_write()
        try:
            sock.flush()
        except OSError:
            # The connection broke; the next read sees it and paho reports the disconnect.
            log.debug("Write to %s broker failed", self.name, exc_info=True)

    # -- operations -------------------------------------------------------------------------

    def subscribe(self, filters: list[tuple[str, int]], qos: int) -> None:
        """Subscribe to (filter, subscription identifier) pairs."""
        for topic, sub_id in filters:
            props = _properties(PacketTypes.SUBSCRIBE)
            props.SubscriptionIdentifier = sub_id
            self._client.subscribe(topic, qos=qos, properties=props)

    def ack(self, mid: int, qos: int) -> None:
        self._client.ack(mid, qos)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                user_properties: list[tuple[str, str]] | None = None,
                content_type: str | None = None) -> int:
        """Queue a publish; returns its mid (PUBACK comes to ``on_published``)."""
        props = None
        if user_properties or content_type:
            props = _properties(PacketTypes.PUBLISH)
            if content_type:
                props.ContentType = content_type
            if user_properties:
                props.UserProperty = user_properties
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        return int(info.mid)

    def pending_publishes(self) -> int:
        """Publishes paho holds that the broker has not acknowledged yet."""
        return len(self._client._out_messages)

    def close(self, *, wait: float = 0.0) -> None:
        """Disconnect cleanly (the will is not sent), after up to ``wait`` s for PUBACKs."""
        deadline = time.monotonic() + wait
        while self._connected and self.pending_publishes() and time.monotonic() < deadline:
            self.poll(0.05)
        self._closing = True
        if self._socket() is not None:
            self._client.disconnect()
            self.flush()
            sock = self._socket()
            if sock is not None:
                sock.close()
        self._connected = False
