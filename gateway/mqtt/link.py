"""MQTT connections driven by the owner's loop (no paho network thread).

The daemon runs one loop for all links: ``poll_links`` waits on every socket at once, each
link reads everything its socket has in one system call, and writes what paho queued in
one. paho objects do not leave this module: inbound messages become ``InboundMessage``.

Connecting (TCP, TLS handshake, CONNECT) blocks, possibly for seconds against a broker that
is far away or gone; it runs in a short-lived thread so that the loop, and the other link,
never wait for it. Reconnects back off exponentially with jitter.
"""

from __future__ import annotations

import logging
import random
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.config import Link
from gateway.mqtt.inbound import parse_publish
from gateway.mqtt.socket import FILL_MAX, CoalescingSocket

log = logging.getLogger(__name__)

# A broker that accepted TCP but sends no CONNACK within this time is treated as down.
_CONNACK_TIMEOUT = 10.0
# paho's keepalive bookkeeping runs this often; it only sends a PINGREQ when one is due.
_MISC_EVERY = 0.5
# TCP connect and TLS handshake time limit for one attempt.
_CONNECT_TIMEOUT = 10.0
# Before a deliberate DISCONNECT we wait (this long at most) for one round trip, so that the
# broker has processed our last PUBACKs: Mosquitto 2.0 was seen to forget PUBACKs that
# arrived just before a DISCONNECT, and redeliver those messages in the next session.
_BARRIER_TIMEOUT = 1.0
_BARRIER_TOPIC = "$fieldgate/barrier"
# paho's reason code for a connection that broke without a DISCONNECT packet.
_UNSPECIFIED = 0x80


class InboundMessage(NamedTuple):
    """An inbound PUBLISH. A NamedTuple, not a frozen dataclass: one is built per message
    and a frozen dataclass costs several times as much to construct."""

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


def puback_reason(code: int) -> str:
    """The name of a PUBACK reason code, e.g. 0x87 -> "Not authorized"."""
    if code == 0x95:  # not a PUBACK code in MQTT 5, but brokers send it (and DISCONNECT)
        return "Packet too large"
    try:
        return str(ReasonCode(PacketTypes.PUBACK, identifier=code).getName())
    except (KeyError, ValueError):
        return "unknown reason"


def packet_size(topic: str, payload: bytes, properties: int) -> int:
    """Bytes of a QoS 1 PUBLISH packet with ``properties`` bytes of properties: what a
    broker's Maximum Packet Size is compared with."""
    remaining = 2 + len(topic.encode()) + 2 + _varint_len(properties) + properties + len(payload)
    return 1 + _varint_len(remaining) + remaining


def _varint_len(value: int) -> int:
    return 1 if value < 128 else 2 if value < 16_384 else 3 if value < 2_097_152 else 4


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho: untyped


class _Client(paho.Client):
    """paho's client with our coalescing socket in place of the raw one."""

    last_socket: CoalescingSocket | None = None

    def _create_socket(self) -> Any:
        self.last_socket = CoalescingSocket(cast(socket.socket, super()._create_socket()))
        return self.last_socket


class MqttLink:
    """A paho MQTT v5 client whose socket is driven by the owner.

    ``on_connected`` runs after every successful CONNACK (subscribe or publish a birth
    message there); ``on_message`` gets each inbound PUBLISH; ``on_published`` gets (mid,
    reason code) for each PUBACK (below 0x80 is success); ``read_paused`` stops reading
    while it returns True.
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
        on_subscribed: Callable[[], None] | None = None,
        on_message: Callable[[InboundMessage], None] | None = None,
        on_published: Callable[[int, int], None] | None = None,
        on_state: Callable[[bool], None] | None = None,
        read_paused: Callable[[], bool] | None = None,
    ) -> None:
        self.name = name
        self._link = link
        self._backoff = backoff
        self._clean_start = clean_start
        self._on_connected = on_connected
        self._on_subscribed = on_subscribed
        self._suback_wait: dict[int, str] = {}  # SUBSCRIBE packet id -> filter
        self._on_message = on_message
        self._on_published = on_published
        self._on_state = on_state
        self._read_paused = read_paused or (lambda: False)
        self._connected = False
        self._next_attempt = 0.0
        self._connecting_since: float | None = None
        self._retry_scheduled = False  # for the current attempt (paho may report twice)
        self._connector: threading.Thread | None = None
        self._connect_error: BaseException | None = None
        self._last_misc = 0.0
        self._first_attempt = True
        self._outage_logged = False
        self._closing = False
        self._paused = False
        self._barrier_mid: int | None = None
        # What the broker announced in CONNACK (MQTT v5); paho does not enforce these.
        self.server_receive_maximum = 65535
        self.server_max_packet: int | None = None
        self.connects = 0
        self.failures = 0

        client = _Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5,
            manual_ack=manual_ack,
        )
        client.max_inflight_messages_set(max_inflight)
        client.connect_timeout = _CONNECT_TIMEOUT
        if link.username is not None:
            client.username_pw_set(link.username, link.password())
        if link.tls:
            client.tls_set_context(link.ssl_context(name))
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
        client.on_unsubscribe = self._handle_unsubscribe
        client.on_subscribe = self._handle_subscribe
        self._client = client

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def where(self) -> str:
        return f"{self._link.host}:{self._link.port}"

    # -- paho callbacks (run inside on_readable / tick) ---------------------------------------

    def _handle_connect(self, _c: Any, _u: Any, _flags: Any, rc: ReasonCode, _p: Any) -> None:
        if rc.is_failure:
            self.failures += 1
            if not self._outage_logged:
                log.error("%s broker %r refused the connection: %s; retrying with backoff",
                          self.name.capitalize(), self.where, rc.getName())
                self._outage_logged = True
            # paho reports the disconnect that follows too; one attempt, one backoff step.
            self._schedule_retry()
            return
        self._connected = True
        self._connecting_since = None
        self._suback_wait.clear()
        self.server_receive_maximum = getattr(_p, "ReceiveMaximum", 65535)
        self.server_max_packet = getattr(_p, "MaximumPacketSize", None)
        self._backoff.reset()
        self.connects += 1
        if self._outage_logged or self.connects == 1:
            log.info("Connected to %s broker %r", self.name, self.where)
        self._outage_logged = False
        if self._on_state is not None:
            self._on_state(True)
        if self._on_connected is not None:
            self._on_connected()

    def _handle_disconnect(self, _c: Any, _u: Any, flags: Any, rc: ReasonCode | None,
                           props: Any) -> None:
        was = self._connected
        self._connected = False
        if was and self._on_state is not None:
            self._on_state(False)
        if was and not self._closing and not self._paused:
            log.warning("Lost %s broker %r (%s); reconnecting with backoff", self.name,
                        self.where, self._why_lost(flags, rc, props))
            self._outage_logged = True
        if not self._retry_scheduled:
            self._schedule_retry()

    def _why_lost(self, flags: Any, rc: ReasonCode | None, props: Any) -> str:
        """The real reason: the broker's DISCONNECT reason, else what the socket saw (paho
        calls every lost connection "Unspecified error")."""
        if getattr(flags, "is_disconnect_packet_from_server", False) and rc is not None:
            text = getattr(props, "ReasonString", None)
            why = f"broker sent DISCONNECT: {rc.getName()} (0x{rc.value:02x})"
            return f"{why}: {text!r}" if text else why
        if rc is not None and rc.value != _UNSPECIFIED:
            return rc.getName()
        sock = self._client.last_socket
        if sock is not None and sock.error:
            return sock.error
        if sock is not None and sock.eof:
            return "the broker closed the connection"
        return "connection lost"

    def _handle_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        if self._on_message is not None:
            ids = getattr(msg.properties, "SubscriptionIdentifier", None)
            try:
                topic = msg.topic
            except UnicodeDecodeError:  # brokers that check UTF-8 never send this
                topic = msg._topic.decode("utf-8", "replace")  # noqa: SLF001
            # paho hands over bytes (its decoder and ours both build bytes objects).
            payload = cast(bytes, msg.payload)
            self._on_message(InboundMessage(topic, payload, msg.qos, msg.mid,
                                            bool(msg.dup), time.time(),
                                            tuple(ids) if ids else ()))

    def _handle_subscribe(self, _c: Any, _u: Any, mid: int, codes: list[ReasonCode],
                          _p: Any) -> None:
        topic = self._suback_wait.pop(mid, None)
        if topic is None:
            return
        for rc in codes:
            if rc.is_failure:
                log.error("%s broker %r refused the subscription to %r: %s; check its ACL",
                          self.name.capitalize(), self.where, topic, rc.getName())
        if not self._suback_wait and self._on_subscribed is not None:
            self._on_subscribed()

    def _handle_unsubscribe(self, _c: Any, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
        if mid == self._barrier_mid:
            self._barrier_mid = None

    def _round_trip(self) -> None:
        """Wait until the broker has processed everything we sent so far (or a timeout)."""
        if not self._connected:
            return
        _, mid = self._client.unsubscribe(_BARRIER_TOPIC)
        self._barrier_mid = mid
        self.flush()
        deadline = time.monotonic() + _BARRIER_TIMEOUT
        while self._barrier_mid is not None and self._connected and time.monotonic() < deadline:
            poll_links([self], 0.02)
        self._barrier_mid = None

    def _handle_publish(self, _c: Any, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        if self._on_published is not None:
            self._on_published(mid, rc.value)

    # -- connecting -----------------------------------------------------------------------------

    def _schedule_retry(self) -> None:
        self._connecting_since = None
        self._retry_scheduled = True
        self._next_attempt = time.monotonic() + self._backoff.next_delay()

    def _connect_blocking(self) -> None:
        try:
            if self._first_attempt:
                self._client.connect(
                    self._link.host, self._link.port, keepalive=int(self._link.keepalive),
                    clean_start=self._clean_start, properties=self._props,
                )
            else:
                self._client.reconnect()
        except (OSError, ValueError) as err:
            self._connect_error = err

    def _start_connect(self) -> None:
        self._connect_error = None
        self._retry_scheduled = False
        self._connector = threading.Thread(target=self._connect_blocking,
                                           name=f"connect-{self.name}", daemon=True)
        self._connector.start()

    def _finish_connect(self) -> None:
        self._connector = None
        err = self._connect_error
        if err is not None:
            self.failures += 1
            if not self._outage_logged:
                log.warning("Cannot reach %s broker %r (%s); retrying with backoff",
                            self.name, self.where, err)
                self._outage_logged = True
            self._schedule_retry()
            return
        self._first_attempt = False
        self._connecting_since = time.monotonic()
        self.flush()

    # -- driving ----------------------------------------------------------------------------

    def socket(self) -> CoalescingSocket | None:
        """The socket to wait on, or None while disconnected or connecting."""
        if self._connector is not None:
            return None
        sock = self._client.socket()
        return sock if isinstance(sock, CoalescingSocket) else None

    @property
    def backlog(self) -> bool:
        """Bytes already read and not yet handed to paho (reading was paused)."""
        sock = self.socket()
        return sock is not None and sock.buffered > 0 and not self._read_paused()

    @property
    def reading(self) -> bool:
        """False while the owner asked to stop reading (its queue is full)."""
        return not self._read_paused()

    @property
    def busy(self) -> bool:
        """More input is waiting than one wake-up took: the owner should not sleep."""
        sock = self.socket()
        return sock is not None and (sock.saturated or self.backlog)

    def wants_write(self) -> bool:
        sock = self.socket()
        return sock is not None and (sock.wants_write or self._client.want_write())

    def on_readable(self, *, fill: bool = True) -> None:
        """Read what the kernel has and hand complete packets to paho (until paused)."""
        sock = self.socket()
        if sock is None:
            return
        if fill and sock.buffered < FILL_MAX:
            sock.fill()
        paused = self._read_paused
        read = self._client.loop_read
        in_packet = self._client._in_packet  # noqa: SLF001 - is paho inside a packet?
        deliver = self._on_message
        received = time.time()  # one clock read per wake-up, not per message
        while sock.buffered and not paused():
            if deliver is not None and in_packet["command"] == 0 and self._connected:
                buf, pos = sock.buffer
                publish = parse_publish(buf, pos, True)
                if publish is not None:
                    sock.consume(publish.end)
                    deliver(InboundMessage(publish.topic, publish.payload, publish.qos,
                                           publish.mid, publish.dup, received))
                    continue
            if read() != MQTTErrorCode.MQTT_ERR_SUCCESS or self.socket() is not sock:
                return
            in_packet = self._client._in_packet  # noqa: SLF001 - paho replaces it on reconnect
        if sock.eof and not sock.buffered and self.socket() is sock:
            read()  # paho sees end-of-stream and reports the disconnect

    def tick(self, now: float) -> None:
        """Connection management: connect when due, CONNACK timeout, keepalive."""
        if self._connector is not None:
            if self._connector.is_alive():
                return
            self._finish_connect()
        sock = self.socket()
        if sock is None:
            if not self._closing and not self._paused and now >= self._next_attempt:
                self._start_connect()
            return
        if self._connecting_since is not None and now - self._connecting_since > _CONNACK_TIMEOUT:
            log.warning("No CONNACK from %s broker %r", self.name, self.where)
            self._client._sock_close()  # noqa: SLF001 - paho has no public "abort"
            self._schedule_retry()
            return
        if now - self._last_misc >= _MISC_EVERY:
            self._last_misc = now
            self._client.loop_misc()

    def next_wake(self, now: float) -> float:
        """Seconds until tick needs to run again."""
        if self._connector is not None:
            return 0.05
        if self.socket() is None:
            return max(0.0, self._next_attempt - now) if not self._paused else 1.0
        return _MISC_EVERY

    def flush(self) -> None:
        """Send everything paho has queued (acks, publishes) in as few writes as possible."""
        sock = self.socket()
        if sock is None:
            return
        if self._client.want_write():
            self._client.loop_write()
        try:
            sock.flush()
        except OSError:
            # The connection broke; the next read sees it and paho reports the disconnect.
            log.debug("Write to %s broker failed", self.name, exc_info=True)

    def poll(self, timeout: float) -> bool:
        """Drive this link alone for up to ``timeout`` s; True if anything was read."""
        return poll_links([self], timeout)

    # -- operations -------------------------------------------------------------------------

    def subscribe(self, filters: Sequence[tuple[str, int | None]], qos: int) -> None:
        """Subscribe to (filter, subscription identifier or None) pairs."""
        # Retained messages only when the subscription is new: a resumed session must not
        # get every retained value again as if it were a fresh reading.
        options = SubscribeOptions(qos=qos, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
        for topic, sub_id in filters:
            props = None
            if sub_id is not None:
                props = _properties(PacketTypes.SUBSCRIBE)
                props.SubscriptionIdentifier = sub_id
            _, mid = self._client.subscribe(topic, options=options, properties=props)
            if mid is not None:
                self._suback_wait[mid] = topic

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
        return len(self._client._out_messages)  # noqa: SLF001 - no public accessor in paho

    def pause(self) -> None:
        """Disconnect cleanly (session kept) and stay away until ``resume``."""
        if self._paused:
            return
        self._round_trip()
        self._paused = True
        if self.socket() is not None:
            self._client.disconnect()
            self.flush()

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            self._next_attempt = 0.0

    def close(self, *, wait: float = 0.0) -> None:
        """Disconnect cleanly (the will is not sent), after up to ``wait`` s for PUBACKs."""
        deadline = time.monotonic() + wait
        while (self._connected and self.pending_publishes()
               and time.monotonic() < deadline):
            self.poll(0.05)
        self._round_trip()
        self._closing = True
        if self._connector is not None:
            self._connector.join(_CONNECT_TIMEOUT)
            self._connector = None
        if self.socket() is not None:
            self._client.disconnect()
            self.flush()
            sock = self.socket()
            if sock is not None:
                sock.close()
        self._connected = False


def poll_links(links: Sequence[MqttLink], timeout: float, wake: Sequence[int] = ()) -> bool:
    """Wait up to ``timeout`` for traffic on any link, handle it; True if anything was read.

    ``wake`` are file descriptors that end the wait when readable (a sink's worker thread
    handing back a result); their owners drain them, and they do not count as traffic.
    """
    now = time.monotonic()
    for link in links:
        link.tick(now)
    socks: dict[CoalescingSocket, MqttLink] = {}
    writers = []
    backlog = False
    for link in links:
        sock = link.socket()
        if sock is None:
            continue
        if link.reading:
            socks[sock] = link
        if link.wants_write():
            writers.append(sock)
        backlog = backlog or link.backlog
    if not socks and not writers and not wake:
        if timeout > 0:
            time.sleep(min(timeout, *(link.next_wake(now) for link in links)))
        return False
    if not socks and not writers:
        timeout = min(timeout, *(link.next_wake(now) for link in links))
    try:
        waits: list[Any] = [*socks, *wake]
        readable, _, _ = select.select(waits, writers, [], 0 if backlog else timeout)
    except (OSError, ValueError):
        return False  # a socket closed under us; the next tick reconnects
    got = any(sock in socks for sock in readable) or backlog
    for sock, link in socks.items():
        if sock in readable:
            link.on_readable()
        elif link.backlog:
            link.on_readable(fill=False)
    for link in links:
        if link.wants_write():
            link.flush()
    return got
