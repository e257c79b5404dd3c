"""Running a fleet against a broker: pacing, publishing, commands, recording."""

from __future__ import annotations

import queue
import select
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urlsplit

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from devices.commands import CommandVerifier
from devices.fleet import state_name
from devices.generator import FleetModel, Outgoing

# Unacknowledged QoS 1 publishes allowed at once: paho stalls near 65k outstanding message
# ids; past a few thousand a larger window only adds memory.
_WINDOW = 5000
# The loop sleeps at most this long, so that commands are applied promptly.
_MAX_SLEEP = 0.05
# A broker that takes nothing for this long is given up on.
_WRITE_TIMEOUT = 30.0
# QoS 0 packets are written once this many bytes are waiting (fewer, larger writes).
_RAW_CHUNK = 64 * 1024
# A message published this much after its time counts as late: the fleet is faster than
# this machine can publish, and the run says so instead of silently slowing down.
_LATE = 1.0


@dataclass(slots=True)
class RunStats:
    published: int = 0
    late: int = 0
    worst_lag: float = 0.0
    commands_ok: int = 0
    commands_refused: int = 0
    elapsed: float = 0.0


class Simulator:
    def __init__(self, model: FleetModel, *, broker: str, key: bytes | None,
                 record: IO[bytes] | None = None,
                 say: Callable[[str], None] = print) -> None:
        """``key`` is the site master key: the emulator plays every device, so it derives
        each device's command key from it (a real device holds only its own)."""
        url = urlsplit(broker)
        if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
            raise ValueError(f"{broker!r}: write mqtt://host:port or mqtts://host:port")
        self.model = model
        self._record = record
        self._say = say
        self._verifier = CommandVerifier.from_master(key, model.fleet.command_max_age)
        self._commands: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
        self.stats = RunStats()
        self._client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                   client_id=f"fieldgate-devices-{model.seed}",
                                   protocol=paho.MQTTv5)
        self._client.max_inflight_messages_set(0)  # our own window bounds it (see _WINDOW)
        if url.scheme == "mqtts":
            self._client.tls_set()
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._host, self._port = url.hostname, url.port or (8883 if url.scheme == "mqtts"
                                                            else 1883)
        self._window: list[paho.MQTTMessageInfo] = []
        self._raw = bytearray()

    def _on_connect(self, client: paho.Client, *_: Any) -> None:
        if any(d.spec.actuators for d in self.model.devices):
            client.subscribe("devices/+/cmd", qos=1)

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        if len(parts) == 3:
            self._commands.put((parts[1], bytes(msg.payload)))

    def _apply_commands(self) -> None:
        while True:
            try:
                device, raw = self._commands.get_nowait()
            except queue.Empty:
                return
            verdict, command = self._verifier.check(device, raw, time.time())
            reason = verdict.reason
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
            self._client.publish(f"devices/{device}/cmd/ack", self._verifier.answer(device, ack),
                                 qos=1)

    def _publish(self, messages: list[Outgoing], lag: float) -> None:
        for out in messages:
            if out.qos == 0:
                self._raw_publish(out.topic, out.payload)
            else:
                if len(self._window) >= _WINDOW:
                    self._drain_window()
                self._window.append(self._client.publish(out.topic, out.payload, qos=out.qos))
            self.stats.published += 1
            if self._record is not None and out.reading is not None:
                for reading in out.reading.get("batch", [out.reading]):
                    self._record.write(orjson.dumps({"device": out.device, **reading}) + b"\n")
        if lag > _LATE:
            self.stats.late += len(messages)
        self.stats.worst_lag = max(self.stats.worst_lag, lag)

    def _drain_window(self) -> None:
        """Wait (driving the connection) until the QoS 1 publishes in the window are acked."""
        deadline = time.monotonic() + 30
        while any(not info.is_published() for info in self._window):
            if time.monotonic() > deadline or self._client.socket() is None:
                raise OSError("the broker stopped acknowledging publishes")
            self._pump(0.05)
        self._window.clear()

    # -- the connection, driven here (no paho network thread) -----------------------------

    def _raw_publish(self, topic: str, payload: bytes) -> None:
        """A QoS 0 PUBLISH (MQTT v5, no properties) written straight to the socket buffer.

        paho's publish costs ~25 µs of Python per message, more than making the reading;
        at QoS 0 there is no state to keep, so the packet is built here (~1 µs) and written
        in large chunks.
        """
        name = topic.encode()
        length = 3 + len(name) + len(payload)
        header = bytearray(b"\x30")
        while True:
            byte, length = length & 0x7F, length >> 7
            header.append(byte | (0x80 if length else 0))
            if not length:
                break
        self._raw += header
        self._raw += len(name).to_bytes(2, "big")
        self._raw += name
        self._raw += b"\x00"
        self._raw += payload
        if len(self._raw) >= _RAW_CHUNK:
            self._flush_raw()

    def _flush_raw(self) -> None:
        client = self._client
        if client.want_write():
            client.loop_write()  # a packet paho started must be finished before ours
            if client.want_write():
                return
        sock = client.socket()
        if sock is None:
            raise OSError("lost the broker")
        deadline = time.monotonic() + _WRITE_TIMEOUT
        while self._raw:
            try:
                sent = sock.send(self._raw)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                if time.monotonic() > deadline:
                    raise OSError("the broker stopped reading") from None
                select.select([], [sock], [], 1.0)
                continue
            del self._raw[:sent]

    def _pump(self, timeout: float) -> None:
        """Flush, then wait up to ``timeout`` for input and let paho handle it."""
        client = self._client
        self._flush_raw()
        sock = client.socket()
        if sock is None:
            raise OSError("lost the broker")
        readable, _, _ = select.select([sock], [sock] if client.want_write() else [], [],
                                       timeout)
        for _ in range(1000):  # everything that is there, bounded
            if not readable:
                break
            if client.loop_read() != paho.MQTT_ERR_SUCCESS:
                raise OSError("lost the broker")
            readable, _, _ = select.select([sock], [], [], 0)
        client.loop_write()
        client.loop_misc()

    def run(self, duration: float, stop: Callable[[], bool]) -> RunStats:
        """Publish until ``duration`` wall seconds passed (0: forever) or ``stop()``."""
        self._client.connect(self._host, self._port)
        deadline = time.monotonic() + 10
        while not self._client.is_connected():
            if time.monotonic() > deadline:
                raise OSError("no CONNACK from the broker")
            self._pump(0.05)
        scale = self.model.scale
        t0 = time.monotonic()
        try:
            while not stop():
                wall = time.monotonic() - t0
                if duration and wall >= duration:
                    break
                messages = self.model.due(wall * scale)
                if messages:
                    self._publish(messages, wall - messages[0].t / scale)
                self._apply_commands()
                wait = self.model.next_due() / scale - (time.monotonic() - t0)
                self._pump(min(max(wait, 0.0), _MAX_SLEEP))
            self._drain_window()
            self._flush_raw()
        finally:
            self.stats.elapsed = time.monotonic() - t0
            if self._client.socket() is not None:
                self._client.disconnect()
                self._client.loop_write()
        return self.stats
