"""What goes to the cloud without waiting for a telemetry batch, with real Mosquitto.

Asserted by behaviour, not by time: with ``batch_max_delay`` at an hour, an alert event and
the readings logged before it still reach the cloud (events never wait for a batch), and
telemetry goes at once when no batch is in flight (``batching: adaptive``, the default).
"""

from __future__ import annotations

import threading
from typing import Any

import orjson

from tests.mqtt_helpers import CloudCollector, Publisher, client, subscribe_and_wait

RULES = """\
groups:
  - name: house
    match: {device: "gh-*"}
    rules:
      - alert: Hot
        expr: last(temp, 30s) > 30
        for: 0s
        severity: critical
"""
HOUR = "1h"   # longer than any test runs: a batch that waits for it never arrives


class Uplink:
    """Everything the gateway publishes under fieldgate/<id>/, in arrival order."""

    def __init__(self, port: int, gateway_id: str) -> None:
        self.got: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self.c = client(port)
        self.c.on_message = self._on_message
        subscribe_and_wait(self.c, [(f"fieldgate/{gateway_id}/#", 1)])

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        with self._lock:
            self.got.append((msg.topic.rsplit("/", 1)[-1], orjson.loads(msg.payload)))

    def arrivals(self) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            return [(kind, body) for kind, body in self.got if kind != "status"]

    def readings(self) -> list[dict[str, Any]]:
        return [r for kind, body in self.arrivals() if kind == "telemetry"
                for r in body["readings"]]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_alert_event_does_not_wait_for_a_telemetry_batch(site, cloud, make_gateway, tmp_path):
    (tmp_path / "house.yaml").write_text(RULES)
    gw = make_gateway(site, cloud, rules=[str(tmp_path / "house.yaml")],
                      engine={"tick": "100ms", "offline_after": None},
                      uplink={"batching": "delay", "batch_max_delay": HOUR})
    gw.start()
    up = Uplink(cloud.port, gw.gateway_id)
    pub = Publisher(site.port)
    for temp in (21.0, 22.0, 23.0, 35.5):
        pub.publish("sensors/gh-1/telemetry", orjson.dumps({"temp": temp}))
    pub.wait()
    fired = "io.fieldgate.alert.fired"
    assert CloudCollector.wait_for(lambda: any(kind == fired for kind, _ in up.arrivals()),
                                   30), gw.log()
    # The readings logged before the event went first (order per sink), the hot one too.
    arrived = up.arrivals()
    before = [r for kind, body in arrived[:[k for k, _ in arrived].index(fired)]
              if kind == "telemetry" for r in body["readings"]]
    assert [r["temp"] for r in before] == [21.0, 22.0, 23.0, 35.5]
    event = next(body for kind, body in arrived if kind == fired)
    assert event["subject"] == "gh-1" and event["data"]["rule"] == "Hot"
    assert event["seq"] > max(r["seq"] for r in before)
    pub.close()
    up.close()
    assert gw.stop() == 0


def test_telemetry_goes_at_once_when_no_batch_is_in_flight(site, cloud, make_gateway):
    gw = make_gateway(site, cloud, uplink={"batch_max_delay": HOUR})   # batching: adaptive
    gw.start()
    up = Uplink(cloud.port, gw.gateway_id)
    pub = Publisher(site.port)
    # One reading at a time, far below batch_max_readings: each goes without waiting for
    # a batch to fill (once the previous batch's PUBACK is in, nothing is in flight).
    for i in range(3):
        pub.publish("sensors/gh-1/telemetry", orjson.dumps({"i": i}))
        pub.wait()
        assert CloudCollector.wait_for(lambda i=i: len(up.readings()) == i + 1, 30), gw.log()
    assert [r["i"] for r in up.readings()] == [0, 1, 2]
    pub.close()
    up.close()
    assert gw.stop() == 0


def test_what_is_left_after_a_full_batch_goes_in_the_same_turn(site, cloud, make_gateway):
    """A commit of just over ``batch_max_readings`` readings: the full batch goes, and the
    rest goes right behind it, not a turn later after the full batch's PUBACK (with the
    cloud's answers delayed by a tap, both PUBLISH packets are on the wire before it)."""
    import mqtt5

    from tests.mqtt_helpers import MqttTap

    tap = MqttTap(cloud.port, latency=0.3)
    try:
        gw = make_gateway(site, None, cloud={"url": tap.url},
                          uplink={"batch_max_readings": 2, "batch_max_delay": HOUR})
        gw.start()
        up = Uplink(cloud.port, gw.gateway_id)
        pub = Publisher(site.port)
        # One message of three readings: one commit.
        pub.publish("sensors/gh-1/telemetry", orjson.dumps([{"i": 0}, {"i": 1}, {"i": 2}]))
        pub.wait()
        assert CloudCollector.wait_for(lambda: len(up.readings()) == 3, 30), gw.log()
        assert [r["i"] for r in up.readings()] == [0, 1, 2]

        def sent() -> list[tuple[int, Any]]:
            return [(i, p) for i, (way, p) in enumerate(tap.packets(1)) if way == "c2s"
                    and isinstance(p, mqtt5.PublishPacket) and p.topic.endswith("/telemetry")]

        def acked(packet_id: int) -> int | None:
            return next((i for i, (way, p) in enumerate(tap.packets(1)) if way == "s2c"
                         and isinstance(p, mqtt5.PubAckPacket) and p.packet_id == packet_id),
                        None)

        batches = sent()
        assert [len(orjson.loads(p.payload)["readings"]) for _, p in batches] == [2, 1]
        first = batches[0][1].packet_id
        assert CloudCollector.wait_for(lambda: acked(first) is not None, 30)
        assert batches[1][0] < (acked(first) or 0), \
            f"the rest went after the full batch's PUBACK: {tap.packets(1)}"
        pub.close()
        up.close()
        assert gw.stop() == 0
    finally:
        tap.close()
