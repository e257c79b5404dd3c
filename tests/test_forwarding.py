"""End to end with real Mosquitto: site broker -> gateway -> cloud broker."""

from __future__ import annotations

import time
from collections import defaultdict

import orjson

from tests.mqtt_helpers import CloudCollector, Publisher


def test_every_reading_arrives_in_order_per_device(site, cloud, make_gateway):
    gw = make_gateway(site, cloud).start()
    sink = CloudCollector(cloud.port, gw.gateway_id)
    pub = Publisher(site.port)
    devices = [f"dev-{i}" for i in range(10)]
    n_per_device = 300
    t0 = time.time()
    for i in range(n_per_device):
        for d in devices:
            if i % 3 == 0:  # arrays of readings too
                pub.publish(f"sensors/{d}/telemetry",
                            orjson.dumps([{"ts": t0 + i, "i": i, "temp": 20.5}]))
            elif i % 3 == 1:
                pub.publish(f"sensors/{d}/telemetry", orjson.dumps({"ts": t0 + i, "i": i}))
            else:
                pub.publish(f"sensors/{d}/i", str(i))
    pub.close()
    total = len(devices) * n_per_device
    assert sink.wait_for(lambda: len(sink.unique()) >= total, 30), \
        f"{len(sink.unique())} of {total} arrived; gateway log:\n{gw.log()}"
    by_device: dict[str, list[int]] = defaultdict(list)
    for seq in sorted(sink.unique()):
        r = sink.unique()[seq]
        by_device[r["device"]].append(r["i"])
    for d in devices:
        assert by_device[d] == list(range(n_per_device)), d
    assert sink.status and sink.status[0]["state"] == "online"
    assert gw.stop() == 0
    assert sink.wait_for(lambda: sink.status[-1]["state"] == "offline", 5)
    assert sink.status[-1]["reason"] == "shutdown"
    sink.close()


def test_batches_fit_the_cloud_brokers_maximum_packet_size(site, make_gateway, tmp_path):
    from gateway.mosquitto import Mosquitto

    cloud = Mosquitto(tmp_path, "small-cloud", extra="max_packet_size 16384\n").start()
    try:
        gw = make_gateway(site, cloud).start()
        sink = CloudCollector(cloud.port, gw.gateway_id)
        pub = Publisher(site.port)
        for i in range(3000):
            pub.publish("sensors/d/telemetry", orjson.dumps({"i": i, "temperature": 21.5}))
        pub.close()
        assert sink.wait_for(lambda: len(sink.unique()) == 3000, 20), gw.log()
        assert sorted(r["i"] for r in sink.unique().values()) == list(range(3000))
        assert gw.stop() == 0
        sink.close()
    finally:
        cloud.stop()


def _dlq(gw, reason: str) -> list[dict]:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "gateway", "log", "dlq", "-c", str(gw.config),
                          "--reason", reason, "--json"], capture_output=True, text=True,
                         timeout=60, check=True)
    return [orjson.loads(line) for line in out.stdout.splitlines()]


def test_a_topic_the_cloud_acl_denies_is_dead_lettered_and_telemetry_flows(
        site, make_gateway, tmp_path):
    from gateway.mosquitto import Mosquitto

    acl = tmp_path / "acl"
    # The gateway may publish telemetry and status, not events: PUBACK 0x87 for events.
    acl.write_text("topic read fieldgate/#\ntopic write fieldgate/+/telemetry\n"
                   "topic write fieldgate/+/status\n")
    cloud = Mosquitto(tmp_path, "acl-cloud", extra=f"acl_file {acl}\n").start()
    try:
        gw = make_gateway(site, cloud).start()
        sink = CloudCollector(cloud.port, gw.gateway_id)
        pub = Publisher(site.port)
        for i in range(100):
            pub.publish("sensors/d/telemetry", orjson.dumps({"i": i}))
        pub.wait()
        pub.publish("devices/gh-9/cmd/ack", b"not an acknowledgement")  # becomes an event
        pub.wait()
        for i in range(100, 200):
            pub.publish("sensors/d/telemetry", orjson.dumps({"i": i}))
        pub.close()
        assert sink.wait_for(lambda: len(sink.unique()) == 200, 20), \
            f"{len(sink.unique())} of 200 arrived; gateway log:\n{gw.log()}"
        assert sorted(r["i"] for r in sink.unique().values()) == list(range(200))
        assert sink.wait_for(
            lambda: (gw.metric('fieldgate_uplink_rejected_total{code="0x87"}') or 0) >= 1, 10)
        assert gw.metric("fieldgate_dead_letters_total"
                         '{reason="uplink_rejected:0x87"}') == 1.0
        assert gw.stop() == 0
        [row] = _dlq(gw, "uplink_rejected:0x87")
        assert row["topic"].startswith(f"fieldgate/{gw.gateway_id}/events/io.fieldgate.")
        assert "Not authorized" in row["detail"]
        assert orjson.loads(row["payload"])["specversion"] == "1.0"
        assert "refused seq" in gw.log() and "for good" in gw.log()
        sink.close()
    finally:
        cloud.stop()


def test_a_reading_over_the_brokers_maximum_packet_size_is_dead_lettered_and_the_rest_flows(
        site, make_gateway, tmp_path):
    from gateway.mosquitto import Mosquitto

    cloud = Mosquitto(tmp_path, "small-cloud", extra="max_packet_size 16384\n").start()
    try:
        gw = make_gateway(site, cloud, ingest={"max_metrics": 2000}).start()
        sink = CloudCollector(cloud.port, gw.gateway_id)
        pub = Publisher(site.port)
        for i in range(100):
            pub.publish("sensors/d/telemetry", orjson.dumps({"i": i}))
        # One site message of 1,000 readings (~90 KB): cut into batches that fit, delivered.
        many = [{"many": k, "pad": 1234567.25} for k in range(1000)]
        pub.publish("sensors/d/telemetry", orjson.dumps(many))
        # One reading of 1,500 metrics (~30 KB): no batch can carry it.
        pub.publish("sensors/d/telemetry",
                    orjson.dumps({f"metric_{k:05d}": 1234567.25 for k in range(1500)}))
        for i in range(100, 200):
            pub.publish("sensors/d/telemetry", orjson.dumps({"i": i}))
        pub.close()
        assert sink.wait_for(lambda: len(sink.unique()) == 1200, 20), \
            f"{len(sink.unique())} of 1200 arrived; gateway log:\n{gw.log()}"
        got = sink.unique().values()
        assert sorted(r["i"] for r in got if "i" in r) == list(range(200))
        assert sorted(r["many"] for r in got if "many" in r) == list(range(1000))
        assert not any("metric_00000" in r for r in got)
        assert gw.metric('fieldgate_uplink_rejected_total{code="0x95"}') == 1.0
        assert gw.metric("fieldgate_uplink_dead_lettered_readings_total") == 1.0
        assert gw.stop() == 0
        [row] = _dlq(gw, "uplink_rejected:0x95")
        assert row["topic"] == f"fieldgate/{gw.gateway_id}/telemetry"
        assert "Maximum Packet Size 16384" in row["detail"]
        assert row["size"] > 16384
        assert "Lost" not in gw.log(), "the broker never had to disconnect us"
        sink.close()
    finally:
        cloud.stop()


def test_booleans_reach_the_cloud_as_numbers(site, cloud, make_gateway):
    gw = make_gateway(site, cloud).start()
    sink = CloudCollector(cloud.port, gw.gateway_id)
    pub = Publisher(site.port)
    pub.publish("sensors/d/telemetry", b'{"door": true, "t": 1}')
    pub.publish("sensors/d/relay", b"false")
    pub.close()
    assert sink.wait_for(lambda: len(sink.unique()) == 2, 10), gw.log()
    first, second = (sink.unique()[s] for s in sorted(sink.unique()))
    assert first["door"] == 1 and type(first["door"]) is int
    assert second["relay"] == 0 and type(second["relay"]) is int
    assert gw.stop() == 0
    sink.close()


def test_each_puback_reason_code_has_a_documented_verdict():
    from pathlib import Path

    from gateway.sinks.uplink import Verdict, verdict

    table = {0x00: Verdict.DELIVERED, 0x10: Verdict.DELIVERED, 0x80: Verdict.RETRY,
             0x83: Verdict.RETRY, 0x87: Verdict.DEAD_LETTER, 0x90: Verdict.DEAD_LETTER,
             0x91: Verdict.RETRY, 0x95: Verdict.SPLIT, 0x97: Verdict.BACK_OFF,
             0x99: Verdict.DEAD_LETTER}
    assert {code: verdict(code) for code in table} == table
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for code in table:
        assert f"0x{code:02x}" in readme, f"README.md does not say what 0x{code:02x} does"
