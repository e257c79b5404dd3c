"""Issue 10's MQTT v5 behaviours, end to end against real Mosquitto: properties on inbound
messages, overlapping templates with subscription identifiers, QoS 2 publishers, retained
messages, a site broker restarting under a persistent session, the cloud broker's Receive
Maximum and Maximum Packet Size, publishing while the link reconnects, and how soon
readings flow after a cloud outage.

Readiness is always a protocol signal (the gateway's READY line after SUBACK, a SUBACK or
PUBACK of our own clients, a packet the tap saw); the only waits with a clock in them are
the bounds that catch a hang (``CloudCollector.wait_for``), and the cloud outage, whose
length is the scenario itself.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mqtt5
import orjson
import pytest

from gateway.config import Link
from gateway.log.reader import LogReader, split_readings
from gateway.mosquitto import Mosquitto
from gateway.mqtt.link import Backoff, MqttLink
from tests.mqtt_helpers import (
    SLACK,
    CloudCollector,
    MqttTap,
    Publisher,
    V5Publisher,
    client,
    subscribe_and_wait,
    v5_properties,
)
from tests.tools import gateway as gateway_cli


def logged_readings(log_path: Path) -> list[dict[str, Any]]:
    """Every reading the gateway's log holds, in seq order (the log's own reader)."""
    reader = LogReader(log_path, readonly=True)
    try:
        rows = reader.between(1, 1 << 40)
    finally:
        reader.close()
    return [orjson.loads(part) for row in rows if row.kind == 0
            for part in split_readings(row.body)]


def dead_letters(config: Path, reason: str | None = None) -> list[dict[str, Any]]:
    """What `gateway log dlq --json` shows."""
    args = ["log", "dlq", "-c", str(config), "--json", "--limit", "1000"]
    if reason is not None:
        args += ["--reason", reason]
    out = gateway_cli(*args)
    assert out.returncode == 0, out.stderr
    return [orjson.loads(line) for line in out.stdout.splitlines()]


def _drive(link: MqttLink, until: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout * SLACK
    while not until():
        assert time.monotonic() < deadline, "condition not reached"
        link.poll(0.02)


# -- 7. publishing while the cloud link reconnects ------------------------------------------


@pytest.mark.xfail(strict=True, reason="issue 10: paho writes a PUBLISH made between CONNECT "
                   "and CONNACK at once (MqttLink.publish -> paho _send_publish)")
def test_a_publish_while_the_link_reconnects_goes_out_after_connack(tmp_path):
    """Issue 10: "a command published while the cloud link is reconnecting goes out after
    CONNACK, never before". MQTT v5 §3.1.4 lets a client send before CONNACK, but the
    broker discards it if the CONNACK refuses; the link must not rely on that."""
    broker = Mosquitto(tmp_path, "cloud").start()
    tap = MqttTap(broker.port)
    watcher = client(broker.port)
    got: list[bytes] = []
    watcher.on_message = lambda _c, _u, msg: got.append(msg.payload)
    subscribe_and_wait(watcher, [("cmd/#", 1)])
    link = MqttLink(name="cloud", link=Link(url=tap.url), client_id="reconnecting",
                    clean_start=True, backoff=Backoff(0.001, 0.002))
    try:
        _drive(link, lambda: link.connected)
        tap.hold_connack(2)
        tap.drop()                                   # the cloud goes away
        _drive(link, lambda: not link.connected)
        link.publish("cmd/a", b"while disconnected")
        _drive(link, tap.held.is_set)                # CONNECT sent, CONNACK held back
        assert not link.connected
        link.publish("cmd/b", b"while waiting for CONNACK")
        for _ in range(5):                           # let the link write what it would
            link.poll(0.01)
        tap.release()
        _drive(link, lambda: len(got) >= 2)
        assert sorted(got) == [b"while disconnected", b"while waiting for CONNACK"]
        packets = tap.packets(2)
        connack = next(i for i, (way, p) in enumerate(packets)
                       if isinstance(p, mqtt5.ConnAckPacket))
        early = [getattr(p, "topic", type(p).__name__) for way, p in packets[:connack]
                 if way == "c2s"]
        assert early == ["ConnectPacket"], f"sent before CONNACK: {early}"
    finally:
        link.close()
        tap.close()
        watcher.disconnect()
        watcher.loop_stop()
        broker.stop()
