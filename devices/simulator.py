"""Running a fleet against a broker: pacing, publishing, commands, recording."""

from __future__ import annotations

import queue
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
        url = urlsplit(broker)
        if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
            raise ValueError(f"{broker!r}: write mqtt://host:port or mqtts://host:port")
        self.model = model
        self._record = record
        self._say = say
        self._verifier = CommandVerifier(key, model.fleet.command_max_age)
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
            self._client.publish(f"devices/{device}/cmd/ack", orjson.dumps(ack), qos=1)

    def _publish(self, messages: list[Outgoing], lag: float) -> None:
        for out in messages:
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
        """Wait for the QoS 1 publishes in the window (QoS 0 ones are done when written)."""
        for info in self._window:
            if not info.is_published():
                info.wait_for_publish(30)
        self._window.clear()

    def run(self, duration: float, stop: Callable[[], bool]) -> RunStats:
        """Publish until ``duration`` wall seconds passed (0: forever) or ``stop()``."""
        self._client.connect(self._host, self._port)
        self._client.loop_start()
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
                if wait > 0:
                    time.sleep(min(wait, _MAX_SLEEP))
            self._drain_window()
        finally:
            self.stats.elapsed = time.monotonic() - t0
            self._client.disconnect()
            self._client.loop_stop()
        return self.stats
