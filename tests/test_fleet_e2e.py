"""Issue 12 end to end, every part real: Mosquitto (site and cloud), `gateway run`,
`gateway cloud ingest`, InfluxDB 1.x.

1. A cloud broker killed (SIGKILL, persistence off) after it acknowledged batches the worker
   never got: the worker sees the hole in the gateway's seqs, asks the gateway for it, the
   gateway re-sends it from its log, and InfluxDB ends with every reading exactly once.
2. The full loop `devices simulate` -> site broker -> `gateway run` -> cloud broker ->
   `gateway cloud ingest` -> InfluxDB -> the dashboard's queries (deploy/grafana/), with no
   influx sink at the edge: the panels show what the gateway's log holds.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.mosquitto import Mosquitto
from tests.cloud_helpers import IngestProcess, wait_for, write_config
from tests.mqtt_helpers import Publisher
from tests.test_dashboards import _logged_readings
from tests.tsdb import InfluxD, influxd  # noqa: F401 - the fixture

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

_DBS = iter(range(1000))


def _db(influx: InfluxD, prefix: str) -> str:
    name = f"{prefix}{next(_DBS)}"
    influx.create_database(name)
    return name


def _publish(site: Mosquitto, first: int, count: int, per_message: int = 10) -> None:
    """Readings ``first``..``first + count - 1`` (field ``i``) to the site broker."""
    pub = Publisher(site.port)
    for start in range(first, first + count, per_message):
        batch = [{"i": i, "temp": 20 + i % 100 / 10}
                 for i in range(start, min(start + per_message, first + count))]
        pub.publish("sensors/dev-1/telemetry", orjson.dumps(batch))
    pub.close()


def _in_influx(influx: InfluxD, db: str) -> list[tuple[int, int]]:
    """(time in ms, i) of every reading point, in time order."""
    data = influx.query('SELECT "i" FROM "telemetry"', db)
    series = data["results"][0].get("series", [])
    return [(t, i) for s in series for t, i in s["values"]]


def test_cloud_broker_killed_after_acknowledging_the_gap_is_repaired_into_influxdb(
        site: Mosquitto, make_gateway: Any, influxd: InfluxD,  # noqa: F811
        tmp_path: Path) -> None:
    # The cloud broker keeps nothing on disk: killed, it forgets what it had acknowledged.
    cloud = Mosquitto(tmp_path, "cloud-volatile", extra="persistence false\n").start()
    db = _db(influxd, "gap")
    config = write_config(tmp_path / "cloud.yaml", broker_url=cloud.url,
                          influx={"url": influxd.url, "database": db},
                          state=tmp_path / "ingest.db", gap_wait="200ms",
                          resend_timeout="10s")
    worker = IngestProcess(config, "ingest-0", tmp_path)
    try:
        worker.start()
        gw = make_gateway(site, cloud).start()
        _publish(site, 0, 1000)
        assert wait_for(lambda: influxd.count(db, field="i") == 1000), \
            f"{influxd.count(db, field='i')} of 1000 written\n{worker.log()}\n{gw.log()}"

        # The worker stops; the cloud broker acknowledges what the gateway sends next (the
        # gateway's cursor moves on, correctly), then dies with it.
        assert worker.stop() == 0
        _publish(site, 1000, 1000)
        assert wait_for(lambda: gw.metric(
            'fieldgate_log_undelivered_readings{sink="uplink"}') == 0
            and gw.metric("fieldgate_uplink_readings_total") == 2000), gw.log()
        assert cloud.proc is not None
        cloud.proc.send_signal(signal.SIGKILL)
        cloud.proc.wait()
        cloud.start()   # same port, empty: seqs 1001..2000 are gone from the cloud

        worker.start()
        assert wait_for(lambda: gw.metric('fieldgate_link_connected{link="cloud"}') == 1)
        _publish(site, 2000, 1000)

        # The worker saw seq jump from 1000 to 2001, asked, and the gateway re-sent.
        assert wait_for(lambda: worker.metric(
            'fieldgate_ingest_gap_seqs_total{outcome="repaired"}') == 1000), \
            f"{worker.metrics()}\n{worker.log()}\n{gw.log()}"
        assert wait_for(lambda: influxd.count(db, field="i") >= 3000)
        assert worker.metric('fieldgate_ingest_gap_seqs_total{outcome="detected"}') == 1000
        assert worker.metric('fieldgate_ingest_gap_seqs_total{outcome="lost"}') == 0
        assert worker.metric("fieldgate_ingest_gaps_total") == 1
        # The high-water mark (refreshed every second) passes the repaired range.
        assert wait_for(lambda: worker.metric(
            'fieldgate_ingest_high_water{gateway="gw-test"}') == 3000)
        assert gw.metric("fieldgate_resent_records_total") == 1000
        assert gw.log().count("Resend '") == 1

        # Every reading the site sent, as the gateway logged it, is in InfluxDB exactly once:
        # same time, same value, no other point.
        assert gw.stop() == 0
        logged = sorted((round(r["ts"] * 1000), r["i"]) for r in
                        _logged_readings(tmp_path / "log.db"))
        assert [i for _, i in logged] == list(range(3000))
        assert sorted(_in_influx(influxd, db)) == logged
        events = [e for e in influxd.points(db, "events")
                  if e["type"] == "io.fieldgate.gateway.gap"]
        assert [(e["rule"], e["value"]) for e in events] == [("gap_detected", 1000)]
        assert worker.stop() == 0
        assert not worker.unexpected_errors(), worker.log()
    finally:
        if worker.proc is not None and worker.proc.poll() is None:
            worker.stop(signal.SIGKILL)
        cloud.stop()
