"""``devices simulate-gateways``: a fleet of gateways' uplinks on the cloud broker.

The messages come from ``devices.gateway_model`` (what each gateway sends, when); this
module paces them on the wall clock and publishes them at QoS 1 through ``fieldmqtt``
sessions, driven by its own poll loop (no threads). The gateways share ``connections``
sessions (gateway i on session i % connections); with one session per gateway each has the
gateway's last will (retained ``offline`` status), as a real gateway's link does.

Each gateway's retained ``online`` status goes first (birth message, again after a
reconnect and every minute), ``offline`` (reason ``shutdown``) last. With ``resend`` each
session subscribes to its gateways' ``fieldgate/{id}/resend`` and answers requests from the
history the model keeps (ISSUE12.md): the range re-published with user property
``resend`` = request_id, then the reply on the request's Response Topic with its
Correlation Data; a second request within a second, or while one is being sent, is "busy".
"""

from __future__ import annotations

import random
import secrets
import select
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
from mqtt5 import QoS, TopicFilter, Will

from devices import __version__
from devices import uplink_wire as wire
from devices.broker import broker as broker_at
from devices.gateway_model import GatewayFleet, Uplink
from fieldmqtt import (
    Connected,
    ConnectionLostError,
    ConnectRefusedError,
    Event,
    Message,
    MqttSession,
    PacketTooLargeError,
    Published,
    SessionConfig,
)

# Unacknowledged QoS 1 publishes per session (the broker's Receive Maximum may lower it).
# Larger keeps the broker busy, smaller bounds what goes again after a lost connection.
_WINDOW = 10_000
# Messages taken from the model per turn: larger amortises the loop, smaller reads PUBACKs
# and resend requests sooner.
_TAKE = 2000
# Messages waiting for a session's window, all sessions together, before the schedule
# waits (and its messages go out late, counted).
_PENDING_MAX = 50_000
_MAX_SLEEP = 0.05
# A message published this much after its time counts as late.
_LATE = 1.0
_FIRST_CONNECT = 15.0
_PROBE = 1.0            # a lost session tries again after this (times a 0.5-1 jitter)
_KEEPALIVE = 30
_DRAIN = 30.0           # at the end, wait at most this long for the last PUBACKs
# A gateway republishes its retained status this often (uplink.status_interval's default).
_STATUS_EVERY = 60.0
# Resend filters per SUBSCRIBE packet.
_FILTERS_PER_SUBSCRIBE = 500
_RESEND_MIN_INTERVAL = 1.0


@dataclass(slots=True)
class GatewayStats:
    first: int = 0          # lowest seq published (0: none)
    last: int = 0           # highest seq published
    batches: int = 0
    readings: int = 0
    events: int = 0
    late: int = 0
    resend_requests: int = 0
    resent: int = 0         # messages re-published for resend requests


@dataclass(slots=True)
class FleetStats:
    gateways: list[GatewayStats]
    batches: int = 0
    readings: int = 0
    events: int = 0
    late: int = 0
    worst_lag: float = 0.0
    refused_by_broker: int = 0
    unacked: int = 0
    reconnects: int = 0
    elapsed: float = 0.0


@dataclass(slots=True)
class _Conn:
    session: MqttSession
    gateways: list[int]
    pending: deque[tuple[str, bytes, int, wire.Properties | None, str | None,
                         str | None, bytes | None, Uplink | None]] = \
        field(default_factory=deque)
    retry_at: float = 0.0
    down_since: float | None = None
    mask: int = 0


class GatewaySimulator:
    def __init__(self, fleet: GatewayFleet, *, broker: str, connections: int = 1,
                 resend: bool = False, say: Callable[[str], None] = print,
                 username: str | None = None, password: bytes | None = None,
                 ca_file: str | None = None) -> None:
        where = broker_at(broker, ca_file=ca_file, username=username, password=password)
        if not 1 <= connections <= min(fleet.count, 10_000):
            raise ValueError(f"--connections must be 1..{min(fleet.count, 10_000)} "
                             "(at most one per gateway)")
        self.fleet = fleet
        self.stats = FleetStats([GatewayStats() for _ in range(fleet.count)])
        self._say = say
        self._resend = resend
        self._last_request: dict[int, float] = {}
        self._index = {g.id: i for i, g in enumerate(fleet.gateways)}
        run = secrets.token_hex(3)
        self._conns: list[_Conn] = []
        for c in range(connections):
            members = list(range(c, fleet.count, connections))
            will = None
            if connections == fleet.count:  # one gateway per session: its own last will
                gw = fleet.gateways[c].id
                will = Will(wire.status_topic(gw), payload=wire.status(
                    gw, "offline", version=__version__, when=fleet.start, readings=0,
                    reason="connection lost"), qos=QoS.AT_LEAST_ONCE, retain=True)
            name = fleet.gateways[c].id if connections == fleet.count else f"s{c}"
            self._conns.append(_Conn(MqttSession(SessionConfig(
                host=where.host, port=where.port, client_id=f"fleetgen-{run}-{name}",
                keepalive=_KEEPALIVE, username=username, password=password, tls=where.tls,
                will=will, max_inflight=_WINDOW)), members))
        self._by_fd: dict[int, _Conn] = {}
        self._poll = select.poll()
        self._t0 = 0.0
        self._status_at = 0.0

    # -- the run ------------------------------------------------------------------------------

    def run(self, duration: float, stop: Callable[[], bool]) -> FleetStats:
        """Publish until ``duration`` wall seconds passed (0: forever) or ``stop()``.

        Raises ``fieldmqtt.MqttError`` or OSError when the first connections fail."""
        self._connect_all()
        fleet, stats = self.fleet, self.stats
        self._t0 = t0 = time.monotonic()
        self._status_at = t0 + _STATUS_EVERY
        pending_total = 0
        try:
            while not stop():
                now = time.monotonic()
                if duration and now - t0 >= duration:
                    break
                pending_total = sum(len(c.pending) for c in self._conns)
                if pending_total < _PENDING_MAX:
                    for out in fleet.due(now - t0, _TAKE):
                        self._queue(out)
                if now >= self._status_at:
                    self._status_at += _STATUS_EVERY
                    for conn in self._conns:
                        if conn.session.connected:
                            self._births(conn, "online")
                busy = self._publish_all(now)
                if busy:
                    wait = 0.0
                else:
                    wait = min(max(fleet.next_due() - (time.monotonic() - t0), 0.0), _MAX_SLEEP)
                self._turn(wait)
            self._drain()
        finally:
            stats.elapsed = time.monotonic() - t0
            for conn in self._conns:
                conn.session.disconnect()
        return stats

    def _connect_all(self) -> None:
        for conn in self._conns:
            conn.session.connect()
            self._watch(conn)
        deadline = time.monotonic() + _FIRST_CONNECT
        while not all(c.session.connected and not c.session.pending_subscriptions
                      for c in self._conns):
            if time.monotonic() > deadline:
                for conn in self._conns:
                    conn.session.disconnect()
                first = self._conns[0].session.config
                raise ConnectionLostError(
                    f"{first.host}:{first.port}",
                    f"no CONNACK (or SUBACK) from the broker within {_FIRST_CONNECT:g} s")
            self._turn(_MAX_SLEEP, first=True)

    def _drain(self) -> None:
        """Publish what is queued, the offline statuses, and wait for the last PUBACKs."""
        deadline = time.monotonic() + _DRAIN
        for conn in self._conns:
            self._births(conn, "offline", reason="shutdown")
        while time.monotonic() < deadline and any(
                c.pending or c.session.in_flight or c.session.wants_write()
                for c in self._conns):
            busy = self._publish_all(time.monotonic())
            self._turn(0.0 if busy else _MAX_SLEEP)
        self.stats.unacked = sum(len(c.pending) + c.session.in_flight for c in self._conns)

    # -- publishing ---------------------------------------------------------------------------

    def _queue(self, out: Uplink) -> None:
        if out.withheld:
            return  # --gap-every: the cloud never sees it (a resend may bring it)
        conn = self._conns[out.gw % len(self._conns)]
        conn.pending.append((out.topic, out.payload, 1, out.props, out.content_type,
                             None, None, out))

    def _births(self, conn: _Conn, state: str, **extra: str) -> None:
        for gw in conn.gateways:
            gateway = self.fleet.gateways[gw]
            conn.pending.append((wire.status_topic(gateway.id), wire.status(
                gateway.id, state, version=__version__, when=round(time.time(), 3),
                readings=gateway.made, **extra), 2, None, wire.TELEMETRY_TYPE,
                None, None, None))

    def _publish_all(self, now: float) -> bool:
        """Hand queued messages to the sessions; True if some could go on right away."""
        busy = False
        for conn in self._conns:
            if conn.pending and conn.session.connected:
                self._publish(conn, now)
                if conn.pending and conn.session.can_publish():
                    busy = True
        return busy

    def _publish(self, conn: _Conn, now: float) -> None:
        session, stats, pending = conn.session, self.stats, conn.pending
        elapsed = now - self._t0
        sent = False
        while pending and session.can_publish():
            topic, payload, kind, props, ctype, rtopic, corr, out = pending[0]
            try:
                session.publish(topic, payload, qos=1, retain=kind == 2, content_type=ctype,
                                user_properties=props, response_topic=rtopic,
                                correlation_data=corr)
            except PacketTooLargeError as err:
                stats.refused_by_broker += 1
                self._say(f"Not sent on {topic!r}: {err}")
            pending.popleft()
            sent = True
            if out is None:
                continue
            gw = stats.gateways[out.gw]
            if out.readings:
                gw.batches += 1
                gw.readings += out.readings
                stats.batches += 1
                stats.readings += out.readings
            else:
                gw.events += 1
                stats.events += 1
            if not gw.first or out.first < gw.first:
                gw.first = out.first
            gw.last = max(gw.last, out.last)
            if any(k == "resend" for k, _ in out.props):
                gw.resent += 1
                continue
            lag = elapsed - out.t
            if lag > _LATE:
                gw.late += 1
                stats.late += 1
                stats.worst_lag = max(stats.worst_lag, lag)
        if sent:
            self._step(conn)

    # -- the connections ----------------------------------------------------------------------

    def _watch(self, conn: _Conn) -> None:
        fd = conn.session.fileno()
        if fd >= 0:
            self._by_fd[fd] = conn
            conn.mask = select.POLLIN
            self._poll.register(fd, conn.mask)

    def _unwatch(self, conn: _Conn, fd: int) -> None:
        if self._by_fd.pop(fd, None) is not None:
            self._poll.unregister(fd)

    def _turn(self, timeout: float, *, first: bool = False) -> None:
        now = time.monotonic()
        for conn in self._conns:
            session = conn.session
            fd = session.fileno()
            if fd < 0:
                if now >= conn.retry_at:
                    try:
                        session.connect()
                        self._watch(conn)
                    except (ConnectionLostError, OSError) as err:
                        self._lost(conn, err, first=first)
                continue
            mask = select.POLLIN | (select.POLLOUT if session.wants_write() else 0)
            if mask != conn.mask:
                conn.mask = mask
                self._poll.modify(fd, mask)
            timeout = min(timeout, session.next_timeout(now))
        ready = self._poll.poll(max(0.0, timeout) * 1000)
        for fd, _ in ready:
            found = self._by_fd.get(fd)
            if found is not None:
                self._step(found, first=first)
        if not ready:  # timed work (keepalive, connect timeouts) of every session
            for conn in self._conns:
                if conn.session.fileno() >= 0 and conn.session.next_timeout() <= 0:
                    self._step(conn, first=first)

    def _step(self, conn: _Conn, *, first: bool = False) -> None:
        session = conn.session
        fd = session.fileno()
        try:
            events = session.step()
        except ConnectionLostError as err:
            self._unwatch(conn, fd)
            self._handle(conn, err.events)
            self._lost(conn, err, first=first)
            return
        self._handle(conn, events)

    def _lost(self, conn: _Conn, err: Exception, *, first: bool) -> None:
        if first and isinstance(err, ConnectRefusedError):
            raise err
        now = time.monotonic()
        if conn.down_since is None:
            conn.down_since = now
            self._say(f"Lost the broker ({err}); reconnecting")
        conn.retry_at = now + _PROBE * random.uniform(0.5, 1.0)

    def _handle(self, conn: _Conn, events: list[Event]) -> None:
        for event in events:
            if type(event) is Published:
                if int(event.reason_code) >= 0x80:
                    self.stats.refused_by_broker += 1
            elif isinstance(event, Message):
                self._on_request(conn, event)
            elif isinstance(event, Connected):
                self._on_connected(conn)

    def _on_connected(self, conn: _Conn) -> None:
        if conn.down_since is not None:
            self._say(f"Reconnected after {time.monotonic() - conn.down_since:.1f} s")
            conn.down_since = None
            self.stats.reconnects += 1
        # The birth message goes before anything else queued on this session.
        queued = list(conn.pending)
        conn.pending.clear()
        self._births(conn, "online")
        conn.pending.extend(queued)
        if self._resend:
            topics = [wire.resend_topic(self.fleet.gateways[gw].id) for gw in conn.gateways]
            for i in range(0, len(topics), _FILTERS_PER_SUBSCRIBE):
                conn.session.subscribe([TopicFilter(t, max_qos=QoS.AT_LEAST_ONCE)
                                        for t in topics[i:i + _FILTERS_PER_SUBSCRIBE]])

    # -- gap repair ---------------------------------------------------------------------------

    def _on_request(self, conn: _Conn, message: Message) -> None:
        conn.session.ack(message)  # answered below, or not ours to answer
        parts = message.topic.split("/")
        if len(parts) != 3 or parts[0] != "fieldgate" or parts[2] != "resend":
            return
        index = self._index.get(parts[1])
        if index is None:
            return
        gateway = parts[1]
        reply_to = message.response_topic or wire.reply_topic(gateway)
        stats = self.stats.gateways[index]
        stats.resend_requests += 1
        answer: dict[str, object]
        try:
            request_id, first, last = wire.parse_resend(message.payload)
        except ValueError as err:
            answer = {"request_id": err.args[1], "error": err.args[0]}
        else:
            now = time.monotonic()
            if now - self._last_request.get(index, -1e9) < _RESEND_MIN_INTERVAL:
                answer = {"request_id": request_id, "error": "busy"}
            else:
                self._last_request[index] = now
                again, missing = self.fleet.resend(index, first, last, request_id)
                for out in again:
                    conn.pending.append((out.topic, out.payload, 1, out.props,
                                         out.content_type, None, None, out))
                answer = {"request_id": request_id, "from": first, "to": last,
                          "resent": sum(max(1, m.readings) for m in again),
                          "missing": missing}
        conn.pending.append((reply_to, orjson.dumps(answer), 1, None, wire.TELEMETRY_TYPE,
                             None, message.correlation_data, None))
