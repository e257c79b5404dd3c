"""Publishers and a counting cloud-side subscriber, built on plain paho-mqtt."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

# Every wait's bound is stretched by this much: the numbers in the tests are what a fast
# machine needs; a Raspberry Pi or a CI box with a busy core may need several times that.
SLACK = float(os.environ.get("FIELDGATE_TEST_SLACK", "4"))


def client(port: int, client_id: str = "") -> paho.Client:
    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=paho.MQTTv5)
    c.max_inflight_messages_set(200)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def subscribe_and_wait(c: paho.Client, topics: list[tuple[str, int]],
                       timeout: float = 30) -> None:
    """Subscribe and return once the broker's SUBACK arrived (readiness by the protocol)."""
    acked = threading.Event()
    previous = c.on_subscribe

    def on_subscribe(*args: Any) -> None:
        acked.set()
        if previous is not None:
            previous(*args)

    c.on_subscribe = on_subscribe
    c.subscribe(topics)
    if not acked.wait(timeout):
        raise TimeoutError(f"no SUBACK for {topics}")
    c.on_subscribe = previous


class Publisher:
    """Publishes at QoS 1 and waits for every PUBACK."""

    def __init__(self, port: int) -> None:
        self.c = client(port)
        self.infos: list[Any] = []

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> None:
        # Keep the unacknowledged window bounded (paho stalls past ~65k in flight).
        if len(self.infos) >= 1000:
            self.wait()
        self.infos.append(self.c.publish(topic, payload, qos=qos))

    def wait(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        for info in self.infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        self.infos.clear()

    def close(self) -> None:
        self.wait()
        self.c.disconnect()
        self.c.loop_stop()


class CloudCollector:
    """Subscribes to a gateway's uplink topics and keeps every reading that arrives."""

    _count = 0

    def __init__(self, port: int, gateway_id: str) -> None:
        # A persistent session: while the cloud broker restarts, what the gateway delivered
        # is kept for us (the test broker persists sessions across a graceful stop).
        CloudCollector._count += 1
        self.readings: list[dict[str, Any]] = []
        self.batches = 0
        self.status: list[dict[str, Any]] = []
        self.props: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self.c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             protocol=paho.MQTTv5,
                             client_id=f"collector-{gateway_id}-{CloudCollector._count}")
        self.c.reconnect_delay_set(0.1, 0.5)
        self.c.on_message = self._on_message
        self._subscribed = threading.Event()
        self.c.on_connect = lambda c, *_: c.subscribe(f"fieldgate/{gateway_id}/#", qos=1)
        self.c.on_subscribe = lambda *_: self._subscribed.set()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.c.connect("127.0.0.1", port, clean_start=False, properties=props)
        self.c.loop_start()
        if not self._subscribed.wait(30):   # SUBACK: from here on nothing is missed
            raise TimeoutError("cloud collector got no SUBACK")

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        body = orjson.loads(msg.payload)
        with self._lock:
            if msg.topic.endswith("/telemetry"):
                self.readings.extend(body["readings"])
                self.batches += 1
                props = getattr(msg.properties, "UserProperty", [])
                self.props.append(dict(props))
            elif msg.topic.endswith("/status"):
                self.status.append(body)

    def unique(self) -> dict[int, dict[str, Any]]:
        with self._lock:
            return {r["seq"]: r for r in self.readings}

    @staticmethod
    def wait_for(cond: Callable[[], bool], timeout: float) -> bool:
        """Poll until ``cond()``; the timeout (times SLACK) only catches a hang: a passing
        condition returns at once, and a slow machine just takes longer."""
        deadline = time.monotonic() + timeout * SLACK
        while time.monotonic() < deadline:
            if cond():
                return True
            time.sleep(0.05)
        return cond()

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()
