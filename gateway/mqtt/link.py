"""The gateway's MQTT links (site and cloud), driven by the daemon's one loop.

Each link is a ``fieldmqtt.session.MqttSession`` (MQTT v5 on the ``mqtt5`` codec; public
APIs only) plus the policy a long-running gateway needs around it: when to reconnect, what
to log, callbacks for its owner. ``poll_links`` waits on every link's socket at once; each
session reads everything its socket has in one system call and writes in one.

When to reconnect is ``gateway.mqtt.reconnect``'s policy.
"""

from __future__ import annotations

import ipaddress
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from mqtt5 import (
    QoS,
    RetainHandling,
    SubAckReasonCode,
    TopicFilter,
    Will,
)

from fieldmqtt import (
    AddressInfo,
    Connected,
    ConnectionLostError,
    ConnectRefusedError,
    Event,
    Message,
    MqttSession,
    Published,
    ServerDisconnectError,
    SessionConfig,
    Subscribed,
    reason_name,
)
from gateway.backoff import Backoff
from gateway.config import Link
from gateway.mqtt.reconnect import Reconnect

log = logging.getLogger(__name__)

# An inbound PUBLISH as the link's owner gets it (fieldmqtt's record, with its receive time).
InboundMessage = Message

# Before a deliberate DISCONNECT we wait (this long at most) for one round trip, so that the
# broker has processed our last PUBACKs: Mosquitto 2.0 was seen to forget PUBACKs that
# arrived just before a DISCONNECT, and redeliver those messages in the next session.
_BARRIER_TIMEOUT = 1.0
# QoS 1 publishes a link holds (sent or waiting for the window) before publish() refuses.
_MAX_QUEUED = 60_000
_TCP_TIMEOUT = 10.0
_IDLE = 3600.0


def puback_reason(code: int) -> str:
    """The name of a PUBACK reason code (and of 0x95, which brokers send too)."""
    return reason_name(code)


def packet_size(topic: str, payload: bytes, properties: int) -> int:
    """Bytes of a QoS 1 PUBLISH packet with ``properties`` bytes of properties: what a
    broker's Maximum Packet Size is compared with (the uplink sizes batches by it)."""
    remaining = 2 + len(topic.encode()) + 2 + _varint_len(properties) + properties + len(payload)
    return 1 + _varint_len(remaining) + remaining


def valid_topic_name(topic: str, max_bytes: int = 65535) -> bool:
    """A topic one can publish to: not empty, no wildcard or NUL, at most ``max_bytes``
    (e.g. a request's Response Topic, before answering on it)."""
    return 0 < len(topic.encode()) <= max_bytes and not any(c in topic for c in "+#\0")


def _varint_len(value: int) -> int:
    return 1 if value < 128 else 2 if value < 16_384 else 3 if value < 2_097_152 else 4


def _numeric(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _Resolver:
    """getaddrinfo in a short-lived thread: DNS may take seconds, the loop must not wait."""

    def __init__(self, host: str, port: int) -> None:
        self.result: AddressInfo | None = None
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._run, args=(host, port),
                                        name=f"resolve-{host}", daemon=True)
        self._thread.start()

    def _run(self, host: str, port: int) -> None:
        try:
            self.result = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        except OSError as err:
            self.error = err

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()


class MqttLink:
    """An MQTT v5 session whose socket is driven by the owner's loop.

    ``on_connected`` runs after every successful CONNACK (subscribe or publish a birth
    message there); ``on_message`` gets each inbound PUBLISH (QoS 1 ones are acknowledged
    by ``ack`` when ``manual_ack``, else at once); ``on_published`` gets (packet id, reason
    code) for each PUBACK (below 0x80 is success); ``read_paused`` stops reading while it
    returns True.
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
        max_packet_in: int | None = None,
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
        self._reconnect = Reconnect(backoff)
        self._manual_ack = manual_ack
        self._on_connected = on_connected
        self._on_subscribed = on_subscribed
        self._on_message = on_message
        self._on_published = on_published
        self._on_state = on_state
        self._read_paused = read_paused or (lambda: False)
        self._suback_wait: dict[int, list[str]] = {}  # SUBSCRIBE packet id -> its filters
        self._retry_at = 0.0
        self._resolver: _Resolver | None = None
        self._was_up = False         # the last attempt's connection reached CONNACK
        self._outage_logged = False
        self._closing = False
        self._paused = False
        self.connects = 0
        self.failures = 0
        password = link.password()
        self.session = MqttSession(SessionConfig(
            host=link.host,
            port=link.port,
            client_id=client_id,
            keepalive=int(link.keepalive),
            clean_start=clean_start,
            session_expiry=int(session_expiry),
            username=link.username,
            password=password.encode() if password is not None else None,
            will=(Will(will[0], payload=will[1], qos=QoS.AT_LEAST_ONCE, retain=True)
                  if will is not None else None),
            tls=link.ssl_context(name) if link.tls else None,
            receive_maximum=receive_maximum or 65535,
            max_inflight=max_inflight,
            max_packet_size=max_packet_in,
            max_queued=_MAX_QUEUED,
            connect_timeout=_TCP_TIMEOUT,
        ))

    # -- what the owner reads -------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.session.connected

    @property
    def where(self) -> str:
        return f"{self._link.host}:{self._link.port}"

    @property
    def server_receive_maximum(self) -> int:
        """The broker's Receive Maximum from its last CONNACK."""
        return self.session.server_receive_max

    @property
    def server_max_packet(self) -> int | None:
        """The broker's Maximum Packet Size from its last CONNACK (None: no limit said)."""
        return self.session.server_max_packet

    @property
    def reading(self) -> bool:
        """False while the owner asked to stop reading (its queue is full)."""
        return not self._read_paused()

    @property
    def busy(self) -> bool:
        """More input may be waiting than one wake-up took: the owner should not sleep."""
        return self.session.saturated and self.reading

    def fileno(self) -> int:
        return self.session.fileno()

    def wants_write(self) -> bool:
        return self.session.wants_write()

    def pending_publishes(self) -> int:
        """QoS 1 publishes the broker has not acknowledged yet."""
        return self.session.in_flight

    # -- driving --------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Connection management: connect when due; step a session that has timed work."""
        session = self.session
        if session.fileno() < 0:
            if self._resolver is not None:
                if self._resolver.done:
                    self._connect_resolved()
                return
            if not self._closing and not self._paused and now >= self._retry_at:
                self._start_attempt()
            return
        if session.next_timeout(now) <= 0:
            self._step(now, read=False)

    def next_wake(self, now: float) -> float:
        """Seconds until tick needs to run again."""
        if self._resolver is not None:
            return 0.05
        if self.session.fileno() < 0:
            if self._closing or self._paused:
                return _IDLE
            return max(0.0, self._retry_at - now)
        return self.session.next_timeout(now)

    def on_ready(self, *, read: bool) -> None:
        """The socket is readable or writable (or timed work is due): step the session."""
        self._step(time.monotonic(), read=read and self.reading)

    def flush(self) -> None:
        """Send what is queued (acks, publishes) as far as the socket takes it now."""
        session = self.session
        if not session.wants_write():
            return
        if not session.connected:
            self._step(time.monotonic(), read=False)
            return
        try:
            session.flush()
        except ConnectionLostError as err:
            self._lost(err)

    def poll(self, timeout: float) -> bool:
        """Drive this link alone for up to ``timeout`` s; True if anything was read."""
        return poll_links([self], timeout)

    def _step(self, now: float, *, read: bool) -> None:
        try:
            events = self.session.step(now, read=read)
        except ConnectionLostError as err:
            self._handle(err.events)
            self._lost(err)
            return
        self._handle(events)

    def _handle(self, events: list[Event]) -> None:
        for event in events:
            if type(event) is Message:
                self._deliver(event)
            elif type(event) is Published:
                if self._on_published is not None:
                    self._on_published(event.packet_id, int(event.reason_code))
            elif type(event) is Connected:
                self._connected()
            elif type(event) is Subscribed:
                self._subscribed(event)

    def _deliver(self, msg: Message) -> None:
        if self._on_message is not None:
            self._on_message(msg)
        if not self._manual_ack and msg.qos == 1:
            self.session.ack(msg)

    # -- connecting -----------------------------------------------------------------------------

    def _start_attempt(self) -> None:
        host, port = self._link.host, self._link.port
        if _numeric(host):
            try:
                address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                             flags=socket.AI_NUMERICHOST)[0]
            except OSError as err:
                self._failed(str(err), refused=False)
                return
            self._connect(address)
        else:
            self._resolver = _Resolver(host, port)

    def _connect_resolved(self) -> None:
        resolver = self._resolver
        assert resolver is not None
        self._resolver = None
        if resolver.result is None:
            self._failed(f"cannot resolve {self._link.host!r}: {resolver.error}", refused=False)
            return
        self._connect(resolver.result)

    def _connect(self, address: AddressInfo) -> None:
        try:
            self.session.connect(address)
        except ConnectionLostError as err:
            self._failed(self._why(err), refused=False)
        except OSError as err:
            self._failed(err.strerror or str(err), refused=False)

    def _connected(self) -> None:
        self._was_up = True
        self._suback_wait.clear()
        self._reconnect.connected()
        self.connects += 1
        if not self.session.connected:
            return  # CONNACK and the end of the connection came in one read
        if self._outage_logged or self.connects == 1:
            log.info("Connected to %s broker %r", self.name, self.where)
        self._outage_logged = False
        if self._on_state is not None:
            self._on_state(True)
        if self._on_connected is not None:
            self._on_connected()

    def _lost(self, err: ConnectionLostError) -> None:
        was_up = self.session.connection > 0 and self._was_up
        self._was_up = False
        code = err.reason_code
        if isinstance(err, ConnectRefusedError):
            why = f"refused the connection: {reason_name(code or 0x80)}"
            self._failed(why, refused=True)
            return
        if not was_up:
            self._failed(self._why(err), refused=False)
            return
        if self._on_state is not None:
            self._on_state(False)
        if not self._closing and not self._paused:
            log.warning("Lost %s broker %r (%s); reconnecting", self.name, self.where,
                        self._why(err))
            self._outage_logged = True
        self._retry_at = time.monotonic() + self._reconnect.after_lost(code)

    @staticmethod
    def _why(err: ConnectionLostError) -> str:
        if isinstance(err, ServerDisconnectError):
            code = err.reason_code or 0
            why = f"broker sent DISCONNECT: {reason_name(code)} (0x{code:02x})"
            return f"{why}: {err.reason_string!r}" if err.reason_string else why
        return err.why.replace("the server", "the broker")

    def _failed(self, why: str, *, refused: bool) -> None:
        """An attempt that did not get to CONNACK."""
        self.failures += 1
        if refused:
            if not self._outage_logged:
                log.error("%s broker %r %s; retrying with backoff", self.name.capitalize(),
                          self.where, why)
                self._outage_logged = True
            self._retry_at = time.monotonic() + self._reconnect.after_failed(refused=True)
            return
        if not self._outage_logged:
            log.warning("Cannot reach %s broker %r (%s); retrying every second", self.name,
                        self.where, why)
            self._outage_logged = True
        self._retry_at = time.monotonic() + self._reconnect.after_failed(refused=False)

    # -- subscriptions --------------------------------------------------------------------------

    def subscribe(self, filters: Sequence[tuple[str, int | None]], qos: int) -> None:
        """Subscribe to (filter, subscription identifier or None) pairs. Retained messages
        come only when the subscription is new: a resumed session must not get every
        retained value again as if it were a fresh reading."""
        def topic_filter(pattern: str) -> TopicFilter:
            return TopicFilter(pattern, max_qos=QoS(qos),
                               retain_handling=RetainHandling.SEND_IF_SUBSCRIPTION_NOT_EXISTS)
        plain = [topic for topic, sub_id in filters if sub_id is None]
        groups: list[tuple[list[str], int | None]] = [(plain, None)] if plain else []
        groups += [([topic], sub_id) for topic, sub_id in filters if sub_id is not None]
        for topics, sub_id in groups:
            pid = self.session.subscribe([topic_filter(t) for t in topics],
                                         subscription_id=sub_id)
            self._suback_wait[pid] = topics

    def _subscribed(self, event: Subscribed) -> None:
        topics = self._suback_wait.pop(event.packet_id, None)
        if topics is None:
            return
        for topic, rc in zip(topics, event.reason_codes, strict=False):
            if int(rc) >= 0x80:
                log.error("%s broker %r refused the subscription to %r: %s; check its ACL",
                          self.name.capitalize(), self.where, topic,
                          str(SubAckReasonCode(rc).name).replace("_", " ").capitalize())
        if not self._suback_wait and self._on_subscribed is not None:
            self._on_subscribed()

    # -- operations -----------------------------------------------------------------------------

    def ack(self, message: InboundMessage) -> None:
        """Acknowledge a QoS 1 message (one from an earlier connection is redelivered)."""
        self.session.ack(message)

    def ack_all(self, messages: Sequence[InboundMessage]) -> None:
        """``ack`` each of ``messages`` (those of QoS 0 are skipped)."""
        self.session.ack_all(messages)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                user_properties: list[tuple[str, str]] | None = None,
                content_type: str | None = None, correlation_data: bytes | None = None,
                message_expiry: int | None = None) -> int:
        """Send or queue a publish; returns its packet id (PUBACK comes to ``on_published``;
        0 for QoS 0). QoS 1 publishes made while disconnected go out after the next CONNACK,
        never before. ``correlation_data`` answers a request that carried it;
        ``message_expiry`` (seconds) lets the broker drop what it could not deliver in time."""
        pid = self.session.publish(topic, payload, qos=qos, retain=retain,
                                   content_type=content_type, user_properties=user_properties,
                                   correlation_data=correlation_data,
                                   message_expiry=message_expiry)
        return pid or 0

    def _round_trip(self) -> None:
        """Wait until the broker has processed everything we sent so far (or a timeout)."""
        if not self.connected:
            return
        target = self.session.ping()
        deadline = time.monotonic() + _BARRIER_TIMEOUT
        while self.connected and self.session.pongs < target and time.monotonic() < deadline:
            poll_links([self], 0.02)

    def pause(self) -> None:
        """Disconnect cleanly (session kept) and stay away until ``resume``."""
        if self._paused:
            return
        self._round_trip()
        self._paused = True
        self._disconnect()

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            self._retry_at = 0.0

    def close(self, *, wait: float = 0.0) -> None:
        """Disconnect cleanly (the will is not sent), after up to ``wait`` s for PUBACKs."""
        deadline = time.monotonic() + wait
        while self.connected and self.pending_publishes() and time.monotonic() < deadline:
            self.poll(0.05)
        self._round_trip()
        self._closing = True
        self._disconnect()

    def _disconnect(self) -> None:
        was = self.connected
        self.session.disconnect()
        self._was_up = False
        if was and self._on_state is not None:
            self._on_state(False)


def poll_links(links: Sequence[MqttLink], timeout: float, wake: Sequence[int] = ()) -> bool:
    """Wait up to ``timeout`` for traffic on any link, handle it; True if anything was read.

    ``wake`` are file descriptors that end the wait when readable (a sink's worker thread
    handing back a result); their owners drain them, and they do not count as traffic.
    """
    now = time.monotonic()
    readers: dict[int, MqttLink] = {}
    writers: dict[int, MqttLink] = {}
    busy = False
    for link in links:
        link.tick(now)
        timeout = min(timeout, link.next_wake(now))
        fd = link.fileno()
        if fd < 0:
            continue
        if link.reading or not link.connected:  # a CONNACK is always read
            readers[fd] = link
            busy = busy or link.busy
        if link.wants_write():
            writers[fd] = link
    if not readers and not writers and not wake:
        if timeout > 0:
            time.sleep(timeout)
        return False
    try:
        waits: list[Any] = [*readers, *wake]
        readable, writable, _ = select.select(waits, list(writers), [], 0 if busy else timeout)
    except (OSError, ValueError):
        return False  # a socket closed under us; the next tick reconnects
    got = False
    done: set[int] = set()
    for fd in readable:
        if fd in readers:
            got = True
            done.add(fd)
            readers[fd].on_ready(read=True)
    for fd in writable:
        if fd not in done:
            done.add(fd)
            writers[fd].on_ready(read=False)
    if busy:
        for fd, link in readers.items():
            if fd not in done and link.busy:
                got = True
                link.on_ready(read=True)
    return got
