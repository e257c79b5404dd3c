"""Nothing lost: cloud outage, SIGKILL of the gateway, malformed floods, log caps."""

from __future__ import annotations

import random
import signal
import threading
import time

import orjson

from gateway.log.schema import connect
from tests.mqtt_helpers import CloudCollector, Publisher


def _steady_publisher(port: int, devices: int, per_device: int, pace: float) -> tuple[
        threading.Thread, list[int]]:
    """Publishes per_device readings for each device, pacing between rounds."""
    done: list[int] = []

    def run() -> None:
        pub = Publisher(port)
        for i in range(per_device):
            for d in range(devices):
                pub.publish(f"sensors/d{d}/telemetry", orjson.dumps({"i": i, "v": i * 0.5}))
            time.sleep(pace)
        pub.close()
        done.append(1)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, done


def _check_complete(sink: CloudCollector, devices: int, per_device: int) -> None:
    got = sink.unique()
    seen = {(r["device"], r["i"]) for r in got.values()}
    missing = [(f"d{d}", i) for d in range(devices) for i in range(per_device)
               if (f"d{d}", i) not in seen]
    assert not missing, f"{len(missing)} readings lost, e.g. {missing[:5]}"
    assert len(got) == devices * per_device  # distinct seqs: no reading stored twice


def test_cloud_outage_under_load_loses_nothing(site, cloud, make_gateway):
    gw = make_gateway(site, cloud).start()
    sink = CloudCollector(cloud.port, gw.gateway_id)
    devices, per_device = 5, 400
    thread, _ = _steady_publisher(site.port, devices, per_device, pace=0.01)
    total = devices * per_device
    assert sink.wait_for(lambda: len(sink.unique()) >= total // 10, 60)
    cloud.stop()                      # cut the cloud link mid-stream
    before = len(sink.unique())
    # The outage lasts until the gateway has noticed it and buffered a good part of the rest.
    assert CloudCollector.wait_for(
        lambda: gw.metric('fieldgate_link_connected{link="cloud"}') == 0.0
        and (gw.metric("fieldgate_readings_total") or 0) >= before + total // 5, 60)
    depth = gw.metric('fieldgate_log_undelivered_readings{sink="uplink"}')
    cloud.start()                     # same port; the collector's session survived
    thread.join(60)
    assert sink.wait_for(lambda: len(sink.unique()) >= total, 30), gw.log()
    assert 0 < before < total, "the outage must fall mid-stream"
    assert depth is not None and depth > 0, "the log should have buffered during the outage"
    _check_complete(sink, devices, per_device)
    assert gw.stop() == 0
    sink.close()


def test_cloud_outage_everything_arrives_after_restart(site, cloud, make_gateway):
    """With the cloud down from the start, all readings arrive once it comes up, in order."""
    cloud.stop()
    gw = make_gateway(site, cloud).start()
    pub = Publisher(site.port)
    for i in range(2000):
        pub.publish(f"sensors/d{i % 4}/telemetry", orjson.dumps({"i": i}))
    pub.close()
    assert CloudCollector.wait_for(lambda: gw.metric("fieldgate_readings_total") == 2000, 20)
    cloud.start()
    sink = CloudCollector(cloud.port, gw.gateway_id)
    assert sink.wait_for(lambda: len(sink.unique()) == 2000, 30), gw.log()
    assert sink.status[-1]["state"] == "online"  # retained birth message
    seqs = sorted(sink.unique())
    assert [sink.unique()[s]["i"] for s in seqs] == list(range(2000))
    assert "Lost cloud broker" in gw.log() or "Cannot reach cloud broker" in gw.log()
    assert gw.stop() == 0
    sink.close()


def test_sigkill_mid_stream_loses_nothing(site, cloud, make_gateway):
    gw = make_gateway(site, cloud).start()
    sink = CloudCollector(cloud.port, gw.gateway_id)
    devices, per_device = 4, 1500
    total = devices * per_device
    thread, done = _steady_publisher(site.port, devices, per_device, pace=0.001)
    assert CloudCollector.wait_for(
        lambda: (gw.metric("fieldgate_readings_total") or 0) >= total // 10, 60)
    gw.kill()                         # SIGKILL: no flush, no goodbye
    assert not done, "the kill must land mid-stream"
    gw.start()                        # same log, same persistent site session
    thread.join(60)
    assert sink.wait_for(
        lambda: len({(r["device"], r["i"]) for r in sink.unique().values()}) >= total, 30
    ), gw.log()
    got = sink.unique()
    seen = [(r["device"], r["i"]) for r in got.values()]
    duplicates = len(seen) - len(set(seen))
    # Redeliveries of messages already in the log are recognised and skipped; whatever
    # duplicates remain are the uplink's resends, which carry the same seq.
    assert duplicates == 0, f"{duplicates} readings were stored twice under new seqs"
    # Resent batches, if any, carry the same seq with the same reading: de-duplicable by seq.
    assert all(got[r["seq"]] == r for r in sink.readings)
    assert gw.stop() == 0
    sink.close()


def test_malformed_flood_between_good_readings(site, cloud, make_gateway, tmp_path):
    gw = make_gateway(site, cloud, ingest={"max_payload": "1KiB", "max_metrics": 8}).start()
    sink = CloudCollector(cloud.port, gw.gateway_id)
    now = time.time()
    bad = [
        ("sensors/b/telemetry", b"{not json", "bad_json"),
        ("sensors/b/telemetry", b'{"t": NaN}', "non_finite"),
        ("sensors/b/telemetry", b'{"t": "hot"}', "wrong_type"),
        ("sensors/b/telemetry", b'{"t": 1, "pad": "' + b"x" * 2000 + b'"}', "too_large"),
        ("sensors/b/telemetry", orjson.dumps({f"m{i}": i for i in range(20)}), "too_many_metrics"),
        ("sensors/b/telemetry", orjson.dumps({"ts": now - 10 * 365 * 86400, "t": 1}),
         "ts_out_of_range"),
        ("sensors/b/telemetry", orjson.dumps({"ts": now + 86400, "t": 1}), "ts_out_of_range"),
        ("sensors/b/telemetry", b"\x00\xff\xfe binary", "bad_json"),
        ("sensors/b/telemetry", b"[1, 2]", "bad_shape"),
        ("sensors/b/t", b"abc", "bad_json"),
        ("sensors/b/telemetry", orjson.dumps({"ts": "yesterday", "t": 1}), "bad_timestamp"),
    ]
    pub = Publisher(site.port)
    good = 0
    for _ in range(20):
        for topic, payload, _ in bad:
            pub.publish(topic, payload)
            pub.publish("sensors/g/telemetry", orjson.dumps({"i": good}))
            good += 1
    pub.close()
    assert sink.wait_for(lambda: len(sink.unique()) >= good, 20), gw.log()
    assert sorted(r["i"] for r in sink.unique().values()) == list(range(good))
    assert gw.proc is not None and gw.proc.poll() is None, "the daemon must stay up"
    assert gw.stop() == 0
    conn = connect(tmp_path / "log.db", readonly=True)
    reasons = [r for (r,) in conn.execute("SELECT reason FROM dead_letters ORDER BY id")]
    expected = [reason for _ in range(20) for _, _, reason in bad]
    assert reasons == expected
    topic, payload = conn.execute("SELECT topic, payload FROM dead_letters WHERE id=1").fetchone()
    assert (topic, payload) == ("sensors/b/telemetry", b"{not json")
    sink.close()


def test_cap_drop_oldest_keeps_newest_and_counts(site, cloud, make_gateway):
    cloud.stop()
    gw = make_gateway(site, cloud, log={"max_bytes": "256KiB", "when_full": "drop_oldest"},
                      ingest={"max_payload": "4KiB"}).start()
    pub = Publisher(site.port)
    n = 12000  # ~50 bytes each in the log (compressed): about 2x the cap
    noise = random.Random(1)
    for i in range(n):
        pub.publish("sensors/d/telemetry", orjson.dumps(
            {"i": i, "a": noise.random(), "b": noise.random()}))
    pub.close()
    assert CloudCollector.wait_for(lambda: gw.metric("fieldgate_readings_total") == n, 20)
    dropped = gw.metric('fieldgate_log_dropped_readings_total{reason="cap"}')
    assert dropped is not None and 0 < dropped < n
    assert gw.log().count("Log dropping undelivered readings") == 1  # once per episode
    cloud.start()
    sink = CloudCollector(cloud.port, gw.gateway_id)
    kept = n - int(dropped)
    assert sink.wait_for(lambda: len(sink.unique()) >= kept, 20), gw.log()
    time.sleep(0.5)
    got = sorted(r["i"] for r in sink.unique().values())
    assert got == list(range(n - kept, n)), "the newest readings survive, the oldest go"
    assert gw.stop() == 0
    sink.close()


def test_cap_refuse_backpressures_site_and_loses_nothing(site, cloud, make_gateway):
    cloud.stop()
    gw = make_gateway(site, cloud, log={"max_bytes": "256KiB", "when_full": "refuse"},
                      ingest={"max_payload": "4KiB"}).start()
    pub = Publisher(site.port)
    n = 12000  # ~50 bytes each in the log (compressed): about 2x the cap
    noise = random.Random(2)
    for i in range(n):
        pub.publish("sensors/d/telemetry", orjson.dumps(
            {"i": i, "a": noise.random(), "b": noise.random()}))
    pub.close()
    assert CloudCollector.wait_for(lambda: gw.metric("fieldgate_log_full") == 1.0, 20)
    time.sleep(1.0)
    stored = gw.metric("fieldgate_readings_total")
    assert stored is not None and stored < n, "the log must stop taking readings at the cap"
    assert gw.metric("fieldgate_log_full_episodes_total") == 1.0
    assert gw.log().count("Log full") == 1
    cloud.start()       # sinks drain, the log frees space, the site broker's backlog flows
    sink = CloudCollector(cloud.port, gw.gateway_id)
    assert sink.wait_for(lambda: len(sink.unique()) >= n, 40), gw.log()
    assert sorted(r["i"] for r in sink.unique().values()) == list(range(n))
    assert gw.metric('fieldgate_log_dropped_readings_total{reason="cap"}') in (None, 0.0)
    assert gw.stop() == 0
    sink.close()


def test_sigterm_stops_quickly_with_offline_status(site, cloud, make_gateway):
    gw = make_gateway(site, cloud).start()
    sink = CloudCollector(cloud.port, gw.gateway_id)
    assert sink.wait_for(lambda: bool(sink.status), 5)
    assert gw.stop(signal.SIGTERM) == 0
    assert sink.wait_for(lambda: sink.status[-1]["state"] == "offline", 5)
    assert sink.status[-1]["reason"] == "shutdown"  # our message, not the will
    sink.close()


def test_site_broker_down_at_start_then_up(site, cloud, make_gateway):
    site.stop()
    gw = make_gateway(site, cloud).launch()
    assert CloudCollector.wait_for(
        lambda: (gw.metric('fieldgate_link_connect_failures_total{link="site"}') or 0) >= 1, 10)
    site.start()
    gw.wait_ready()
    sink = CloudCollector(cloud.port, gw.gateway_id)
    pub = Publisher(site.port)
    for i in range(100):
        pub.publish("sensors/d/telemetry", orjson.dumps({"i": i}))
    pub.close()
    assert sink.wait_for(lambda: len(sink.unique()) == 100, 10), gw.log()
    assert gw.log().count("Cannot reach site broker") == 1  # once per outage, not per attempt
    assert gw.stop() == 0
    sink.close()


def test_repeated_sigkills_with_unbounded_inflight_log_each_message_once(
        site, cloud, make_gateway, tmp_path):
    """The site broker's in-flight window is unbounded (max_inflight_messages 0 in the test
    broker, as the outside testers ran it) and the gateway is SIGKILLed again and again
    mid-stream: every reading is logged once, under one seq, and every bad message is one
    dead letter."""
    import random

    gw = make_gateway(site, cloud, site={"receive_maximum": 100})
    gw.start()
    sink = CloudCollector(cloud.port, gw.gateway_id)
    devices, per_device = 4, 6000
    total = devices * per_device

    done: list[int] = []
    bad_sent: list[int] = []

    def run() -> None:
        pub = Publisher(site.port)
        for i in range(per_device):
            for d in range(devices):
                pub.publish(f"sensors/d{d}/telemetry", orjson.dumps({"i": i}))
            if i % 50 == 0:
                pub.publish("sensors/bad/telemetry", b"{bad json " + str(i).encode())
                bad_sent.append(i)
            time.sleep(0.001)   # ~4k readings/s
        pub.close()
        done.append(1)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    rng = random.Random(7)
    kills = 0
    for k in range(5):
        floor = (k + 1) * total // 7 + rng.randrange(total // 20)
        if not CloudCollector.wait_for(lambda f=floor: len(sink.unique()) >= f, 60):
            break
        if done:
            break
        gw.kill()
        kills += 1
        gw.start()
    thread.join(120)
    assert kills >= 3, "the kills must land mid-stream"
    assert sink.wait_for(
        lambda: len({(r["device"], r["i"]) for r in sink.unique().values()}) >= total, 60
    ), gw.log()
    got = sink.unique()
    seen = [(r["device"], r["i"]) for r in got.values()]
    assert len(seen) == len(set(seen)) == total, \
        f"{len(seen) - len(set(seen))} readings logged twice under new seqs"
    assert gw.stop() == 0
    conn = connect(tmp_path / "log.db", readonly=True)
    dead = [p for (p,) in conn.execute("SELECT payload FROM dead_letters")]
    assert sorted(dead) == sorted(b"{bad json " + str(i).encode() for i in bad_sent)
    stats = conn.execute("SELECT value FROM counters WHERE name='dead_letters.bad_json'")
    assert stats.fetchone()[0] == len(bad_sent)
    sink.close()
