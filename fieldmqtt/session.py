"""An MQTT v5 client session on the ``mqtt5`` codec, driven by the caller's select loop.

``mqtt5`` (PyPI) reads and writes packets and nothing else; this module keeps the state a
client needs between them: the connection (TCP, optionally TLS through ``ssl``, all
non-blocking), CONNECT/CONNACK, keepalive, subscriptions, inbound QoS 0/1 with the PUBACK
left to the caller, and outbound QoS 1 with an in-flight window that survives reconnects.
No threads: the caller selects on ``fileno()`` (writable when ``wants_write()``), calls
``step()`` when the socket is ready or ``next_timeout()`` has passed, and gets back what
happened as a list of events. Reconnecting (and its backoff) is the caller's policy:
``connect()`` again after ``ConnectionLostError``.

Only public APIs of ``mqtt5``, ``socket`` and ``ssl`` are used.

Errors are in ``fieldmqtt.errors``; the events ``step()`` returns in ``fieldmqtt.events``.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import select
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import mqtt5
from mqtt5 import (
    ConnAckReasonCode,
    DisconnectReasonCode,
    PubAckReasonCode,
    QoS,
    TopicFilter,
    Will,
)

from fieldmqtt.errors import (
    ConnectionLostError,
    ConnectRefusedError,
    NotConnectedError,
    PacketTooLargeError,
    ProtocolViolationError,
    ServerDisconnectError,
    WindowFullError,
    reason_name,
)
from fieldmqtt.events import Connected, Event, Message, Published, Subscribed

# One step reads at most this much: bounds the work (and the events returned) per wake-up so
# one busy socket cannot starve the rest of the caller's loop.
READ_MAX = 1024 * 1024
# A send() is offered at most this much at once; larger amortises system calls, smaller
# returns to the loop sooner on a slow link.
SEND_CHUNK = 256 * 1024
# The PINGRESP must arrive within this share of the keepalive, or the link is dead. Half
# tolerates a slow server; less would declare busy links dead.
PING_GRACE = 0.5


# One entry of socket.getaddrinfo(): (family, type, proto, canonname, sockaddr).
AddressInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, Any]


class State(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"        # TCP connect in progress
    HANDSHAKE = "handshake"          # TLS handshake in progress
    AWAIT_CONNACK = "await_connack"
    CONNECTED = "connected"


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionConfig:
    host: str
    port: int
    client_id: str
    keepalive: int = 60                 # seconds; 0 turns keepalive off
    clean_start: bool = True
    session_expiry: int = 0             # seconds the server keeps the session after we leave
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    tls: ssl.SSLContext | None = None
    server_hostname: str | None = None  # for certificate checks; default: host
    # Our Receive Maximum: unacknowledged QoS 1 messages the server may send us at once.
    receive_maximum: int = 65535
    max_packet_size: int | None = None  # our limit for inbound packets
    # Our own bound on unacknowledged QoS 1 publishes; the server's Receive Maximum may
    # lower it. Larger keeps a long link busy, smaller bounds what is resent after a drop.
    max_inflight: int = 1000
    # QoS 1 publishes the session holds at once, sent and waiting for the window together;
    # None: the window (publish() raises WindowFullError when it is full). A larger queue
    # lets the caller hand over work while disconnected or while the window is full.
    max_queued: int | None = None
    connect_timeout: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.keepalive <= 65535:
            raise ValueError(f"keepalive must be 0..65535 s, got {self.keepalive}")
        if not 1 <= self.receive_maximum <= 65535:
            raise ValueError(f"receive_maximum must be 1..65535, got {self.receive_maximum}")
        if not 1 <= self.max_inflight <= 65535:
            raise ValueError(f"max_inflight must be 1..65535, got {self.max_inflight}")
        if self.max_queued is not None and not 1 <= self.max_queued <= 65000:
            raise ValueError(f"max_queued must be 1..65000, got {self.max_queued}")


class _Outgoing:
    # The packet only: it is encoded again when it goes (rarely: a resend, or a publish that
    # waited for the window). Keeping the encoded bytes too would hold every payload twice.
    __slots__ = ("packet", "sent", "tried")

    def __init__(self, packet: mqtt5.PublishPacket) -> None:
        self.packet = packet
        self.sent = False   # written on the current connection
        self.tried = False  # written on some connection: a resend carries DUP


def _with_dup(p: mqtt5.PublishPacket) -> mqtt5.PublishPacket:
    # mqtt5's packets are read-only: a resend is a new packet with the same fields.
    return mqtt5.PublishPacket(
        p.topic, p.payload, qos=p.qos, retain=p.retain, packet_id=p.packet_id, duplicate=True,
        payload_format_indicator=p.payload_format_indicator,
        message_expiry_interval=p.message_expiry_interval, content_type=p.content_type,
        response_topic=p.response_topic, correlation_data=p.correlation_data,
        user_properties=p.user_properties)


def _is_codec_panic(err: BaseException) -> bool:
    # mqtt5 0.8 raises pyo3's PanicException, a BaseException outside the Exception tree,
    # for a PUBLISH whose topic is not UTF-8. Nothing else in the codec is allowed through.
    return type(err).__name__ == "PanicException"


class MqttSession:
    def __init__(self, config: SessionConfig) -> None:
        self.config = config
        self.state = State.DISCONNECTED
        self.connection = 0                 # increases with every connect()
        self.server_receive_max = 65535
        self.server_max_packet: int | None = None
        self.keepalive = config.keepalive
        self.pings_sent = 0
        self.pongs = 0
        self.pending_subscriptions: set[int] = set()
        self.saturated = False              # the last step read its limit: more may wait
        self.receive_max_exceeded = 0       # QoS 1 messages over our Receive Maximum
        self._sock: socket.socket | None = None
        self._rbuf = b""
        self._wbuf = bytearray()
        self._deadline = 0.0                # connect/CONNACK timeout
        self._last_sent = 0.0
        self._ping_due: float | None = None  # a PINGRESP is owed by then
        self._owed = 0                       # PINGRESPs owed on this connection
        self._outbox: dict[int, _Outgoing] = {}
        self._sent = 0                       # how many in _outbox went out on this connection
        self._next_id = 0
        self._unacked_in = 0                 # inbound QoS 1 the caller has not acked yet
        self._events: list[Event] = []
        self._handshake_wants_write = False
        self._received = 0.0

    # -- the caller's loop -------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    def fileno(self) -> int:
        return self._sock.fileno() if self._sock is not None else -1

    @property
    def connected(self) -> bool:
        return self.state is State.CONNECTED

    def wants_write(self) -> bool:
        if self._sock is None:
            return False
        if self.state is State.CONNECTING:
            return True
        if self.state is State.HANDSHAKE:
            return self._handshake_wants_write
        return bool(self._wbuf)

    def next_timeout(self, now: float | None = None) -> float:
        """Seconds until step() has timed work to do (keepalive, a connect timeout)."""
        now = time.monotonic() if now is None else now
        if self._sock is None:
            return 3600.0
        if self.state is not State.CONNECTED:
            return max(0.0, self._deadline - now)
        due = self._ping_due if self._ping_due is not None else (
            self._last_sent + self.keepalive if self.keepalive else now + 3600.0)
        return max(0.0, due - now)

    def connect(self, address: AddressInfo | None = None) -> None:
        """Start connecting (non-blocking); CONNACK comes as a ``Connected`` event.

        ``address`` is one entry of ``socket.getaddrinfo`` for the host; without it the
        name is resolved here, which blocks while DNS answers (an IP address does not)."""
        self._close()
        cfg = self.config
        if address is None:
            address = socket.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM)[0]
        family, kind, proto, _, addr = address
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            sock.close()
            raise ConnectionLostError(f"{cfg.host}:{cfg.port}",
                                      f"cannot connect: {os.strerror(err)}")
        self._sock = sock
        self.connection += 1
        self.state = State.CONNECTING
        self._deadline = time.monotonic() + cfg.connect_timeout
        self._handshake_wants_write = False

    def step(self, now: float | None = None, *, read: bool = True) -> list[Event]:
        """Do what the socket allows without blocking; return what happened.

        ``read=False`` leaves inbound data in the kernel (the caller's queue is full; TCP
        flow control then holds the server back) and does the rest: connect, keepalive,
        writes. Raises ConnectionLostError (or a subclass) when the connection ended,
        carrying in ``events`` what happened before (handle them); what is in flight stays
        and goes again after the next connect().
        """
        now = time.monotonic() if now is None else now
        self._events = []
        if self._sock is None:
            return self._events
        try:
            if self.state is State.CONNECTING:
                self._finish_tcp(now)
            if self.state is State.HANDSHAKE:
                self._handshake()
            if self.state is State.AWAIT_CONNACK or (read and self.state is State.CONNECTED):
                self._read(now)
            if self.state is not State.CONNECTED and self._sock is not None \
                    and now >= self._deadline:
                self._connect_timed_out()
            if self.state is State.CONNECTED:
                self._keepalive(now)
                self._pump()
            self._flush(now)
        except ConnectionLostError as err:
            err.events = self._events
            self._close()
            raise
        return self._events

    def flush(self) -> None:
        """Write what is queued (acks, publishes) as far as the socket takes it now, and do
        nothing else: the cheap half of ``step(read=False)`` for a caller that just queued
        something. Raises ConnectionLostError as ``step`` does."""
        if not self._wbuf or self.state is not State.CONNECTED:
            return
        try:
            self._flush(time.monotonic())
        except ConnectionLostError as err:
            err.events = []
            self._close()
            raise

    def run_once(self, timeout: float | None = None) -> list[Event]:
        """One select() on this session alone and one step(): for tests and simple tools."""
        if self._sock is None:
            return []
        wait = self.next_timeout() if timeout is None else min(timeout, self.next_timeout())
        select.select([self], [self] if self.wants_write() else [], [], wait)
        return self.step()

    def run_until(self, done: Callable[[], bool], timeout: float) -> list[Event]:
        """run_once() until ``done()``; TimeoutError after ``timeout`` seconds."""
        events: list[Event] = []
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"Condition not met within {timeout:g} s")
            events += self.run_once(min(left, 0.5))
        return events

    # -- what the caller asks for -------------------------------------------------------------

    def subscribe(self, filters: Sequence[TopicFilter], *,
                  subscription_id: int | None = None) -> int:
        """Send SUBSCRIBE; the SUBACK comes as a ``Subscribed`` event with its packet id."""
        for f in filters:
            # int(): at run time mqtt5's enums are not IntEnums (no ordering, no hash).
            if int(f.max_qos) > 1:
                raise ValueError(f"max_qos of {f.pattern!r} must be 0 or 1 "
                                 "(QoS 2 is not implemented)")
        if not self.connected:
            raise NotConnectedError("Subscribe needs a connection; subscribe after Connected")
        pid = self._packet_id()
        self._send(mqtt5.SubscribePacket(pid, list(filters),
                                         subscription_id=subscription_id).write())
        self.pending_subscriptions.add(pid)
        return pid

    @property
    def window(self) -> int:
        return min(self.config.max_inflight, self.server_receive_max)

    @property
    def in_flight(self) -> int:
        return len(self._outbox)

    @property
    def capacity(self) -> int:
        """QoS 1 publishes the session takes before publish() raises WindowFullError."""
        queued = self.config.max_queued
        return self.window if queued is None else max(queued, self.window)

    def can_publish(self) -> bool:
        return len(self._outbox) < self.capacity

    def ping(self) -> int:
        """Send a PINGREQ now; returns the ``pongs`` count its PINGRESP will make. The
        server answers in order, so the PINGRESP also says it has processed everything sent
        before (a barrier, e.g. before a deliberate DISCONNECT)."""
        if not self.connected:
            raise NotConnectedError("Ping needs a connection")
        self._send(mqtt5.PingReqPacket().write())
        self.pings_sent += 1
        self._owed += 1
        if self._ping_due is None:
            self._ping_due = time.monotonic() + max(1.0, self.keepalive * PING_GRACE)
        return self.pongs + self._owed

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False,
                content_type: str | None = None,
                user_properties: list[tuple[str, str]] | None = None,
                response_topic: str | None = None,
                correlation_data: bytes | None = None,
                message_expiry: int | None = None) -> int | None:
        """Send a PUBLISH. QoS 1 returns its packet id and is kept until its PUBACK (also
        across reconnects, resent with DUP); it may be called while disconnected and goes
        out after the next CONNACK, never before. ``message_expiry``: seconds after which
        the broker drops the message if it has not delivered it."""
        if qos not in (0, 1):
            raise ValueError(f"qos must be 0 or 1, got {qos}")
        if qos == 1 and len(self._outbox) >= self.capacity:
            raise WindowFullError(f"{len(self._outbox)} QoS 1 publishes held (room for "
                                  f"{self.capacity}); wait for Published events")
        if qos == 0 and not self.connected:
            raise NotConnectedError("QoS 0 publish without a connection would be lost")
        pid = self._packet_id() if qos else None
        packet = mqtt5.PublishPacket(
            topic, payload, qos=QoS(qos), retain=retain, packet_id=pid,
            content_type=content_type, user_properties=user_properties,
            response_topic=response_topic, correlation_data=correlation_data,
            message_expiry_interval=message_expiry)
        data = packet.write()
        limit = self.server_max_packet
        if limit is not None and len(data) > limit:
            raise PacketTooLargeError(len(data), limit)
        if pid is None:
            self._send(data)
            return None
        out = self._outbox[pid] = _Outgoing(packet)
        if self.connected and self._sent < self.window:
            out.sent = out.tried = True
            self._sent += 1
            self._send(data)
        return pid

    def ack(self, message: Message, reason: PubAckReasonCode = PubAckReasonCode.SUCCESS) -> None:
        """PUBACK a QoS 1 message. One that came on an earlier connection is not acked: the
        server redelivers it (with DUP) on the session's new connection."""
        if message.qos != 1 or message.packet_id is None:
            return
        if message.connection != self.connection or not self.connected:
            return
        self._unacked_in -= 1
        self._send(mqtt5.PubAckPacket(message.packet_id, reason_code=reason).write())

    def ack_all(self, messages: Iterable[Message]) -> None:
        """``ack`` each of ``messages`` (success), in one pass: the caller's acks after a
        group commit."""
        if not self.connected:
            return
        connection = self.connection
        puback = mqtt5.PubAckPacket
        success = PubAckReasonCode.SUCCESS
        wbuf = self._wbuf
        acked = 0
        for message in messages:
            if message.qos == 1 and message.packet_id is not None \
                    and message.connection == connection:
                wbuf += puback(message.packet_id, reason_code=success).write()
                acked += 1
        self._unacked_in -= acked

    def disconnect(self, reason: DisconnectReasonCode = DisconnectReasonCode.NORMAL_DISCONNECTION,
                   *, session_expiry: int | None = None, timeout: float = 1.0) -> None:
        """Send DISCONNECT (NORMAL: the server drops the will), flush up to ``timeout`` s,
        close. What is in flight stays for the next connect()."""
        if self.connected:
            self._send(mqtt5.DisconnectPacket(reason_code=reason,
                                              session_expiry_interval=session_expiry).write())
            deadline = time.monotonic() + timeout
            try:
                while self._wbuf and time.monotonic() < deadline:
                    select.select([], [self], [], max(0.0, deadline - time.monotonic()))
                    self._flush(time.monotonic())
            except ConnectionLostError:
                pass
        self._close()

    # -- connection set-up ----------------------------------------------------------------------

    def _finish_tcp(self, now: float) -> None:
        sock = self._require_sock()
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise ConnectionLostError(self._where, f"cannot connect: {os.strerror(err)}")
        try:
            sock.getpeername()
        except OSError:
            return  # still connecting
        cfg = self.config
        if cfg.tls is not None:
            self._sock = cfg.tls.wrap_socket(sock, server_hostname=cfg.server_hostname or cfg.host,
                                             do_handshake_on_connect=False)
            self.state = State.HANDSHAKE
        else:
            self._send_connect(now)

    def _handshake(self) -> None:
        sock = self._require_sock()
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._handshake_wants_write = False
            return
        except ssl.SSLWantWriteError:
            self._handshake_wants_write = True
            return
        except (ssl.SSLError, OSError) as err:
            raise ConnectionLostError(self._where, f"TLS handshake failed: {err}") from err
        self._send_connect(time.monotonic())

    def _send_connect(self, now: float) -> None:
        cfg = self.config
        self._wbuf.clear()
        self._rbuf = b""
        self._send(mqtt5.ConnectPacket(
            cfg.client_id, username=cfg.username, password=cfg.password,
            clean_start=cfg.clean_start, will=cfg.will, keep_alive=cfg.keepalive,
            session_expiry_interval=cfg.session_expiry, receive_max=cfg.receive_maximum,
            max_packet_size=cfg.max_packet_size).write())
        self.state = State.AWAIT_CONNACK
        self._last_sent = now

    def _on_connack(self, p: mqtt5.ConnAckPacket, now: float) -> None:
        if p.reason_code != ConnAckReasonCode.SUCCESS:
            code = int(p.reason_code)
            raise ConnectRefusedError(
                self._where, f"refused the connection: {reason_name(code)} (0x{code:02x})"
                + (f", {p.reason_str!r}" if p.reason_str else ""), code)
        self.state = State.CONNECTED
        self.server_receive_max = p.receive_max
        self.server_max_packet = p.max_packet_size
        if p.server_keep_alive is not None:
            self.keepalive = p.server_keep_alive
        self._ping_due = None
        self._last_sent = now
        self._unacked_in = 0
        self.pending_subscriptions.clear()
        # Everything unacknowledged goes again, in order, as far as the window allows. With
        # the session present the server may have seen it: DUP tells it so.
        self._sent = 0
        for out in self._outbox.values():
            out.sent = False
            if p.session_present and out.tried and not out.packet.duplicate:
                out.packet = _with_dup(out.packet)
        self._events.append(Connected(p.session_present, p.receive_max, p.max_packet_size,
                                      self.keepalive, p.assigned_client_id))

    # -- reading --------------------------------------------------------------------------------

    def _read(self, now: float) -> None:
        sock = self._require_sock()
        chunks = [self._rbuf] if self._rbuf else []
        total = 0
        eof = False
        self.saturated = False
        # A TLS socket returns one record per recv, so only a plain one's short read means
        # the kernel's buffer is empty.
        plain = self.config.tls is None
        while total < READ_MAX:
            try:
                data = sock.recv(SEND_CHUNK)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except OSError as err:
                raise ConnectionLostError(self._where, f"the connection broke: "
                                               f"{err.strerror or err}") from err
            if not data:
                eof = True
                break
            chunks.append(data)
            total += len(data)
            if len(data) < SEND_CHUNK and plain:
                break  # the kernel had no more: spare the recv that would say so
        else:
            self.saturated = True
        buf = b"".join(chunks)
        self._received = time.time()
        view = memoryview(buf)
        pos = 0
        size = len(buf)
        read = mqtt5.read
        while pos < size:
            try:
                packet, used = read(view[pos:])
            except IndexError:
                break  # incomplete: wait for more
            except ValueError as err:
                self._violation(DisconnectReasonCode.MALFORMED_PACKET, str(err))
            except BaseException as err:
                if not _is_codec_panic(err):
                    raise
                self._violation(DisconnectReasonCode.MALFORMED_PACKET, "undecodable packet")
            pos += used
            self._handle(packet, now)
            if self._sock is None:
                return
        self._rbuf = buf[pos:]
        limit = self.config.max_packet_size or 268_435_460
        if len(self._rbuf) > limit:
            self._violation(DisconnectReasonCode.PACKET_TOO_LARGE,
                            f"a packet over {limit} bytes")
        if eof:
            raise ConnectionLostError(self._where, "the server closed the connection")

    def _handle(self, p: mqtt5.Packet, now: float) -> None:
        if isinstance(p, mqtt5.PublishPacket):
            if self.state is not State.CONNECTED:
                self._violation(DisconnectReasonCode.PROTOCOL_ERROR, "PUBLISH before CONNACK")
            if p.qos == QoS.EXACTLY_ONCE:
                self._violation(DisconnectReasonCode.QOS_NOT_SUPPORTED, "QoS 2 PUBLISH")
            if p.qos == QoS.AT_LEAST_ONCE:
                self._unacked_in += 1
                # Over our Receive Maximum: the spec allows a DISCONNECT (0x93), but
                # Mosquitto 2.0 does not hold to it after a reconnect, and dropping the link
                # would only make it send everything again. Counted; the caller bounds
                # reading (step(read=False)) instead.
                if self._unacked_in > self.config.receive_maximum:
                    self.receive_max_exceeded += 1
            self._events.append(Message(
                p.topic, p.payload, int(p.qos), p.packet_id, p.duplicate, p.retain,
                tuple(p.subscription_ids), p.content_type, tuple(p.user_properties),
                p.response_topic, p.correlation_data, self.connection, self._received))
        elif isinstance(p, mqtt5.PubAckPacket):
            out = self._outbox.pop(p.packet_id, None)
            if out is None:
                return  # an ack for something already acked (a resend): nothing to do
            if out.sent:
                self._sent -= 1
            self._events.append(Published(p.packet_id, p.reason_code))
        elif isinstance(p, mqtt5.PingRespPacket):
            self._ping_due = None
            self.pongs += 1
            self._owed = max(0, self._owed - 1)
        elif isinstance(p, mqtt5.SubAckPacket):
            self.pending_subscriptions.discard(p.packet_id)
            self._events.append(Subscribed(p.packet_id, tuple(p.reason_codes)))
        elif isinstance(p, mqtt5.ConnAckPacket):
            if self.state is not State.AWAIT_CONNACK:
                self._violation(DisconnectReasonCode.PROTOCOL_ERROR, "a second CONNACK")
            self._on_connack(p, now)
        elif isinstance(p, mqtt5.DisconnectPacket):
            raise ServerDisconnectError(self._where, int(p.reason_code), p.reason_str)
        elif isinstance(p, mqtt5.UnsubAckPacket):
            pass
        else:
            self._violation(DisconnectReasonCode.PROTOCOL_ERROR,
                            f"unexpected {type(p).__name__}")

    def _connect_timed_out(self) -> NoReturn:
        raise ConnectionLostError(self._where, f"no CONNACK within "
                                               f"{self.config.connect_timeout:g} s")

    def _violation(self, reason: DisconnectReasonCode, what: str) -> NoReturn:
        """Tell the server why (best effort) and end the connection."""
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.send(mqtt5.DisconnectPacket(reason_code=reason).write())
        raise ProtocolViolationError(self._where, f"the server sent {what}; disconnected with "
                                     f"{reason_name(int(reason))}", int(reason))

    # -- writing --------------------------------------------------------------------------------

    def _keepalive(self, now: float) -> None:
        if self._ping_due is not None:
            if now >= self._ping_due:
                raise ConnectionLostError(self._where, f"no PINGRESP within "
                                          f"{self.keepalive * PING_GRACE:g} s")
        elif self.keepalive and now - self._last_sent >= self.keepalive:
            self._send(mqtt5.PingReqPacket().write())
            self.pings_sent += 1
            self._owed += 1
            self._ping_due = now + max(1.0, self.keepalive * PING_GRACE)

    def _pump(self) -> None:
        """Send unsent in-flight publishes while the window has room (after a reconnect)."""
        if self._sent >= self.window or self._sent == len(self._outbox):
            return
        for out in self._outbox.values():
            if self._sent >= self.window:
                break
            if not out.sent:
                out.sent = out.tried = True
                self._sent += 1
                self._send(out.packet.write())

    def _send(self, data: bytes) -> None:
        self._wbuf += data

    def _flush(self, now: float) -> None:
        sock = self._sock
        if sock is None or not self._wbuf or self.state in (State.CONNECTING, State.HANDSHAKE):
            return
        while self._wbuf:
            try:
                n = sock.send(self._wbuf[:SEND_CHUNK])
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except OSError as err:
                raise ConnectionLostError(self._where, f"the connection broke: "
                                               f"{err.strerror or err}") from err
            del self._wbuf[:n]
            self._last_sent = now

    # -- helpers --------------------------------------------------------------------------------

    def _packet_id(self) -> int:
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._outbox and self._next_id not in \
                    self.pending_subscriptions:
                return self._next_id
        raise WindowFullError("All 65535 packet ids are in use")

    def _require_sock(self) -> socket.socket:
        if self._sock is None:
            raise NotConnectedError("No connection")
        return self._sock

    def _close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None
        self.state = State.DISCONNECTED
        self._owed = 0
        self._wbuf.clear()
        self._rbuf = b""
        self._ping_due = None
        self._sent = 0
        for out in self._outbox.values():
            out.sent = False
