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

import itertools
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

from gateway.backoff import Backoff
from gateway.config import Link
from gateway.log.reader import LogReader, split_readings
from gateway.mosquitto import Mosquitto
from gateway.mqtt.link import MqttLink
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


# -- 1. MQTT v5 properties on inbound messages ---------------------------------------------


def test_readings_with_v5_properties_are_logged_and_forwarded(site, cloud, make_gateway,
                                                               tmp_path):
    gw = make_gateway(site, cloud).start()
    sink = CloudCollector(cloud.port, gw.gateway_id)
    pub = V5Publisher(site.port)
    props = v5_properties(content_type="application/json", payload_format=1, expiry=3600,
                          user=[("fw", "1.4.2"), ("site", "north")])
    t0 = time.time()
    for i in range(200):
        # Messages with and without properties, interleaved, on both kinds of templates.
        with_props = props if i % 2 == 0 else None
        pub.publish_v5("sensors/v5/telemetry", orjson.dumps({"ts": t0 + i * 0.001, "i": i}),
                       properties=with_props)
        pub.publish_v5("sensors/v5/n", str(i), properties=with_props)
    pub.close()
    assert sink.wait_for(lambda: len(sink.unique()) == 400, 20), \
        f"{len(sink.unique())} of 400 arrived; gateway log:\n{gw.log()}"
    got = list(sink.unique().values())
    assert sorted(r["i"] for r in got if "i" in r) == list(range(200))
    assert sorted(r["n"] for r in got if "n" in r) == list(range(200))
    assert all(r["device"] == "v5" for r in got)
    assert gw.metric("fieldgate_dead_letters_total") in (None, 0.0)
    assert gw.stop() == 0
    logged = logged_readings(tmp_path / "log.db")
    assert [r["i"] for r in logged if "i" in r] == list(range(200))  # in arrival order
    assert [r["n"] for r in logged if "n" in r] == list(range(200))
    assert dead_letters(gw.config) == []
    sink.close()


def test_a_malformed_payload_with_v5_properties_is_dead_lettered(site, cloud, make_gateway):
    gw = make_gateway(site, cloud).start()
    sink = CloudCollector(cloud.port, gw.gateway_id)
    pub = V5Publisher(site.port)
    props = v5_properties(content_type="application/json", payload_format=1,
                          user=[("fw", "1.4.2")])
    pub.publish_v5("sensors/bad/telemetry", b"{not json", properties=props)
    pub.publish_v5("sensors/bad/temp", b"warm", properties=props)
    pub.publish_v5("sensors/good/telemetry", b'{"t": 1}', properties=props)
    pub.close()
    assert sink.wait_for(lambda: len(sink.unique()) == 1, 10), gw.log()
    assert CloudCollector.wait_for(
        lambda: gw.metric('fieldgate_dead_letters_total{reason="bad_json"}') == 2.0, 10)
    assert gw.stop() == 0
    rows = dead_letters(gw.config)
    assert sorted((r["topic"], r["reason"], r["payload"]) for r in rows) == [
        ("sensors/bad/telemetry", "bad_json", "{not json"),
        ("sensors/bad/temp", "bad_json", "warm"),
    ]
    [good] = sink.unique().values()
    assert (good["device"], good["t"]) == ("good", 1)
    sink.close()


# -- 2. overlapping topic templates --------------------------------------------------------


def test_overlapping_templates_log_each_message_once_under_the_right_template(
        site, cloud, make_gateway, tmp_path):
    # site/room/telemetry matches both templates and neither filter (+/room/telemetry,
    # site/+/+) covers the other: the broker sends a copy per subscription, each tagged with
    # its subscription identifier. The JSON template has more literal levels, so it owns
    # that topic; the number template's copy must be skipped, not decoded (bad_json).
    gw = make_gateway(site, cloud, subscriptions=[
        {"topic": "site/{device}/{metric}", "format": "number"},
        {"topic": "{device}/room/telemetry", "format": "json"},
    ]).start()
    sink = CloudCollector(cloud.port, gw.gateway_id)
    pub = Publisher(site.port)
    for i in range(50):
        pub.publish("site/room/telemetry", orjson.dumps({"both": i}))  # both: JSON, "site"
        pub.publish("hall/room/telemetry", orjson.dumps({"first": i}))  # JSON only: "hall"
        pub.publish("site/lab/temp", str(i))                            # number only: "lab"
    pub.close()
    assert sink.wait_for(lambda: len(sink.unique()) >= 150, 20), gw.log()
    assert gw.stop() == 0
    logged = logged_readings(tmp_path / "log.db")
    seen = Counter((r["device"], k, r[k]) for r in logged for k in r
                   if k not in ("seq", "device", "ts"))
    expected = Counter([("site", "both", i) for i in range(50)]
                       + [("hall", "first", i) for i in range(50)]
                       + [("lab", "temp", i) for i in range(50)])
    assert seen == expected, f"unexpected: {seen - expected}, missing: {expected - seen}"
    assert len(sink.unique()) == 150
    assert dead_letters(gw.config) == [], "a copy for the other template was decoded too"
    sink.close()


# -- 3. QoS 2 publishers ---------------------------------------------------------------------


def test_a_qos2_publisher_delivers_every_reading_once(site, cloud, make_gateway, tmp_path):
    gw = make_gateway(site, cloud).start()
    sink = CloudCollector(cloud.port, gw.gateway_id)
    pub = Publisher(site.port)
    t0 = time.time()
    for i in range(1000):
        pub.publish(f"sensors/q2-{i % 4}/telemetry",
                    orjson.dumps({"ts": t0 + i * 0.001, "i": i}), qos=2)
        if i % 100 == 0:
            pub.publish(f"sensors/q2-{i % 4}/count", str(i), qos=2)
    pub.close()  # every PUBCOMP is in
    assert sink.wait_for(lambda: len(sink.unique()) >= 1010, 20), \
        f"{len(sink.unique())} of 1010 arrived; gateway log:\n{gw.log()}"
    assert gw.stop() == 0
    got = list(sink.unique().values())
    assert sorted(r["i"] for r in got if "i" in r) == list(range(1000))
    assert sorted(r["count"] for r in got if "count" in r) == list(range(0, 1000, 100))
    logged = logged_readings(tmp_path / "log.db")
    assert len(logged) == 1010
    assert sorted(r["i"] for r in logged if "i" in r) == list(range(1000))
    sink.close()


# -- 4. retained messages --------------------------------------------------------------------


def test_a_retained_reading_is_logged_once_across_restarts(site, cloud, make_gateway, tmp_path):
    pub = V5Publisher(site.port)
    pub.publish_v5("sensors/ret/telemetry", orjson.dumps({"ts": time.time(), "kept": 1}),
                   retain=True)
    pub.publish_v5("sensors/ret/level", b"7", retain=True)
    pub.wait()
    gw = make_gateway(site, cloud)
    # Subscribed before the gateway starts: the retained readings are forwarded at once.
    sink = CloudCollector(cloud.port, gw.gateway_id)
    gw.start()
    assert sink.wait_for(lambda: len(sink.unique()) == 2, 10), gw.log()
    assert gw.stop() == 0
    gw.start()  # the same persistent site session: its subscriptions are still there
    # A marker published after SUBACK comes after any retained copy the broker would send.
    pub.publish_v5("sensors/ret/telemetry", orjson.dumps({"marker": 1}))
    pub.wait()
    assert sink.wait_for(lambda: len(sink.unique()) == 3, 10), gw.log()
    assert gw.stop() == 0
    logged = logged_readings(tmp_path / "log.db")
    metrics = Counter(k for r in logged for k in r if k not in ("seq", "device", "ts"))
    assert metrics == {"kept": 1, "level": 1, "marker": 1}, logged
    pub.close()
    sink.close()


# -- 5. the site broker restarts mid-stream ------------------------------------------------


def test_site_broker_restart_mid_stream_logs_and_forwards_everything_once(
        cloud, make_gateway, tmp_path):
    # Persistence (on in the test broker) keeps the gateway's session and what was in
    # flight to it across the restart; autosave on every change keeps it complete.
    site = Mosquitto(tmp_path, "psite", extra="autosave_interval 1\nautosave_on_changes true\n"
                     ).start()
    try:
        gw = make_gateway(site, cloud).start()
        sink = CloudCollector(cloud.port, gw.gateway_id)
        t0 = time.time()
        sent: list[tuple[str, float]] = []

        def publish(pub: Publisher, start: int, count: int) -> None:
            for i in range(start, start + count):
                device, ts = f"r{i % 3}", round(t0 + i * 0.001, 3)
                pub.publish(f"sensors/{device}/telemetry", orjson.dumps({"ts": ts, "i": i}))
                sent.append((device, ts))
            pub.wait()

        pub = Publisher(site.port)
        publish(pub, 0, 500)
        assert sink.wait_for(lambda: len(sink.unique()) == 500, 20), gw.log()
        # Freeze the gateway so that what the broker sends it now stays unacknowledged:
        # after the restart the broker redelivers it (DUP), although the gateway, woken,
        # reads and logs it from its old socket first.
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGSTOP)
        try:
            publish(pub, 500, 500)  # PUBACKed to us: queued to the gateway's session
            pub.close()
            site.stop()
            site.start()
        finally:
            gw.proc.send_signal(signal.SIGCONT)
        pub = Publisher(site.port)
        publish(pub, 1000, 500)
        pub.close()
        assert sink.wait_for(
            lambda: len({(r["device"], r["ts"]) for r in sink.unique().values()}) >= 1500, 30
        ), gw.log()
        got = sink.unique()
        assert sorted(r["i"] for r in got.values()) == list(range(1500)), \
            "each reading under one seq"
        redelivered = gw.metric("fieldgate_site_redeliveries_total")
        assert gw.stop() == 0
        logged = logged_readings(tmp_path / "log.db")
        per_key = Counter((r["device"], r["ts"]) for r in logged)
        assert per_key == Counter(sent), [k for k, n in per_key.items() if n > 1][:5]
        assert redelivered and redelivered > 0, "the broker redelivered nothing with DUP"
        sink.close()
    finally:
        site.stop()


# -- 6. the cloud broker's Receive Maximum and Maximum Packet Size ---------------------------


@pytest.mark.parametrize("receive_maximum", [
    1,
    3,
])
def test_the_uplink_honours_the_cloud_brokers_receive_maximum_and_packet_size(
        site, make_gateway, tmp_path, receive_maximum):
    """Mosquitto announces max_inflight_messages as Receive Maximum and max_packet_size as
    Maximum Packet Size in CONNACK. The tap counts the gateway's unacknowledged PUBLISH
    packets behind 50 ms of latency (a far-away broker: the whole window is on the wire
    before a PUBACK returns), from a reconnect on, when a backlog waits in the log and the
    birth message goes out too."""
    cloud = Mosquitto(tmp_path, "tight-cloud", extra=f"max_inflight_messages {receive_maximum}\n"
                      "max_packet_size 8192\n").start()
    tap = MqttTap(cloud.port, latency=0.05)
    try:
        gw = make_gateway(site, None, cloud={"url": tap.url}, ingest={"max_metrics": 2000})
        sink = CloudCollector(cloud.port, gw.gateway_id)  # its session outlives the outage
        cloud.stop()
        gw.start()
        pub = Publisher(site.port)
        for i in range(3000):
            pub.publish(f"sensors/d{i % 5}/telemetry", orjson.dumps({"i": i, "v": 21.5}))
            if i == 1500:  # one reading of ~15 KB: no batch can carry it
                pub.publish("sensors/big/telemetry", orjson.dumps(
                    {f"metric_{k:04d}": 1234567.25 for k in range(800)}))
        pub.close()
        assert CloudCollector.wait_for(lambda: gw.metric("fieldgate_readings_total") == 3001,
                                       20), gw.log()
        cloud.start()
        assert sink.wait_for(lambda: len(sink.unique()) == 3000, 30), \
            f"{len(sink.unique())} of 3000 arrived; gateway log:\n{gw.log()}"
        assert sorted(r["i"] for r in sink.unique().values()) == list(range(3000))
        assert CloudCollector.wait_for(
            lambda: gw.metric("fieldgate_uplink_dead_lettered_readings_total") == 1.0, 10)
        assert gw.stop() == 0
        [row] = dead_letters(gw.config, "uplink_rejected:0x95")
        assert "Maximum Packet Size 8192" in row["detail"]
        # One connection once the broker was back: it never had to disconnect the gateway.
        assert tap.connections == 1, f"{tap.connections} connections"
        publishes = [p for _, way, p in tap.events
                     if way == "c2s" and isinstance(p, mqtt5.PublishPacket)]
        assert max(len(p.write()) for p in publishes) <= 8192
        assert tap.max_outstanding <= receive_maximum, \
            f"{tap.max_outstanding} PUBLISH unacknowledged at once; CONNACK said " \
            f"Receive Maximum {receive_maximum}"
        sink.close()
    finally:
        tap.close()
        cloud.stop()


# -- 7. publishing while the cloud link reconnects ------------------------------------------


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


# -- 8. back after a cloud outage ------------------------------------------------------------

# The outage of issue 10's comparison. Its length is the scenario, not a readiness wait.
_OUTAGE = 20.0


def test_while_the_cloud_is_unreachable_the_gateway_probes_about_once_a_second(
        site, cloud, make_gateway):
    """Readings flow again within ~2 s of the cloud broker's return (issue 10) only if the
    gateway keeps probing an unreachable broker about once a second. Tests assert no
    wall-clock figure, so this counts the failed attempts during the outage (the gateway's
    own counter): at least one per 2 s in each half of it. The seconds are measured by
    bench/bench_reconnect.py."""
    from gateway.config import Uplink

    defaults = Uplink()  # the policy a user runs with, not the tests' quick backoff
    gw = make_gateway(site, cloud, uplink={"backoff_min": defaults.backoff_min,
                                           "backoff_max": defaults.backoff_max}).start()
    sink = CloudCollector(cloud.port, gw.gateway_id)
    pub = Publisher(site.port)
    failures = 'fieldgate_link_connect_failures_total{link="cloud"}'

    def publish(start: int) -> None:
        for i in range(start, start + 100):
            pub.publish("sensors/o/telemetry", orjson.dumps({"i": i}))
        pub.wait()

    publish(0)
    assert sink.wait_for(lambda: len(sink.unique()) == 100, 10), gw.log()
    cloud.stop()
    assert CloudCollector.wait_for(
        lambda: gw.metric('fieldgate_link_connected{link="cloud"}') == 0.0, 10)
    counts = [gw.metric(failures) or 0.0]
    for half in range(2):
        threading.Event().wait(_OUTAGE / 2)      # the outage itself
        publish(100 * (half + 1))
        counts.append(gw.metric(failures) or 0.0)
    cloud.start()
    assert sink.wait_for(lambda: len(sink.unique()) == 300, 30), gw.log()
    assert sorted(r["i"] for r in sink.unique().values()) == list(range(300))
    assert gw.stop() == 0
    sink.close()
    per_half = [b - a for a, b in itertools.pairwise(counts)]
    least = _OUTAGE / 2 / 2
    assert all(n >= least for n in per_half), \
        f"failed attempts per {_OUTAGE / 2:.0f} s of outage: {per_half}; about one per " \
        f"second is the goal, at least {least:.0f} the bound"
