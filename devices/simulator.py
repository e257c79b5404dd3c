"""Running a fleet against a broker: pacing, publishing, commands, recording, reconnecting.

One ``fieldmqtt.session.MqttSession`` carries everything (QoS 0 and QoS 1 readings, the
command subscription, the answers), driven by this module's own select loop: no threads.
QoS 1 readings wait in the session until their PUBACK, also across a lost connection: the
emulator reconnects (about once a second while the broker is unreachable, backing off only
when it refuses us) and the session sends again what was not acknowledged. QoS 0 readings
due while the broker is away are dropped and counted, as a real device's would be.
"""

from __future__ import annotations

import random
import secrets
import select
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

import orjson
from mqtt5 import QoS, TopicFilter

from devices.broker import broker as broker_at
from devices.commands import CommandVerifier
from devices.fleet import state_name
from devices.generator import FleetModel, Outgoing
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
    Subscribed,
)

# Unacknowledged QoS 1 publishes allowed at once (the broker's Receive Maximum may lower
# it). Larger keeps the broker busy at full speed; smaller bounds what is sent again after
# a lost connection. 10,000 is where a bare publisher on loopback stops gaining.
_WINDOW = 10_000
# Messages taken from the model and published per turn of the loop: larger amortises the
# loop, smaller reads PUBACKs and commands sooner and bounds what one turn buffers.
_BATCH = 2000
# The loop sleeps at most this long, so that commands are applied promptly.
_MAX_SLEEP = 0.05
# A message published this much after its time counts as late: the fleet is faster than
# this machine can publish, and the run says so instead of silently slowing down.
_LATE = 1.0
# Seconds to wait for the first CONNACK (and SUBACK) before the run fails.
_FIRST_CONNECT = 10.0
# While the broker is unreachable, try again after this many seconds (times a jitter of
# 0.5-1: a fleet of emulators does not come back in step). Lower finds a returning broker
# sooner, higher costs less while it is away.
_PROBE = 1.0
# A broker that refuses us (credentials, busy) is asked again after a delay that doubles
# up to this bound.
_REFUSED_MAX = 30.0
# How long the broker keeps our session (subscription, commands queued for us) while we
# are away; unacknowledged readings are kept by the emulator itself however long it takes.
_SESSION_EXPIRY = 300
# Commands the broker may send us before we PUBACK them; a command is acknowledged once its
# answer is handed to the session, so this bounds the answers waiting for the QoS 1 window.
_COMMANDS_IN_FLIGHT = 1000
# At the end of a run, wait at most this long for the last PUBACKs.
_DRAIN = 30.0
_KEEPALIVE = 30


@dataclass(slots=True)
class RunStats:
    published: int = 0          # handed to the session (QoS 1: kept until acknowledged)
    late: int = 0
    worst_lag: float = 0.0
    commands_ok: int = 0
    commands_refused: int = 0
    dropped: int = 0            # QoS 0 readings due while the broker was away
    refused_by_broker: int = 0  # PUBACK with a failure, or over the Maximum Packet Size
    unacked: int = 0            # QoS 1 still unacknowledged when the run gave up waiting
    reconnects: int = 0
    elapsed: float = 0.0


class Simulator:
    def __init__(self, model: FleetModel, *, broker: str, key: bytes | None,
                 record: IO[bytes] | None = None, say: Callable[[str], None] = print,
                 username: str | None = None, password: bytes | None = None,
                 ca_file: str | None = None) -> None:
        """``key`` is the site master key: the emulator plays every device, so it derives
        each device's command key from it (a real device holds only its own). ``ca_file``
        checks an mqtts:// broker against that CA instead of the system's."""
        where = broker_at(broker, ca_file=ca_file, username=username, password=password)
        self.model = model
        self.stats = RunStats()
        self._record = record
        self._say = say
        self._verifier = CommandVerifier.from_master(key, model.fleet.command_max_age)
        # A persistent session (clean_start False, an expiry) under an id of this run alone:
        # the broker keeps our subscription and queued commands across a lost connection,
        # and two emulators with the same seed do not take each other's session over.
        self._session = MqttSession(SessionConfig(
            host=where.host, port=where.port,
            client_id=f"fieldgate-devices-{model.seed}-{secrets.token_hex(4)}",
            keepalive=_KEEPALIVE, clean_start=False, session_expiry=_SESSION_EXPIRY,
            username=username, password=password, tls=where.tls, max_inflight=_WINDOW,
            receive_maximum=_COMMANDS_IN_FLIGHT))
        self._commands = any(d.spec.actuators for d in model.devices)
        self._pending: deque[Outgoing] = deque()
        # Answers to commands, each with the command to PUBACK once the answer is sent.
        self._answers: deque[tuple[str, bytes, Message]] = deque()
        self._t0 = 0.0
        self._retry_at = 0.0
        self._refused_delay = _PROBE
        self._down_since: float | None = None

    # -- the run ------------------------------------------------------------------------------

    def run(self, duration: float, stop: Callable[[], bool]) -> RunStats:
        """Publish until ``duration`` wall seconds passed (0: forever) or ``stop()``.

        Raises ``fieldmqtt.session.MqttError`` or OSError when the first connection fails;
        a connection lost later is retried until the run ends."""
        self._connect_first()
        model, scale, session = self.model, self.model.scale, self._session
        self._t0 = t0 = time.monotonic()
        try:
            while not stop():
                now = time.monotonic()
                if duration and now - t0 >= duration:
                    break
                if not self._pending:
                    self._pending.extend(model.due((now - t0) * scale, _BATCH))
                if not session.wants_write():  # the last batch is with the kernel
                    self._publish(now)
                if self._can_publish():
                    wait = 0.0
                elif self._pending or self._answers:
                    wait = _MAX_SLEEP  # held back by the window or the socket: select wakes us
                else:
                    wait = min(max(model.next_due() / scale - (time.monotonic() - t0), 0.0),
                               _MAX_SLEEP)
                self._turn(wait)
            self._drain()
        finally:
            self.stats.elapsed = time.monotonic() - t0
            session.disconnect(session_expiry=0)  # a clean end: the broker forgets us
        return self.stats

    def _connect_first(self) -> None:
        session = self._session
        session.connect()
        deadline = time.monotonic() + _FIRST_CONNECT
        while not session.connected or session.pending_subscriptions:
            if time.monotonic() > deadline:
                session.disconnect()
                raise ConnectionLostError(
                    f"{session.config.host}:{session.config.port}",
                    f"no CONNACK (or SUBACK) from the broker within {_FIRST_CONNECT:g} s")
            select.select([session], [session] if session.wants_write() else [], [],
                          min(session.next_timeout(), _MAX_SLEEP))
            self._handle(session.step())

    def _drain(self) -> None:
        """Publish what is due and wait for the last PUBACKs, for at most _DRAIN seconds."""
        session = self._session
        deadline = time.monotonic() + _DRAIN
        while (self._pending or self._answers or session.in_flight or session.wants_write()) \
                and time.monotonic() < deadline:
            if not session.wants_write():
                self._publish(time.monotonic())
            self._turn(0.0 if self._can_publish() else _MAX_SLEEP)
        qos0 = sum(1 for out in self._pending if not out.qos)
        self.stats.dropped += qos0
        self.stats.unacked = session.in_flight + len(self._pending) - qos0 + len(self._answers)

    # -- publishing ---------------------------------------------------------------------------

    def _can_publish(self) -> bool:
        """Whether a publish would make progress now (else the loop may wait)."""
        session = self._session
        if session.wants_write() or not (self._pending or self._answers):
            return False
        if self._answers or self._pending[0].qos:
            return session.can_publish()
        return True  # QoS 0: sent when connected, dropped when not

    def _publish(self, now: float) -> None:
        session, stats, pending, record = self._session, self.stats, self._pending, \
            self._record
        while self._answers and session.can_publish():
            topic, payload, command = self._answers.popleft()
            session.publish(topic, payload, qos=1)
            session.ack(command)
        connected = session.connected
        elapsed = now - self._t0
        scale = self.model.scale
        publish = session.publish
        while pending:
            out = pending[0]
            try:
                if out.qos:
                    if not session.can_publish():
                        return
                    publish(out.topic, out.payload, qos=1)
                elif connected:
                    publish(out.topic, out.payload)
                else:
                    pending.popleft()
                    stats.dropped += 1
                    continue
            except PacketTooLargeError as err:
                pending.popleft()
                stats.refused_by_broker += 1
                self._say(f"Not sent on {out.topic!r}: {err}")
                continue
            pending.popleft()
            stats.published += 1
            lag = elapsed - out.t / scale
            if lag > _LATE:
                stats.late += 1
                stats.worst_lag = max(stats.worst_lag, lag)
            if record is not None and out.reading is not None:
                for reading in out.reading.get("batch", [out.reading]):
                    record.write(orjson.dumps({"device": out.device, **reading}) + b"\n")

    # -- the connection -----------------------------------------------------------------------

    def _turn(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the socket, then let the session do its work."""
        session = self._session
        if session.fileno() < 0:  # away: wait for the next attempt
            left = self._retry_at - time.monotonic()
            if left > 0:
                time.sleep(min(left, max(timeout, _MAX_SLEEP)))
                return
            try:
                session.connect()
            except (ConnectionLostError, OSError) as err:
                self._lost(err)
            return
        timeout = min(timeout, session.next_timeout())
        if timeout > 0 or session.wants_write():
            select.select([session], [session] if session.wants_write() else [], [], timeout)
        try:
            self._handle(session.step())
        except ConnectionLostError as err:
            self._handle(err.events)  # what came before the end (PUBACKs, commands)
            self._lost(err)

    def _lost(self, err: Exception) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            self._say(f"Lost the broker ({err}); reconnecting")
        if isinstance(err, ConnectRefusedError):
            delay = self._refused_delay
            self._refused_delay = min(self._refused_delay * 2, _REFUSED_MAX)
            self._say(f"Broker refused us ({err}); next try in {delay:.0f} s")
        else:
            delay = _PROBE
        self._retry_at = now + delay * random.uniform(0.5, 1.0)

    def _handle(self, events: list[Event]) -> None:
        for event in events:
            if type(event) is Published:
                if int(event.reason_code) >= 0x80:
                    self.stats.refused_by_broker += 1
            elif isinstance(event, Message):
                self._on_command(event)
            elif isinstance(event, Connected):
                self._on_connected()
            elif isinstance(event, Subscribed) and \
                    any(int(code) >= 0x80 for code in event.reason_codes):
                self._say(f"Broker refused the command subscription "
                          f"({event.reason_codes[0].name}): actuators get no commands")

    def _on_connected(self) -> None:
        if self._down_since is not None:
            self._say(f"Reconnected after {time.monotonic() - self._down_since:.1f} s")
            self._down_since = None
            self.stats.reconnects += 1
        self._refused_delay = _PROBE
        if self._commands:
            # Again on every connection: a broker that lost our session lost it too.
            self._session.subscribe([TopicFilter("devices/+/cmd", max_qos=QoS.AT_LEAST_ONCE)])

    # -- commands -------------------------------------------------------------------------------

    def _on_command(self, message: Message) -> None:
        parts = message.topic.split("/")
        answer = None
        if len(parts) == 3 and parts[0] == "devices" and parts[2] == "cmd":
            answer = self._apply(parts[1], message.payload, redelivered=message.duplicate)
        if answer is None:
            self._session.ack(message)
        else:
            self._answers.append((f"devices/{parts[1]}/cmd/ack", answer, message))

    def _apply(self, device: str, raw: bytes, *, redelivered: bool) -> bytes | None:
        """Check and apply a command; the answer to publish (None: none is owed)."""
        verdict, command = self._verifier.check(device, raw, time.time())
        reason = verdict.reason
        if reason == "replayed" and redelivered:
            return None  # the broker sent again what we applied before our PUBACK got out
        if verdict.ok:
            params = command.get("params") or {}
            state = state_name(params.get("state"))
            if not isinstance(state, str):
                reason = "params.state (string) is required"
            else:
                reason = self.model.set_actuator(device, command["action"], state) or ""
        if reason:
            self.stats.commands_refused += 1
            self._say(f"refused command {command.get('id')!r} for {device}: {reason}")
        else:
            self.stats.commands_ok += 1
        ack = {"id": command.get("id"), "ts": round(time.time(), 3),
               "status": "rejected" if reason else "ok"}
        if reason:
            ack["reason"] = reason
        return self._verifier.answer(device, ack)
