"""`gateway cloud ingest` (issue 12): real Mosquitto, real InfluxDB 1.x, workers as real
processes on one shared subscription, fake gateways publishing the real uplink format."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.cloud.config import parse_cloud_config, sample_cloud_config
from gateway.cloud.decode import BadMessage, Kind, Reason, decode
from gateway.cloud.state import GapNews, IngestState
from gateway.errors import ConfigError
from gateway.mosquitto import Mosquitto
from tests.cloud_helpers import (
    ROOT,
    FakeGateway,
    FleetPublisher,
    IngestProcess,
    readings,
    wait_for,
    write_config,
)
from tests.tsdb import InfluxD, influxd  # noqa: F401 - the fixture

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def cloud_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path, "cloud").start()
    yield broker
    broker.stop()


@pytest.fixture
def workers() -> Iterator[list[IngestProcess]]:
    started: list[IngestProcess] = []
    yield started
    for worker in started:
        if worker.proc is not None and worker.proc.poll() is None:
            worker.stop()
    for worker in started:
        assert not worker.unexpected_errors(), worker.log()


_DBS = iter(range(1000))


def _db(influx: InfluxD) -> str:
    name = f"cloud{next(_DBS)}"
    influx.create_database(name)
    return name


def _config(tmp_path: Path, broker: Mosquitto, influx: InfluxD, db: str, **extra: Any) -> Path:
    return write_config(tmp_path / "cloud.yaml", broker_url=broker.url,
                        influx={"url": influx.url, "database": db},
                        state=tmp_path / "ingest.db", **extra)


def _count(influx: InfluxD, db: str) -> int:
    return influx.count(db, field="temp")


# -- units: config, decoder, state ------------------------------------------------------------

def test_committed_sample_matches_the_models() -> None:
    assert (ROOT / "deploy" / "cloud.example.yaml").read_text() == sample_cloud_config()


def test_check_detects_a_cloud_config_and_names_a_bad_field(tmp_path: Path) -> None:
    good = write_config(tmp_path / "good.yaml", broker_url="mqtt://127.0.0.1:1883",
                        influx={}, state=tmp_path / "s.db")
    run = subprocess.run([sys.executable, "-m", "gateway", "check", "-c", str(good)],
                         cwd=ROOT, capture_output=True, text=True, check=False)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("broker: {url: 'mqtt://127.0.0.1:1883'}\ngroup: 'a/b'\n")
    run = subprocess.run([sys.executable, "-m", "gateway", "check", "--cloud", "-c", str(bad)],
                         cwd=ROOT, capture_output=True, text=True, check=False)
    assert run.returncode == 2
    assert "group: 'a/b' may not contain" in run.stderr and "Traceback" not in run.stderr


def test_influx_site_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"influx\.site is not used here"):
        parse_cloud_config({"influx": {"site": "x"}})


def test_decoder_takes_the_uplink_and_names_what_is_wrong() -> None:
    rows = readings("gw-1", 10, 3)
    up = decode("fieldgate/gw-1/telemetry", orjson.dumps({"gateway": "gw-1", "readings": rows}),
                (("seq_first", "10"), ("seq_last", "12")))
    assert (up.kind, up.first, up.last, len(up.readings)) == (Kind.TELEMETRY, 10, 12, 3)
    cases = [
        ("fieldgate/gw-1/telemetry", b"{nope", Reason.JSON),
        ("fieldgate/gw-1/telemetry", orjson.dumps({"gateway": "gw-2", "readings": rows}),
         Reason.GATEWAY),
        ("fieldgate/gw-1/telemetry", orjson.dumps({"gateway": "gw-1", "readings": [{}]}),
         Reason.SHAPE),
        ("sensors/x", b"{}", Reason.TOPIC),
        ("fieldgate/gw-1/telemetry",   # a device id the edge would refuse: not a tag
         orjson.dumps({"gateway": "gw-1", "readings": [{**rows[0], "device": "d1 x,y=z"}]}),
         Reason.SHAPE),
    ]
    for topic, payload, reason in cases:
        with pytest.raises(BadMessage) as err:
            decode(topic, payload, ())
        assert err.value.reason is reason


def test_out_of_order_ranges_make_no_gap_until_they_wait(tmp_path: Path) -> None:
    state = IngestState(tmp_path / "s.db")
    state.record({"gw": [(1, 10)]}, now=0)
    state.record({"gw": [(21, 30)]}, now=1)       # 11..20 with another worker
    assert state.due(3, gap_wait=5, resend_timeout=30, attempts=3) == ([], [])
    state.record({"gw": [(11, 20)]}, now=4)       # the redelivery came in time
    assert state.high_water("gw") == 30
    state.record({"gw": [(41, 50)]}, now=10)
    requests, reports = state.due(16, gap_wait=5, resend_timeout=30, attempts=3)
    assert [(r.first, r.last) for r in requests] == [(31, 40)]
    assert [(r.news, r.count) for r in reports] == [(GapNews.DETECTED, 10)]
    lost = state.answer("gw", requests[0].request_id, missing=[(31, 35)], error=None, now=17)
    assert [(r.news, r.first, r.last) for r in lost] == [(GapNews.LOST, 31, 35)]
    assert state.high_water("gw") == 35
    repaired = state.record({"gw": [(36, 40)]}, now=18)
    assert [r.news for r in repaired] == [GapNews.REPAIRED]
    assert state.high_water("gw") == 50


# -- the worker against real servers ------------------------------------------------------------

def test_three_workers_share_twenty_gateways_and_write_every_reading_once(
        tmp_path: Path, cloud_broker: Mosquitto, influxd: InfluxD,  # noqa: F811
        workers: list[IngestProcess]) -> None:
    db = _db(influxd)
    config = _config(tmp_path, cloud_broker, influxd, db)
    workers += [IngestProcess(config, f"ingest-{i}", tmp_path).start() for i in range(3)]
    pub = FleetPublisher(cloud_broker.port)
    gateways = [f"gw-{g:02d}" for g in range(20)]
    per_batch, batches = 25, 20
    for b in range(batches):
        for gw in gateways:
            pub.batch(gw, readings(gw, 1 + b * per_batch, per_batch))
    pub.close()
    total = len(gateways) * per_batch * batches
    assert wait_for(lambda: _count(influxd, db) >= total), _count(influxd, db)
    assert _count(influxd, db) == total
    # Spread: every worker took a share of the messages.
    shares = [w.metric('fieldgate_ingest_messages_total{kind="telemetry"}') for w in workers]
    assert sum(shares) >= len(gateways) * batches and min(shares) > 0, shares
    # Every gateway's tags as the edge sink writes them (site: the gateway's id).
    tags = influxd.query('SHOW TAG VALUES FROM "telemetry" WITH KEY = "gateway"', db)
    assert len(tags["results"][0]["series"][0]["values"]) == 20
    assert wait_for(lambda: all(w.metric("fieldgate_ingest_pending") == 0 for w in workers))
    assert sum(w.metric("fieldgate_ingest_gaps_total") for w in workers) == 0


def test_a_worker_killed_mid_stream_loses_nothing(
        tmp_path: Path, cloud_broker: Mosquitto, influxd: InfluxD,  # noqa: F811
        workers: list[IngestProcess]) -> None:
    db = _db(influxd)
    config = _config(tmp_path, cloud_broker, influxd, db)
    a, b = (IngestProcess(config, f"ingest-{i}", tmp_path).start() for i in range(2))
    workers += [a, b]
    pub = FleetPublisher(cloud_broker.port)
    gateways = [f"gw-{g}" for g in range(5)]
    for n in range(40):
        for gw in gateways:
            pub.batch(gw, readings(gw, 1 + n * 20, 20))
        if n == 10:
            pub.wait()
            assert wait_for(lambda: b.metric("fieldgate_ingest_acked_total") > 0)
            b.stop(signal.SIGKILL)
    pub.close()
    b.start()   # the same client id: Mosquitto kept its session and its unacknowledged share
    total = len(gateways) * 40 * 20
    assert wait_for(lambda: _count(influxd, db) >= total), _count(influxd, db)
    assert _count(influxd, db) == total


def test_influxdb_down_holds_messages_at_the_broker_and_loses_nothing(
        tmp_path: Path, cloud_broker: Mosquitto, workers: list[IngestProcess]) -> None:
    influx = InfluxD(tmp_path).start()
    try:
        db = _db(influx)
        config = _config(tmp_path, cloud_broker, influx, db, receive_maximum=50)
        worker = IngestProcess(config, "ingest-0", tmp_path).start()
        worker.expected_errors.append("Cannot write")
        workers.append(worker)
        influx.stop()
        pub = FleetPublisher(cloud_broker.port)
        for n in range(200):
            pub.batch("gw-1", readings("gw-1", 1 + n * 10, 10))
        pub.close()
        # The broker fills our window and holds the rest: memory stays at the bound.
        assert wait_for(lambda: worker.metric("fieldgate_ingest_pending") == 50)
        assert wait_for(lambda: worker.metric(
            'fieldgate_ingest_influx_requests_total{outcome="retry"}') >= 2)
        assert worker.metric("fieldgate_ingest_pending") == 50
        assert worker.metric('fieldgate_ingest_messages_total{kind="telemetry"}') == 50
        influx.start()
        assert wait_for(lambda: _count(influx, db) >= 2000), _count(influx, db)
        assert _count(influx, db) == 2000
        assert "Writing to" in worker.log()
    finally:
        influx.stop()


def test_a_seq_jump_is_reported_with_its_size_when_the_gateway_no_longer_has_it(
        tmp_path: Path, cloud_broker: Mosquitto, influxd: InfluxD,  # noqa: F811
        workers: list[IngestProcess]) -> None:
    db = _db(influxd)
    config = _config(tmp_path, cloud_broker, influxd, db, gap_wait="200ms",
                     resend_timeout="2s")
    worker = IngestProcess(config, "ingest-0", tmp_path).start()
    workers.append(worker)
    pub = FleetPublisher(cloud_broker.port)
    log = {r["seq"]: r for r in readings("gw-1", 1, 100) + readings("gw-1", 201, 100)}
    gateway = FakeGateway(cloud_broker.port, "gw-1", log, pub)   # 101..200 capped away
    pub.batch("gw-1", readings("gw-1", 1, 100))
    pub.batch("gw-1", readings("gw-1", 201, 100))
    pub.wait()
    assert wait_for(lambda: worker.metric(
        'fieldgate_ingest_gap_seqs_total{outcome="lost"}') == 100)
    assert gateway.requests[0]["from"] == 101 and gateway.requests[0]["to"] == 200
    assert worker.metric('fieldgate_ingest_gap_seqs_total{outcome="detected"}') == 100
    assert wait_for(lambda: len(influxd.points(db, "events")) == 2)
    events = influxd.points(db, "events")
    gaps = sorted((e["rule"], e["value"], e["severity"]) for e in events
                  if e["type"] == "io.fieldgate.gateway.gap" and e["gateway"] == "gw-1")
    assert gaps == [("gap_detected", 100, "warning"), ("gap_lost", 100, "critical")]
    gateway.close()
    pub.close()


def test_a_gap_is_repaired_from_the_gateways_log(
        tmp_path: Path, cloud_broker: Mosquitto, influxd: InfluxD,  # noqa: F811
        workers: list[IngestProcess]) -> None:
    db = _db(influxd)
    config = _config(tmp_path, cloud_broker, influxd, db, gap_wait="200ms")
    worker = IngestProcess(config, "ingest-0", tmp_path).start()
    workers.append(worker)
    pub = FleetPublisher(cloud_broker.port)
    log = {r["seq"]: r for r in readings("gw-7", 1, 300)}
    gateway = FakeGateway(cloud_broker.port, "gw-7", log, pub)
    pub.batch("gw-7", readings("gw-7", 1, 100))
    pub.batch("gw-7", readings("gw-7", 201, 100))   # 101..200: acknowledged, then lost
    pub.wait()
    assert wait_for(lambda: _count(influxd, db) == 300), _count(influxd, db)
    assert wait_for(lambda: worker.metric(
        'fieldgate_ingest_gap_seqs_total{outcome="repaired"}') == 100)
    assert worker.metric('fieldgate_ingest_gap_seqs_total{outcome="lost"}') == 0
    assert len(gateway.requests) == 1
    gateway.close()
    pub.close()


def test_bad_messages_are_dead_lettered_and_never_block(
        tmp_path: Path, cloud_broker: Mosquitto, influxd: InfluxD,  # noqa: F811
        workers: list[IngestProcess]) -> None:
    db = _db(influxd)
    config = _config(tmp_path, cloud_broker, influxd, db, gateways=["gw-*"])
    worker = IngestProcess(config, "ingest-0", tmp_path).start()
    workers.append(worker)
    pub = FleetPublisher(cloud_broker.port)
    pub.send("fieldgate/gw-1/telemetry", b"not json")
    pub.batch("intruder", readings("intruder", 1, 5))
    # seq properties the readings do not bear out: one past SQLite's integers (it crashed
    # the worker, again on every redelivery), one that would hide every later gap.
    pub.batch("gw-1", readings("gw-1", 6, 1), extra=[("seq_last", str(2**70))])
    pub.batch("gw-1", readings("gw-1", 7, 1), extra=[("seq_last", str(2**62))])
    pub.batch("gw-1", readings("gw-1", 1, 5))
    pub.send("fieldgate/gw-1/status", orjson.dumps({"state": "online", "gateway": "gw-1",
                                                    "readings": 5}), retain=True)
    pub.close()
    assert wait_for(lambda: _count(influxd, db) == 5)
    assert wait_for(lambda: len(influxd.points(db, "fieldgate")) == 1)
    assert influxd.points(db, "fieldgate")[0]["online"] == 1
    assert worker.metric('fieldgate_ingest_dead_letters_total{reason="not_json"}') == 1
    assert worker.metric('fieldgate_ingest_dead_letters_total{reason="unknown_gateway"}') == 1
    assert worker.metric('fieldgate_ingest_dead_letters_total{reason="bad_shape"}') == 2
    assert worker.stop() == 0
    shown = subprocess.run([sys.executable, "-m", "gateway", "cloud", "dlq", "-c", str(config)],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "not_json 1" in shown and "unknown_gateway 1" in shown
    assert "fieldgate/intruder/telemetry" in shown
