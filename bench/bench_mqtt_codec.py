#!/usr/bin/env python
"""Spike for issue 10: what an MQTT packet costs to read and write, by codec.

Part 1 (codec, no network) reads a byte stream of QoS 1 PUBLISH packets and writes PUBACKs
and PUBLISHes with the ``mqtt5`` package (sans-I/O MQTT v5 codec in Rust, public API:
``mqtt5.read`` and ``Packet.write``), the codec of fieldmqtt/session.py. (The spike also
measured the hand codecs it replaced: gateway/mqtt/inbound.py read a PUBLISH in 1.20 µs,
mqtt5 in 0.48 µs.)

Part 2 (a real Mosquitto) drains the same N queued QoS 1 messages into two subscribers and
charges each the CPU of its own process per message, acknowledgement included:

- paho-mqtt's public path (network thread, ``on_message``, automatic PUBACK), as
  bench_path.py's baseline subscriber does, and
- fieldmqtt/session.py (mqtt5 packets, non-blocking socket, the caller's select loop,
  a manual PUBACK per message).

The messages are queued while the subscriber is away (persistent session), so no publisher
competes for the CPU while a subscriber is measured. Ratios are against figures of the same
run.

    python bench/bench_mqtt_codec.py            # about 30 s
    python bench/bench_mqtt_codec.py --quick
"""

from __future__ import annotations

import argparse
import select
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mqtt5  # noqa: E402

from bench.harness.children import Child  # noqa: E402
from bench.harness.mqtt import paho_client  # noqa: E402
from fieldmqtt import Message, MqttSession, SessionConfig  # noqa: E402
from gateway.mosquitto import Mosquitto  # noqa: E402

TOPIC = "sensors/gh-17/telemetry"
SMALL = b'{"ts": 1732600000.123, "temp": 21.4, "hum": 40.2, "pt": 1732600000.125}'
LARGE = bytes(range(256)) * 16  # 4 KiB
PROPS: dict[str, Any] = {"content_type": "application/json",
                         "user_properties": [("site", "gh"), ("fw", "1.4.2")]}


# ----------------------------------------------------------------------------------------------
# Part 1: codec
# ----------------------------------------------------------------------------------------------

def cpu_per_call(fn: Callable[[], int], repeats: int) -> float:
    """CPU µs per item: fn does a batch and returns its item count; best of ``repeats``."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        n = fn()
        best = min(best, (time.process_time() - t0) / n * 1e6)
    return best


def stream(payload: bytes, props: bool, n: int) -> bytes:
    extra = PROPS if props else {}
    return b"".join(
        mqtt5.PublishPacket(TOPIC, payload, qos=mqtt5.QoS.AT_LEAST_ONCE,
                            packet_id=i % 65535 + 1, **extra).write()
        for i in range(n))


def read_mqtt5(buf: bytes) -> Callable[[], int]:
    view = memoryview(buf)
    size = len(buf)
    read = mqtt5.read

    def run() -> int:
        pos = 0
        n = 0
        while pos < size:
            packet, used = read(view[pos:])
            # What a subscriber needs from each packet, so lazy fields are paid for.
            _ = (packet.topic, packet.payload, packet.packet_id)  # type: ignore[union-attr]
            pos += used
            n += 1
        return n
    return run


def write_puback_mqtt5(n: int) -> Callable[[], int]:
    ack = mqtt5.PubAckPacket

    def run() -> int:
        out = bytearray()
        for mid in range(1, n + 1):
            out += ack(mid).write()
        return n
    return run


def write_publish_mqtt5(n: int, payload: bytes) -> Callable[[], int]:
    make = mqtt5.PublishPacket
    qos = mqtt5.QoS.AT_LEAST_ONCE

    def run() -> int:
        out = bytearray()
        for mid in range(1, n + 1):
            out += make(TOPIC, payload, qos=qos, packet_id=mid).write()
        return n
    return run


def part_codec(n: int, repeats: int) -> None:
    print(f"1. mqtt5 codec, CPU µs per packet (best of {repeats} batches of {n})")

    def row(name: str, a: float) -> None:
        print(f"   {name:<44}{a:8.2f}")

    for label, payload in (("small", SMALL), ("4 KiB", LARGE)):
        for props in (False, True):
            buf = stream(payload, props, n)
            row(f"read PUBLISH QoS1 {label}, {'props' if props else 'no props'}",
                cpu_per_call(read_mqtt5(buf), repeats))
    row("write PUBACK", cpu_per_call(write_puback_mqtt5(n), repeats))
    for label, payload in (("small", SMALL), ("4 KiB", LARGE)):
        row(f"write PUBLISH QoS1 {label}", cpu_per_call(write_publish_mqtt5(n, payload), repeats))


# ----------------------------------------------------------------------------------------------
# Part 2: a real Mosquitto, CPU per message of the subscriber process
# ----------------------------------------------------------------------------------------------

def sub_paho(conn: Any, port: int, client_id: str, expect: int) -> None:
    """paho's public path: network thread, on_message, automatic PUBACK."""
    done = threading.Event()
    state = {"n": 0, "t0": 0.0}

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        if state["n"] == 0:
            state["t0"] = time.process_time()
        state["n"] += 1
        _ = (msg.topic, msg.payload)
        if state["n"] >= expect:
            done.set()

    c = paho_client(client_id)
    c.on_message = on_message
    c.connect("127.0.0.1", port, clean_start=False)
    c.loop_start()
    if not done.wait(120):
        conn.send(("error", f"paho got {state['n']} of {expect}"))
        return
    cpu = time.process_time() - state["t0"]
    c.disconnect()
    c.loop_stop()
    conn.send(("ok", cpu / expect * 1e6))


def sub_session(conn: Any, port: int, client_id: str, expect: int) -> None:
    """gateway/mqtt/session.py in a select loop, one manual PUBACK per message."""
    s = MqttSession(SessionConfig(host="127.0.0.1", port=port, client_id=client_id,
                                  clean_start=False, session_expiry=3600))
    s.connect()
    n = 0
    t0 = 0.0
    deadline = time.monotonic() + 120
    while n < expect and time.monotonic() < deadline:
        r = [s] if s.fileno() >= 0 else []
        w = [s] if s.wants_write() else []
        select.select(r, w, [], s.next_timeout())
        for msg in s.step():
            if not isinstance(msg, Message):
                continue
            if n == 0:
                t0 = time.process_time()
            n += 1
            _ = (msg.topic, msg.payload)
            s.ack(msg)
    cpu = time.process_time() - t0
    s.disconnect()
    if n < expect:
        conn.send(("error", f"session got {n} of {expect}"))
        return
    conn.send(("ok", cpu / expect * 1e6))


def register(port: int, client_id: str) -> None:
    """A persistent subscription for client_id, so the broker queues what comes while away."""
    s = MqttSession(SessionConfig(host="127.0.0.1", port=port, client_id=client_id,
                                  clean_start=True, session_expiry=3600))
    s.connect()
    s.run_until(lambda: s.connected, timeout=10)
    s.subscribe([mqtt5.TopicFilter("sensors/#", max_qos=mqtt5.QoS.AT_LEAST_ONCE)])
    s.run_until(lambda: not s.pending_subscriptions, timeout=10)
    s.disconnect()


def publish_all(port: int, n: int, payload: bytes) -> None:
    s = MqttSession(SessionConfig(host="127.0.0.1", port=port, client_id="bench-pub",
                                  clean_start=True))
    s.connect()
    s.run_until(lambda: s.connected, timeout=10)
    sent = 0
    while sent < n or s.in_flight:
        while sent < n and s.can_publish():
            s.publish(TOPIC, payload, qos=1)
            sent += 1
        s.run_once()
    s.disconnect()


def part_broker(n: int, rounds: int) -> None:
    print(f"2. Mosquitto, subscriber process CPU µs per QoS 1 message incl. PUBACK "
          f"(drain of {n} queued; best of {rounds})")
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp), "codec").start()
        try:
            for label, payload in (("small", SMALL), ("4 KiB", LARGE)):
                best: dict[str, float] = {}
                for r in range(rounds):
                    for name, target in (("paho", sub_paho), ("session", sub_session)):
                        cid = f"bench-{name}-{label[0]}-{r}"
                        register(broker.port, cid)
                        publish_all(broker.port, n, payload)
                        child = Child(target, broker.port, cid, n)
                        try:
                            value = child.expect("ok", 180)
                        finally:
                            child.stop()
                        best[name] = min(best.get(name, float("inf")), value)
                print(f"   {label:<8} paho public path {best['paho']:7.2f}   "
                      f"session.py (mqtt5) {best['session']:7.2f}   "
                      f"ratio session/paho {best['session'] / best['paho']:.2f}x")
        finally:
            broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller batches, fewer rounds")
    args = ap.parse_args()
    print(f"mqtt5 {version('mqtt5')}, "
          f"paho-mqtt {version('paho-mqtt')}, "
          f"Python {sys.version.split()[0]}")
    part_codec(5_000 if args.quick else 20_000, 3 if args.quick else 5)
    part_broker(10_000 if args.quick else 50_000, 1 if args.quick else 3)


if __name__ == "__main__":
    main()
