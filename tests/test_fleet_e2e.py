"""Issue 12 end to end, every part real: Mosquitto (site and cloud), `gateway run`,
`gateway cloud ingest`, InfluxDB 1.x.

1. A cloud broker killed (SIGKILL, persistence off) after it acknowledged batches the worker
   never got: the worker sees the hole in the gateway's seqs, asks the gateway for it, the
   gateway re-sends it from its log, and InfluxDB ends with every reading exactly once
   (and the same kill mid-stream, the worker connected).
2. The full loop `devices simulate` -> site broker -> `gateway run` -> cloud broker ->
   `gateway cloud ingest` -> InfluxDB -> the dashboard's queries (deploy/grafana/), with no
   influx sink at the edge: the panels show what the gateway's log holds.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.mosquitto import Mosquitto
from gateway.query import InfluxConnection, InfluxQLClient, Series
from tests.cloud_helpers import READY, IngestProcess, wait_for, write_config
from tests.mqtt_helpers import Publisher
from tests.test_dashboards import (
    ANNOTATIONS,
    BAD_PAYLOADS,
    FLEET_DEVICES,
    GATEWAY,
    METRICS,
    Check,
    Grafana,
    Logged,
    _dead_letter_count,
    _dead_letters,
    _dead_letters_in_range,
    _events,
    _log_stats,
    _logged_events,
    _logged_readings,
    _metric,
    _readings_in_range,
    _used_bytes,
    _wait,
    annotations,
    column,
    dashboard,  # noqa: F401 - the fixture
    greenhouse_gateway,
    one_series,
    panel_results,
    panels,
    run_greenhouse,
)
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


@contextlib.contextmanager
def _volatile_cloud(tmp_path: Path, influx: InfluxD,
                    prefix: str) -> Iterator[tuple[Mosquitto, str, IngestProcess]]:
    """A cloud broker that keeps nothing on disk (killed, it forgets what it had
    acknowledged), a fresh database and one ingest worker on them, started; the worker is
    killed (if still running) and the broker stopped at the end."""
    cloud = Mosquitto(tmp_path, "cloud-volatile", extra="persistence false\n").start()
    db = _db(influx, prefix)
    config = write_config(tmp_path / "cloud.yaml", broker_url=cloud.url,
                          influx={"url": influx.url, "database": db},
                          state=tmp_path / "ingest.db", gap_wait="200ms",
                          resend_timeout="10s")
    worker = IngestProcess(config, "ingest-0", tmp_path)
    try:
        worker.start()
        yield cloud, db, worker
    finally:
        if worker.proc is not None and worker.proc.poll() is None:
            worker.stop(signal.SIGKILL)
        cloud.stop()


def _in_influx(influx: InfluxD, db: str) -> list[tuple[int, int]]:
    """(time in ms, i) of every reading point, in time order."""
    data = influx.query('SELECT "i" FROM "telemetry"', db)
    series = data["results"][0].get("series", [])
    return [(t, i) for s in series for t, i in s["values"]]


def test_cloud_broker_killed_after_acknowledging_the_gap_is_repaired_into_influxdb(
        site: Mosquitto, make_gateway: Any, influxd: InfluxD,  # noqa: F811
        tmp_path: Path) -> None:
    with _volatile_cloud(tmp_path, influxd, "gap") as (cloud, db, worker):
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



def test_cloud_broker_killed_mid_stream_with_the_worker_connected_loses_nothing(
        site: Mosquitto, make_gateway: Any, influxd: InfluxD,  # noqa: F811
        tmp_path: Path) -> None:
    """The same kill while readings flow and the worker is connected: what the broker had
    acknowledged and not delivered, and what the worker held unacknowledged, is gone from the
    cloud; gaps (if the kill made one) are repaired, and InfluxDB ends with every reading
    once (readings 1 ms apart: no two may share a written millisecond)."""
    with _volatile_cloud(tmp_path, influxd, "mid") as (cloud, db, worker):
        gw = make_gateway(site, cloud).start()
        sender = threading.Thread(target=_publish, args=(site, 0, 20_000))
        sender.start()
        assert wait_for(lambda: influxd.count(db, field="i") >= 3000), worker.log()
        assert cloud.proc is not None
        cloud.proc.send_signal(signal.SIGKILL)
        cloud.proc.wait()
        cloud.start()
        # A gap shows when a later seq arrives: the last readings go out once the worker is
        # subscribed again (what the gateway sent before that may be gone as well; with
        # nothing after it, that tail would not show until the gateway sends again).
        assert wait_for(lambda: worker.log().count(READY) == 2), worker.log()
        sender.join()
        _publish(site, 20_000, 1000)
        assert wait_for(lambda: worker.metric(
            'fieldgate_ingest_high_water{gateway="gw-test"}') == 21_000), \
            f"{worker.metrics()}\n{worker.log()}\n{gw.log()}"
        assert gw.stop() == 0
        logged = sorted((round(r["ts"] * 1000), r["i"]) for r in
                        _logged_readings(tmp_path / "log.db"))
        assert [i for _, i in logged] == list(range(21_000))
        assert sorted(_in_influx(influxd, db)) == logged
        assert worker.metric('fieldgate_ingest_gap_seqs_total{outcome="lost"}') == 0
        assert worker.metric('fieldgate_ingest_gap_seqs_total{outcome="repaired"}') == \
            worker.metric('fieldgate_ingest_gap_seqs_total{outcome="detected"}')
        assert worker.stop() == 0
        assert not worker.unexpected_errors(), worker.log()

# --- 2. the full loop into the dashboard ---------------------------------------------------

LOOP_DB = "fleetloop"


def _status_points(influx: InfluxD) -> list[tuple[int, dict[str, Any]]]:
    """The gateway's status as the worker wrote it (``fieldgate``), in time order."""
    data = influx.query(f"SELECT * FROM \"fieldgate\" WHERE \"gateway\" = '{GATEWAY}'",
                        LOOP_DB)
    series = data["results"][0].get("series", [])
    if not series:
        return []
    columns = series[0]["columns"]
    return [(row[0], dict(zip(columns, row, strict=True))) for row in series[0]["values"]]


@pytest.fixture(scope="module")
def loop_logged(influxd: InfluxD,  # noqa: F811
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Logged]:
    """The greenhouse fleet through the site broker and `gateway run` (no influx sink) to the
    cloud broker, where `gateway cloud ingest` writes it to ``LOOP_DB``; run until the alert
    fired and resolved, then stop the fleet, send the bad payloads, wait until every device
    is reported offline, the uplink drained, and a status point the worker wrote counts
    everything; stop the gateway (its "offline" status is written too), read its log."""
    work = tmp_path_factory.mktemp("fleetloop")
    influxd.create_database(LOOP_DB)
    site = Mosquitto(work, "site").start()
    cloud = Mosquitto(work, "cloud").start()
    config = write_config(work / "cloud.yaml", broker_url=cloud.url,
                          influx={"url": influxd.url, "database": LOOP_DB,
                                  "batch_max_delay": "200ms"},
                          state=work / "ingest.db")
    worker = IngestProcess(config, "ingest-loop", work)
    gw, key = greenhouse_gateway(work, site, cloud, uplink={"status_interval": "500ms"})
    assert "influx" not in gw.cfg
    log = work / "log.db"
    try:
        worker.start()
        gw.start()
        # The first status (counters at 0) is written before the first reading.
        _wait("first status point", lambda: bool(_status_points(influxd)), gw)
        run_greenhouse(work, site, key, gw, _status_points(influxd)[0][0])

        def drained() -> bool:
            offline = {e["subject"] for e in _logged_events(log)
                       if e["type"] == "io.fieldgate.device.offline"}
            return offline == set(FLEET_DEVICES) and \
                gw.metric('fieldgate_log_undelivered_readings{sink="uplink"}') == 0 and \
                _dead_letter_count(log, BAD_PAYLOADS) == len(BAD_PAYLOADS)

        _wait("devices offline, dead letters in, uplink drained", drained, gw)
        readings = _log_stats(gw.config)["counters"]["readings"]
        dead_letters = _dead_letter_count(log)

        def counted() -> bool:
            points = _status_points(influxd)
            last = points[-1][1] if points else {}
            return (last.get("readings_total") == readings
                    and last.get("dead_letters_total") == dead_letters
                    and last.get("depth_uplink") == 0)

        _wait("a status point that counts everything", counted, gw)
        assert gw.stop() == 0
        _wait("the offline status written",
              lambda: _status_points(influxd)[-1][1]["online"] == 0, gw)
        _wait("the worker idle", lambda: worker.metric("fieldgate_ingest_pending") == 0, gw)
        assert worker.stop() == 0
        status = _status_points(influxd)
        yield Logged(start_ms=status[0][0], end_ms=status[-1][0],
                     stats=_log_stats(gw.config), used_bytes=_used_bytes(log),
                     readings=_logged_readings(log), events=_logged_events(log),
                     health=status)
    finally:
        if gw.proc is not None and gw.proc.poll() is None:
            gw.kill()
        if worker.proc is not None and worker.proc.poll() is None:
            worker.stop(signal.SIGKILL)
        site.stop()
        cloud.stop()
    assert not gw.unexpected_errors(), f"gateway logged errors: {gw.unexpected_errors()}"
    assert not worker.unexpected_errors(), f"worker logged errors: {worker.log()}"


@pytest.fixture
def loop_grafana(dashboard: dict[str, Any], influxd: InfluxD,  # noqa: F811
                 loop_logged: Logged) -> Grafana:
    client = InfluxQLClient(InfluxConnection(url=influxd.url, database=LOOP_DB))
    g = Grafana(dashboard, client, from_ms=loop_logged.start_ms - 60_000,
                to_ms=loop_logged.end_ms + 60_000)
    g.load_variables()
    return g


def _uplink_buffered(res: dict[str, list[list[Series]]], logged: Logged) -> None:
    """The uplink's depth, from the status; the edge influx sink's column stays empty."""
    series = one_series(res)
    depths = [v for v in column(series, "uplink") if v is not None]
    assert depths and depths[-1] == 0  # drained
    assert max(depths) <= len(logged.readings)
    assert all(v is None for v in column(series, "influx"))


def _edge_only(res: dict[str, list[list[Series]]], logged: Logged) -> None:
    """Fields only the edge influx sink's health point carries: nothing through the cloud
    (the uplink's status has readings, dead letters and the uplink's depth, no more)."""
    for series in res[""][0]:
        assert all(v is None for row in series.values for v in row[1:]), series


LOOP_PANELS: dict[str, Check] = {
    "Readings in range": _readings_in_range,
    "Dead letters in range": _dead_letters_in_range,
    "Dead letters": _dead_letters,
    "Buffered readings per sink": _uplink_buffered,
    "$metric": _metric,
    "Events": _events,
    "Dropped in range": _edge_only,
    "Log size": _edge_only,
    "Readings/s per gateway": _edge_only,
    "Link state": _edge_only,
}


def test_every_panel_has_a_check_through_the_cloud(
        dashboard: dict[str, Any]) -> None:  # noqa: F811
    assert sorted(p["title"] for p in panels(dashboard)) == sorted(LOOP_PANELS)


def test_influxdb_holds_every_reading_and_event_the_log_took_through_the_cloud(
        influxd: InfluxD, loop_logged: Logged) -> None:  # noqa: F811
    readings = loop_logged.stats["counters"]["readings"]
    assert readings == len(loop_logged.readings) > 100
    assert loop_logged.stats["sinks"]["uplink"]["undelivered"] == 0
    data = influxd.query('SELECT count("temp") FROM "telemetry" GROUP BY "device"', LOOP_DB)
    counts = {s["tags"]["device"]: s["values"][0][1] for s in data["results"][0]["series"]}
    per_device = {d: sum(1 for r in loop_logged.readings if r["device"] == d and "temp" in r)
                  for d in FLEET_DEVICES}
    assert counts == per_device
    data = influxd.query('SELECT count("id") FROM "events"', LOOP_DB)
    assert data["results"][0]["series"][0]["values"][0][1] == len(loop_logged.events)
    # The gateway's status went online first, offline last.
    assert loop_logged.health[0][1]["online"] == 1
    assert loop_logged.health[-1][1]["online"] == 0


@pytest.mark.parametrize("title", sorted(LOOP_PANELS))
def test_panel_shows_the_cloud_written_series(loop_grafana: Grafana, loop_logged: Logged,
                                              title: str) -> None:
    (panel,) = [p for p in panels(loop_grafana.dashboard) if p["title"] == title]
    assert loop_grafana.interval_ms == 10_000
    LOOP_PANELS[title](panel_results(loop_grafana, panel), loop_logged)


def test_annotations_and_variables_through_the_cloud(loop_grafana: Grafana,
                                                    loop_logged: Logged) -> None:
    for name, (types, logged_type) in ANNOTATIONS.items():
        (spec,) = [a for a in annotations(loop_grafana.dashboard) if a["name"] == name]
        (series,) = loop_grafana.run(spec["query"])
        want = sorted((e for e in loop_logged.events if re.fullmatch(types, e["type"])),
                      key=loop_logged.event_ms)
        assert logged_type in {e["type"] for e in want}, f"the run logged no {logged_type}"
        assert [row[0] for row in series.values] == [loop_logged.event_ms(e) for e in want]
        assert column(series, "device") == [e["subject"] for e in want]
    assert loop_grafana.variables["gateway"].options == [GATEWAY]
    assert loop_grafana.variables["device"].options == loop_logged.devices == FLEET_DEVICES
    assert loop_grafana.variables["metric"].options == METRICS
