"""Publishers and a counting cloud-side subscriber, built on plain paho-mqtt."""

from __future__ import annotations

import contextlib
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
        if not msg.topic.endswith(("/telemetry", "/status")):
            return  # events, requests to the gateway and replies are not its business
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


def v5_properties(*, content_type: str | None = None,
                  user: list[tuple[str, str]] | None = None,
                  payload_format: int | None = None,
                  expiry: int | None = None) -> Properties:
    """PUBLISH properties as a device that speaks MQTT v5 would send them."""
    props = Properties(PacketTypes.PUBLISH)
    if content_type is not None:
        props.ContentType = content_type
    if user:
        props.UserProperty = user
    if payload_format is not None:
        props.PayloadFormatIndicator = payload_format
    if expiry is not None:
        props.MessageExpiryInterval = expiry
    return props


class V5Publisher(Publisher):
    """A Publisher that can also attach MQTT v5 properties and set the retain flag."""

    def publish_v5(self, topic: str, payload: bytes | str, *, qos: int = 1,
                   retain: bool = False, properties: Properties | None = None) -> None:
        if len(self.infos) >= 1000:
            self.wait()
        self.infos.append(self.c.publish(topic, payload, qos=qos, retain=retain,
                                         properties=properties))


class MqttTap:
    """A TCP relay in front of a real broker that decodes every packet both ways with the
    ``mqtt5`` codec and records them in the order it forwarded them: what a client put on
    the wire, and when relative to what the broker sent it.

    Not a broker and not a mock: every byte goes to the real broker and back unchanged.
    Two faults it can inject: ``drop()`` cuts every open connection (the client sees the
    broker go away), and ``hold_connack(n)`` keeps the broker's answers on the n-th
    connection (its CONNACK first) from the client until ``release()``, while the client's
    own packets still pass and are recorded. ``latency`` delays what the broker sends by
    that many seconds, as a far-away broker would: a client's whole in-flight window is
    then on the wire before the first PUBACK comes back, so ``max_outstanding`` shows it.
    """

    def __init__(self, broker_port: int, *, latency: float = 0.0) -> None:
        import socket

        self._latency = latency
        self._broker_port = broker_port
        self._server = socket.socket()
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(16)
        self.port: int = self._server.getsockname()[1]
        self._lock = threading.Lock()
        # (connection number, "c2s" | "s2c", packet), in forwarding order.
        self.events: list[tuple[int, str, Any]] = []
        self.connections = 0
        self.max_outstanding = 0  # most client PUBLISH (QoS > 0) unacknowledged at once
        self._hold: int | None = None
        self.held = threading.Event()      # the held connection's CONNACK has arrived
        self._release = threading.Event()
        self._socks: list[Any] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def hold_connack(self, connection: int) -> None:
        self._hold = connection

    def release(self) -> None:
        self._release.set()

    def drop(self) -> None:
        """Close every open connection, both sides."""
        import socket

        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._closed = True
        self._release.set()
        self.drop()
        self._server.close()

    def packets(self, connection: int) -> list[tuple[str, Any]]:
        with self._lock:
            return [(way, p) for n, way, p in self.events if n == connection]

    def _accept(self) -> None:
        import socket

        while not self._closed:
            try:
                client_sock, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self._broker_port))
            except OSError:
                client_sock.close()  # the broker is down: so is the relay
                continue
            with self._lock:
                self.connections += 1
                number = self.connections
                self._socks += [client_sock, upstream]
            threading.Thread(target=self._relay, args=(number, client_sock, upstream),
                             daemon=True).start()

    def _record(self, number: int, way: str, buf: bytearray,
                outstanding: set[int]) -> None:
        import mqtt5

        while buf:
            try:
                packet, used = mqtt5.read(bytes(buf))
            except IndexError:
                return  # incomplete
            except ValueError as err:
                packet, used = ("undecodable", str(err)), len(buf)
            del buf[:used]
            with self._lock:
                self.events.append((number, way, packet))
                if way == "c2s" and isinstance(packet, mqtt5.PublishPacket) and packet.qos:
                    outstanding.add(packet.packet_id)
                    self.max_outstanding = max(self.max_outstanding, len(outstanding))
                elif way == "s2c" and isinstance(packet, (mqtt5.PubAckPacket,
                                                          mqtt5.PubRecPacket)):
                    outstanding.discard(packet.packet_id)

    def _relay(self, number: int, client_sock: Any, upstream: Any) -> None:
        import select

        bufs = {"c2s": bytearray(), "s2c": bytearray()}
        held = bytearray()  # broker bytes kept from the client while holding
        delayed: list[tuple[float, bytes]] = []  # (when due, broker bytes) under latency
        holding = self._hold == number
        outstanding: set[int] = set()
        peer = {client_sock: (upstream, "c2s"), upstream: (client_sock, "s2c")}
        try:
            while True:
                if holding and self._release.is_set():
                    # Record whatever the client sent before the CONNACK reaches it.
                    client_sock.setblocking(False)
                    try:
                        while data := client_sock.recv(65536):
                            upstream.sendall(data)
                            bufs["c2s"] += data
                    except BlockingIOError:
                        pass
                    client_sock.setblocking(True)
                    self._record(number, "c2s", bufs["c2s"], outstanding)
                    holding = False
                    client_sock.sendall(held)
                    self._record(number, "s2c", held, outstanding)
                now = time.monotonic()
                while delayed and delayed[0][0] <= now:
                    client_sock.sendall(delayed[0][1])
                    bufs["s2c"] += delayed.pop(0)[1]
                    self._record(number, "s2c", bufs["s2c"], outstanding)
                wait = min(0.05, delayed[0][0] - now) if delayed else 0.05
                readable, _, _ = select.select(list(peer), [], [], max(0.0, wait))
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    other, way = peer[sock]
                    if way == "s2c" and holding:
                        held += data
                        self.held.set()
                        continue
                    if way == "s2c" and self._latency:
                        delayed.append((time.monotonic() + self._latency, data))
                        continue
                    other.sendall(data)
                    bufs[way] += data
                    self._record(number, way, bufs[way], outstanding)
        except (OSError, ValueError):  # drop() or close() closed a socket under us
            return
        finally:
            client_sock.close()
            upstream.close()
