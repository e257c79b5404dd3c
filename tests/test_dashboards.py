"""The Grafana dashboard and provisioning files in deploy/grafana/.

Every InfluxQL query in the dashboard — panel targets (repeated panels once per value),
template variable queries, annotation queries — is taken from the JSON, its variables,
`$timeFilter` and `$__interval` substituted as Grafana's InfluxDB data source does, and run
against a real InfluxDB 1.x filled by the real sink: Mosquitto, `gateway run` with the
influx sink (api v1), the uplink and rules, and the greenhouse fleet of the device emulator
(`devices simulate`), whose heat fault fires an alert, a fan command and its resolution.
Each panel must get the series it is there to show, and its figures must agree with what
the gateway's log holds once every sink has drained it (`gateway log stats`).
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from gateway.log.reader import LogReader
from gateway.log.schema import connect
from gateway.log.store import KIND_EVENT
from gateway.mosquitto import Mosquitto
from gateway.query import InfluxConnection, InfluxQLClient, Series
from tests.conftest import GatewayProcess
from tests.mqtt_helpers import Publisher
from tests.tsdb import InfluxD, influxd  # noqa: F401 (pytest fixture)

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "fieldgate.json"


# --- Grafana's interpolation for the InfluxDB data source ---------------------------------

# Grafana's escapeRegex (@grafana/data): what it escapes in a value used inside /…/.
_REGEX_SPECIAL = re.compile(r"[\\^$*+?.()|\[\]{}/]")
# kbn.roundInterval: raw interval (ms) -> the step Grafana uses.
_ROUND = ((15, 10), (35, 20), (75, 50), (150, 100), (350, 200), (750, 500), (1500, 1000),
          (3500, 2000), (7500, 5000), (12500, 10000), (17500, 15000), (25000, 20000),
          (45000, 30000), (90000, 60000), (210000, 120000), (450000, 300000),
          (750000, 600000), (1050000, 900000), (1500000, 1200000), (2700000, 1800000),
          (5400000, 3600000), (9000000, 7200000), (16200000, 10800000),
          (32400000, 21600000), (86400000, 43200000), (604800000, 86400000))
_VAR = re.compile(r"\$(\w+)|\$\{(\w+)(?::(\w+))?\}|\[\[(\w+)(?::(\w+))?\]\]")


def escape_regex(value: str) -> str:
    return _REGEX_SPECIAL.sub(lambda m: "\\" + m.group(0), value)


def round_interval(ms: float) -> int:
    return next((step for limit, step in _ROUND if ms < limit), 604800000)


def format_interval(ms: int) -> str:
    for unit, size in (("d", 86400000), ("h", 3600000), ("m", 60000), ("s", 1000)):
        if ms >= size and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


@dataclass
class Variable:
    name: str
    multi: bool
    include_all: bool
    options: list[str] = field(default_factory=list)
    current: list[str] = field(default_factory=list)


class Grafana:
    """Enough of Grafana to turn the dashboard's queries into what it sends to InfluxDB."""

    def __init__(self, dashboard: dict[str, Any], client: InfluxQLClient, *, from_ms: int,
                 to_ms: int, relative: str | None = None, width_px: int = 1000,
                 min_interval_ms: int = 10000) -> None:
        self.dashboard = dashboard
        self.client = client
        self.from_ms, self.to_ms = from_ms, to_ms
        self.relative = relative
        raw = (to_ms - from_ms) / width_px
        self.interval_ms = max(round_interval(raw), min_interval_ms)
        self.variables: dict[str, Variable] = {}
        self.sent: list[str] = []

    @property
    def time_filter(self) -> str:
        if self.relative is not None:
            return f"time >= now() - {self.relative}"
        return f"time >= {self.from_ms}ms and time <= {self.to_ms}ms"

    def interpolate(self, text: str, overrides: dict[str, str] | None = None) -> str:
        overrides = overrides or {}
        text = text.replace("$timeFilter", self.time_filter)
        text = text.replace("$__interval_ms", str(self.interval_ms))
        text = text.replace("$__interval", format_interval(self.interval_ms))

        def sub(match: re.Match[str]) -> str:
            name = match.group(1) or match.group(2) or match.group(4)
            fmt = match.group(3) or match.group(5)
            if name in overrides:
                values, var = [overrides[name]], self.variables[name]
            elif name in self.variables:
                var = self.variables[name]
                values = var.current
            else:
                return match.group(0)
            if fmt == "raw":
                return ",".join(values)
            if not var.multi and not var.include_all:
                return values[0]
            escaped = [escape_regex(v) for v in values]
            return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"

        return _VAR.sub(sub, text)

    def run(self, query: str, overrides: dict[str, str] | None = None) -> list[Series]:
        text = self.interpolate(query, overrides)
        assert not re.search(r"\$\w|\$\{|\[\[", text), f"variable left in {text!r}"
        self.sent.append(text)
        results = self.client.query(text)
        return [s for result in results for s in result]

    def load_variables(self, select: dict[str, list[str]] | None = None) -> None:
        """Resolve the variables in order, as Grafana does on load; `All` unless selected."""
        select = select or {}
        for spec in self.dashboard["templating"]["list"]:
            if spec["type"] != "query":
                continue
            series = self.run(spec["query"])
            # Grafana's metricFindQuery: SHOW TAG VALUES gives (key, value); others column 0.
            column = 1 if "show tag values" in spec["query"].lower() else 0
            options = sorted({str(row[column]) for s in series for row in s.values})
            var = Variable(spec["name"], spec["multi"], spec["includeAll"], options)
            var.current = select.get(spec["name"], options)
            self.variables[spec["name"]] = var


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def annotations(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [a for a in dashboard["annotations"]["list"] if not a.get("builtIn")]


def panel_results(grafana: Grafana, panel: dict[str, Any]) -> dict[str, list[list[Series]]]:
    """Results per repeated value ("" when the panel does not repeat), one list per target."""
    repeat = panel.get("repeat")
    values = grafana.variables[repeat].current if repeat else [""]
    return {value: [grafana.run(t["query"], {repeat: value} if repeat else None)
                    for t in panel["targets"]]
            for value in values}


# --- InfluxDB filled by the sink from emulator data ---------------------------------------

GATEWAY = "gh-site-1"
DB = "dashboards"
METRICS = ["hum", "soil", "temp"]  # the greenhouse fleet's
FLEET_DEVICES = ["gh-1", "gh-2", "gh-3", "gh-4"]
# The demo's TooHot rule (gateway/demo_files/rules.yaml): windows of seconds, so that the
# fleet at --rate-scale 6 heats gh-1, fires, cools it with the fan and resolves in seconds.
RULES = """\
groups:
  - name: greenhouse
    match: {device: "gh-*"}
    rules:
      - alert: TooHot
        expr: avg(temp, 3s) > 30
        clear: avg(temp, 3s) < 27
        for: 1s
        severity: critical
        message: "{device}: mean temperature {value:.1f} °C over 3 s"
        actions:
          - on: fire
            command: {device: "{device}", action: fan, params: {state: "on"}}
          - on: resolve
            command: {device: "{device}", action: fan, params: {state: "off"}}
"""
# Malformed payloads published after the fleet's run: dead letters for the panels to count
# (besides the few the fleet's own `malformed` fault may send).
BAD_PAYLOADS = [b"{not json", b'{"temp": "warm"}']


@dataclass
class Logged:
    """What the gateway's log holds once the sinks drained it: what the panels must show."""

    start_ms: int                                    # first health point
    end_ms: int                                      # last health point
    stats: dict[str, Any]                            # `gateway log stats --json`
    used_bytes: int                                  # the log file's pages in use
    readings: list[dict[str, Any]] = field(default_factory=list)  # as logged, with seq
    events: list[dict[str, Any]] = field(default_factory=list)    # CloudEvents, as logged
    health: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # as written

    @property
    def devices(self) -> list[str]:
        return sorted({r["device"] for r in self.readings})

    @staticmethod
    def event_ms(event: dict[str, Any]) -> int:
        return round(datetime.fromisoformat(event["time"]).timestamp() * 1000)


def _wait(what: str, cond: Callable[[], bool], gw: GatewayProcess,
          timeout: float = 90) -> None:
    """Poll until ``cond``; the bound only catches a hang (then the gateway's log)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not in {timeout} s\n{gw.log()[-3000:]}"
        time.sleep(0.1)


def _log_stats(config: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "gateway", "log", "stats", "-c", str(config),
                          "--json"], cwd=ROOT, capture_output=True, check=True)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _logged_events(log: Path) -> list[dict[str, Any]]:
    conn = connect(log, readonly=True)
    try:
        rows = conn.execute("SELECT body FROM records WHERE kind = ? ORDER BY seq",
                            (KIND_EVENT,)).fetchall()
    finally:
        conn.close()
    return [orjson.loads(body) for (body,) in rows]


def _logged_readings(log: Path) -> list[dict[str, Any]]:
    reader = LogReader(log)
    readings: list[dict[str, Any]] = []
    seq = 1
    while rows := reader.read(seq, max_readings=10_000, max_bytes=1 << 24):
        if rows[0].kind != KIND_EVENT:
            readings += orjson.loads(b"[" + b",".join(r.body for r in rows) + b"]")
        seq = rows[-1].seq + rows[-1].n
    reader.close()
    return readings


def _dead_letter_count(log: Path, payloads: list[bytes] | None = None) -> int:
    """Dead letters in the log (with one of ``payloads``)."""
    conn = connect(log, readonly=True)
    try:
        sql, args = "SELECT count(*) FROM dead_letters", ()
        if payloads is not None:
            sql += f" WHERE payload IN ({','.join('?' * len(payloads))})"
            args = tuple(payloads)
        count: int = conn.execute(sql, args).fetchone()[0]
    finally:
        conn.close()
    return count


def _used_bytes(log: Path) -> int:
    """What the gateway reports as log_bytes: the file's pages in use."""
    conn = connect(log, readonly=True)
    try:
        pages, free, size = (conn.execute(f"PRAGMA {name}").fetchone()[0]
                             for name in ("page_count", "freelist_count", "page_size"))
    finally:
        conn.close()
    return int((pages - free) * size)


def _health(server: InfluxD) -> list[tuple[int, dict[str, Any]]]:
    data = server.query(f"SELECT * FROM \"fieldgate\" WHERE \"gateway\" = '{GATEWAY}'", DB)
    series = data["results"][0].get("series", [])
    if not series:
        return []
    columns = series[0]["columns"]
    return [(row[0], dict(zip(columns, row, strict=True))) for row in series[0]["values"]]


def greenhouse_gateway(work: Path, site: Mosquitto, cloud: Mosquitto,
                       **sections: Any) -> tuple[GatewayProcess, Path]:
    """The gateway both dashboard runs start: the demo rules, labels, a command key; plus
    ``sections`` (its sinks). Returns it and the key file the emulator signs answers with."""
    key = work / "command.key"
    key.write_text(secrets.token_hex(32))
    key.chmod(0o600)
    rules = work / "rules.yaml"
    rules.write_text(RULES)
    gw = GatewayProcess(
        work, site, cloud, gateway_id=GATEWAY, rules=[str(rules)],
        engine={"tick": "500ms", "offline_after": "3s"},
        device_labels={"gh-*": {"zone": "north"}}, commands={"key_file": str(key)},
        ingest={"clock_check": "off"}, **sections)
    return gw, key


def run_greenhouse(work: Path, site: Mosquitto, key: Path, gw: GatewayProcess,
                   first_ms: float) -> None:
    """The greenhouse fleet until the alert has fired and resolved and 10 s have passed
    since ``first_ms`` (so the dead letters land in a later 10 s step of the panels), then
    the bad payloads."""
    log = work / "log.db"
    fleet = subprocess.Popen(
        [sys.executable, "-m", "devices", "simulate", "--fleet",
         str(ROOT / "devices" / "fleets" / "greenhouse.yaml"), "--broker", site.url,
         "--rate-scale", "6", "--key-file", str(key)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=(work / "fleet.stderr").open("wb"))
    try:
        def alert_done() -> bool:
            types = {e["type"] for e in _logged_events(log)}
            return {"io.fieldgate.alert.fired", "io.fieldgate.alert.resolved"} <= types

        _wait("TooHot fired and resolved", alert_done, gw)
        _wait("10 s of readings", lambda: time.time() * 1000 > first_ms + 10_000, gw)
        fleet.terminate()
        assert fleet.wait(30) == 0, (work / "fleet.stderr").read_text()
    finally:
        if fleet.poll() is None:
            fleet.kill()
            fleet.wait()
    publisher = Publisher(site.port)
    for payload in BAD_PAYLOADS:
        publisher.publish("sensors/gh-1/telemetry", payload)
    publisher.close()


@pytest.fixture(scope="module")
def logged(influxd: InfluxD,  # noqa: F811
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Logged]:
    """Run the fleet through the gateway into ``DB`` until the alert has fired and resolved,
    stop the fleet, publish the bad payloads, wait until every device is reported offline,
    the sinks drained and a health point counts everything; stop the gateway, read its log."""
    work = tmp_path_factory.mktemp("dashboards")
    influxd.create_database(DB)
    site = Mosquitto(work, "site").start()
    cloud = Mosquitto(work, "cloud").start()
    gw, key = greenhouse_gateway(
        work, site, cloud,
        influx={"url": influxd.url, "api": "v1", "database": DB, "site": "greenhouse",
                "health_interval": "500ms", "batch_max_delay": "1s"})
    log = work / "log.db"
    try:
        gw.start()
        # The first health point comes before the first reading: counters start at 0.
        _wait("first health point", lambda: bool(_health(influxd)), gw)
        run_greenhouse(work, site, key, gw, _health(influxd)[0][0])

        def drained() -> bool:
            offline = {e["subject"] for e in _logged_events(log)
                       if e["type"] == "io.fieldgate.device.offline"}
            depths = [gw.metric(f'fieldgate_log_undelivered_readings{{sink="{sink}"}}')
                      for sink in ("influx", "uplink")]
            return offline == set(FLEET_DEVICES) and depths == [0, 0] and \
                _dead_letter_count(log, BAD_PAYLOADS) == len(BAD_PAYLOADS)

        _wait("devices offline, dead letters in, sinks drained", drained, gw)
        readings = _log_stats(gw.config)["counters"]["readings"]
        dead_letters = _dead_letter_count(log)

        def counted() -> bool:
            points = _health(influxd)
            last = points[-1][1] if points else {}
            return (last.get("readings_total") == readings
                    and last.get("dead_letters_total") == dead_letters
                    and last.get("depth_influx") == 0 and last.get("depth_uplink") == 0)

        _wait("a health point that counts everything", counted, gw)
        assert gw.stop() == 0
        health = _health(influxd)
        yield Logged(start_ms=health[0][0], end_ms=health[-1][0],
                     stats=_log_stats(gw.config), used_bytes=_used_bytes(log),
                     readings=_logged_readings(log), events=_logged_events(log),
                     health=health)
    finally:
        if gw.proc is not None and gw.proc.poll() is None:
            gw.kill()
        site.stop()
        cloud.stop()
    unexpected = gw.unexpected_errors()
    assert not unexpected, f"gateway logged errors: {unexpected}"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    result: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return result


@pytest.fixture
def grafana(dashboard: dict[str, Any], influxd: InfluxD,  # noqa: F811
            logged: Logged) -> Grafana:
    client = InfluxQLClient(InfluxConnection(url=influxd.url, database=DB))
    g = Grafana(dashboard, client, from_ms=logged.start_ms - 60_000,
                to_ms=logged.end_ms + 60_000)
    g.load_variables()
    return g


def by_tag(series: list[Series], tag: str) -> dict[str, Series]:
    return {s.tags[tag]: s for s in series}


def column(s: Series, name: str) -> list[Any]:
    i = s.columns.index(name)
    return [row[i] for row in s.values]


def one_value(res: dict[str, list[list[Series]]]) -> Any:
    """A stat panel's one value, for our gateway."""
    series = by_tag(res[""][0], "gateway")
    assert set(series) == {GATEWAY}
    (row,) = series[GATEWAY].values
    return row[1]


def one_series(res: dict[str, list[list[Series]]]) -> Series:
    """A time series panel's series, for our gateway."""
    (series,) = res[""][0]
    assert series.tags == {"gateway": GATEWAY}
    return series


# --- what each panel must show -------------------------------------------------------------

Check = Callable[[dict[str, list[list[Series]]], Logged], None]


def _readings_in_range(res: dict[str, list[list[Series]]], logged: Logged) -> None:
    # The gateway's counter over the range: every reading the log took.
    assert one_value(res) == logged.stats["counters"]["readings"] == len(logged.readings)


def _dead_letters_in_range(res: dict[str, list[list[Series]]], logged: Logged) -> None:
    total = sum(logged.stats["dead_letters"].values())
    assert one_value(res) == total >= len(BAD_PAYLOADS)


def _dropped_in_range(res: dict[str, list[list[Series]]], logged: Logged) -> None:
    dropped = sum(v for k, v in logged.stats["counters"].items() if k.startswith("dropped."))
    assert one_value(res) == dropped == 0


def _log_size(res: dict[str, list[list[Series]]], logged: Logged) -> None:
    assert one_value(res) == logged.used_bytes


def _readings_per_s(res: dict[str, list[list[Series]]], logged: Logged) -> None:
    means = [v for v in column(one_series(res), "mean") if v is not None]
    # Means of the health points' rates per 10 s step: positive while the fleet sent.
    rates = [h["readings_per_s"] for _, h in logged.health]
    assert means and max(means) > 0
    assert min(rates) <= min(means) and max(means) <= max(rates)


def _buffered_per_sink(res: dict[str, list[list[Series]]], logged: Logged) -> None:
    series = one_series(res)
    for sink in ("uplink", "influx"):
        depths = [v for v in column(series, sink) if v is not None]
        assert depths[-1] == 0  # drained
        assert max(depths) <= len(logged.readings)
    # Readings wait up to influx.batch_max_delay (1 s) for their batch: the health points
    # taken meanwhile show them buffered.
    assert max(h["depth_influx"] for _, h in logged.health) > 0


def _link_state(res: dict[str, list[list[Series]]], logged: Logged) -> None:
    series = one_series(res)
    assert {v for v in column(series, "site") if v is not None} == {1}
    assert {v for v in column(series, "cloud") if v is not None} == {1}


def _dead_letters(res: dict[str, list[list[Series]]], logged: Logged) -> None:
    series = one_series(res)
    got = sum(v for v in column(series, series.columns[1]) if v is not None)
    # Differences between steps: every dead letter after the first 10 s step (ours came
    # later; the fleet's own, if any, may fall in it).
    first_step = logged.start_ms // 10_000
    before = [h["dead_letters_total"] for t, h in logged.health if t // 10_000 == first_step]
    assert got == sum(logged.stats["dead_letters"].values()) - before[-1]
    assert got >= len(BAD_PAYLOADS)


def _step_means(logged: Logged, device: str, metric: str) -> dict[int, float]:
    """The log's readings of a device averaged per 10 s step: what the panel must show."""
    steps: dict[int, list[float]] = {}
    for r in logged.readings:
        if r["device"] == device and metric in r:
            steps.setdefault(round(r["ts"] * 1000) // 10_000 * 10_000, []).append(r[metric])
    return {step: sum(values) / len(values) for step, values in steps.items()}


def _metric(res: dict[str, list[list[Series]]], logged: Logged) -> None:
    assert set(res) == set(METRICS)  # one panel per metric
    for metric, (series,) in res.items():
        per_device = by_tag(series, "device")
        assert set(per_device) == set(FLEET_DEVICES)
        for device, s in per_device.items():
            got = {t: v for t, v in s.values if v is not None}
            want = _step_means(logged, device, metric)
            assert sorted(got) == sorted(want)
            assert [got[t] for t in sorted(got)] == pytest.approx(
                [want[t] for t in sorted(want)])


def _events(res: dict[str, list[list[Series]]], logged: Logged) -> None:
    (table,) = res[""][0]
    got = list(zip(column(table, "time"), column(table, "type"), column(table, "device"),
                   strict=True))
    want = sorted(((logged.event_ms(e), e["type"], e["subject"]) for e in logged.events),
                  key=lambda e: -e[0])
    # Newest first; events of one millisecond (a command and the alert that caused it) come
    # back in no set order, so the order is checked by time and the rows as a whole.
    assert [t for t, _, _ in got] == [t for t, _, _ in want]
    assert sorted(got) == sorted(want)
    fired = [e for e in logged.events if e["type"] == "io.fieldgate.alert.fired"]
    assert {e["data"]["message"] for e in fired} <= set(column(table, "summary"))


PANELS: dict[str, Check] = {
    "Readings in range": _readings_in_range,
    "Dead letters in range": _dead_letters_in_range,
    "Dropped in range": _dropped_in_range,
    "Log size": _log_size,
    "Readings/s per gateway": _readings_per_s,
    "Buffered readings per sink": _buffered_per_sink,
    "Link state": _link_state,
    "Dead letters": _dead_letters,
    "$metric": _metric,
    "Events": _events,
}

ANNOTATIONS = {  # name -> the event types it draws, and one the run must have logged
    "Alerts fired": (r"io\.fieldgate\.alert\.fired", "io.fieldgate.alert.fired"),
    "Alerts resolved": (r"io\.fieldgate\.alert\.resolved", "io.fieldgate.alert.resolved"),
    "Commands": (r"io\.fieldgate\.command\..+", "io.fieldgate.command.issued"),
    "Devices offline/online": (r"io\.fieldgate\.device\..+", "io.fieldgate.device.offline"),
}


def test_every_panel_and_annotation_has_a_check(dashboard: dict[str, Any]) -> None:
    assert sorted(p["title"] for p in panels(dashboard)) == sorted(PANELS)
    assert sorted(a["name"] for a in annotations(dashboard)) == sorted(ANNOTATIONS)


def test_influxdb_holds_every_reading_and_event_the_log_took(influxd: InfluxD,  # noqa: F811
                                                             logged: Logged) -> None:
    readings = logged.stats["counters"]["readings"]
    assert readings == len(logged.readings) > 100
    assert logged.stats["sinks"]["influx"]["undelivered"] == 0
    data = influxd.query('SELECT count("temp") FROM "telemetry" GROUP BY "device"', DB)
    counts = {s["tags"]["device"]: s["values"][0][1] for s in data["results"][0]["series"]}
    per_device = {d: sum(1 for r in logged.readings if r["device"] == d) for d in counts}
    assert counts == per_device
    assert sum(counts.values()) == readings
    data = influxd.query('SELECT count("id") FROM "events"', DB)
    assert data["results"][0]["series"][0]["values"][0][1] == len(logged.events)


@pytest.mark.parametrize("title", sorted(PANELS))
def test_panel_shows_its_series(grafana: Grafana, logged: Logged, title: str) -> None:
    (panel,) = [p for p in panels(grafana.dashboard) if p["title"] == title]
    assert grafana.interval_ms == 10_000  # minutes over 1000 px: Grafana's 10 s minimum
    PANELS[title](panel_results(grafana, panel), logged)


@pytest.mark.parametrize("name", sorted(ANNOTATIONS))
def test_annotation_marks_its_events(grafana: Grafana, logged: Logged, name: str) -> None:
    (spec,) = [a for a in annotations(grafana.dashboard) if a["name"] == name]
    (series,) = grafana.run(spec["query"])
    # Grafana reads the annotation's text and tags from these columns.
    for col in [spec["textColumn"], *spec["tagsColumn"].split(",")]:
        assert col in series.columns
    types, logged_type = ANNOTATIONS[name]
    want = sorted((e for e in logged.events if re.fullmatch(types, e["type"])),
                  key=logged.event_ms)
    assert logged_type in {e["type"] for e in want}, f"the run logged no {logged_type}"
    assert [row[0] for row in series.values] == [logged.event_ms(e) for e in want]
    assert column(series, "device") == [e["subject"] for e in want]


def test_variables_list_what_was_written_and_chain(grafana: Grafana, logged: Logged) -> None:
    assert grafana.variables["gateway"].options == [GATEWAY]
    assert grafana.variables["device"].options == logged.devices == FLEET_DEVICES
    assert grafana.variables["metric"].options == METRICS
    grafana.load_variables({"gateway": ["another-site"]})
    assert grafana.variables["device"].options == []  # the devices follow the gateway


def test_a_selection_narrows_the_panels(grafana: Grafana) -> None:
    grafana.load_variables({"device": ["gh-1", "gh-3"]})
    (panel,) = [p for p in panels(grafana.dashboard) if p["title"] == "$metric"]
    res = panel_results(grafana, {**panel, "repeat": None})
    res_temp = grafana.run(panel["targets"][0]["query"], {"metric": "temp"})
    assert set(by_tag(res_temp, "device")) == {"gh-1", "gh-3"}
    assert res  # the unrepeated form runs too
    (fired,) = [a for a in annotations(grafana.dashboard) if a["name"] == "Alerts fired"]
    assert grafana.run(fired["query"])  # gh-1 overheated...
    grafana.load_variables({"device": ["gh-2"]})
    assert grafana.run(fired["query"]) == []  # ...gh-2 never did
    (readings,) = [p for p in panels(grafana.dashboard) if p["title"] == "Readings/s per gateway"]
    grafana.load_variables({"gateway": ["another-site"]})
    assert grafana.run(readings["targets"][0]["query"]) == []


def test_every_query_runs_with_a_relative_time_range(grafana: Grafana) -> None:
    """The other form of $timeFilter Grafana sends ("Last 6 hours")."""
    grafana.relative = "6h"
    queries = [t["query"] for p in panels(grafana.dashboard) for t in p["targets"]]
    queries += [a["query"] for a in annotations(grafana.dashboard)]
    for query in queries:
        assert grafana.run(query, {"metric": "temp"}), query


def test_interpolation_matches_grafana() -> None:
    g = Grafana({"templating": {"list": []}}, None, from_ms=0, to_ms=6 * 3600_000)  # type: ignore[arg-type]
    g.variables = {"d": Variable("d", True, True, ["a.b", "c/d"], ["a.b", "c/d"]),
                   "one": Variable("one", True, True, ["x"], ["x-1"]),
                   "plain": Variable("plain", False, False, ["p.q"], ["p.q"])}
    assert g.interpolate('"k" =~ /^$d$/') == '"k" =~ /^(a\\.b|c\\/d)$/'
    assert g.interpolate("/^${one}$/ [[one]] ${one:raw}") == "/^x-1$/ x-1 x-1"
    assert g.interpolate("$plain") == "p.q"
    assert g.interpolate("$timeFilter GROUP BY time($__interval)") == \
        "time >= 0ms and time <= 21600000ms GROUP BY time(20s)"  # 21.6 s rounds to 20 s


# --- the files around it --------------------------------------------------------------------

def test_dashboard_queries_are_raw_influxql_on_the_template_datasource(
        dashboard: dict[str, Any]) -> None:
    assert (dashboard["uid"], dashboard["title"]) == ("fieldgate", "Fieldgate")
    for panel in panels(dashboard):
        assert panel["datasource"] == {"type": "influxdb", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert target["rawQuery"] is True
            assert "$timeFilter" in target["query"], panel["title"]
    for spec in annotations(dashboard):
        assert "$timeFilter" in spec["query"]
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert names == ["datasource", "gateway", "device", "metric"]


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def test_datasources_are_influxql_with_the_dashboards_uid_and_no_secret_inline(
        dashboard: dict[str, Any]) -> None:
    default_uid = dashboard["templating"]["list"][0]["current"]["value"]
    for path in (GRAFANA / "provisioning" / "datasources" / "fieldgate.yaml",
                 GRAFANA / "influxdb2" / "datasource.yaml"):
        doc = _yaml(path)
        assert doc["apiVersion"] == 1
        (ds,) = doc["datasources"]
        assert (ds["type"], ds["uid"], ds["access"]) == ("influxdb", default_uid, "proxy")
        assert ds["jsonData"].get("version", "InfluxQL") == "InfluxQL"
        assert ds["jsonData"]["dbName"]
        for value in ds.get("secureJsonData", {}).values():
            assert value.startswith(("$__file{", "Token ${")), f"{path}: inline secret"


def test_dashboard_provider_points_where_the_guide_copies_the_json() -> None:
    doc = _yaml(GRAFANA / "provisioning" / "dashboards" / "fieldgate.yaml")
    (provider,) = doc["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    guide = (ROOT / "deploy" / "README.md").read_text()
    assert f"{path}/" in guide or path in guide
