"""The Grafana dashboard and provisioning files in deploy/grafana/.

Every InfluxQL query in the dashboard — panel targets (repeated panels once per value),
template variable queries, annotation queries — is taken from the JSON, its variables,
`$timeFilter` and `$__interval` substituted as Grafana's InfluxDB data source does, and run
against a real InfluxDB 1.x holding what a gateway writes (tests/influxd_fixture.py). Each
panel must get the series it is there to show.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.query import InfluxConnection, InfluxQLClient, Series
from tests.influxd_fixture import (  # noqa: F401 (pytest fixtures)
    DEVICES,
    METRICS,
    Filled,
    InfluxD,
    fieldgate_db,
    influxd,
)

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


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    result: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return result


@pytest.fixture
def grafana(dashboard: dict[str, Any], influxd: InfluxD,  # noqa: F811
            fieldgate_db: Filled) -> Grafana:  # noqa: F811
    client = InfluxQLClient(InfluxConnection(url=influxd.url, database=fieldgate_db.db))
    g = Grafana(dashboard, client, from_ms=fieldgate_db.start_ms - 60_000,
                to_ms=fieldgate_db.end_ms + 60_000)
    g.load_variables()
    return g


def by_tag(series: list[Series], tag: str) -> dict[str, Series]:
    return {s.tags[tag]: s for s in series}


def column(s: Series, name: str) -> list[Any]:
    i = s.columns.index(name)
    return [row[i] for row in s.values]


def per_gateway_total(filled: Filled) -> dict[str, int]:
    totals: dict[str, int] = {}
    for device, (gateway, _, _) in DEVICES.items():
        totals[gateway] = totals.get(gateway, 0) + filled.readings[device]
    return totals


# --- what each panel must show -------------------------------------------------------------

Check = Callable[[dict[str, list[list[Series]]], Filled], None]


def _readings_in_range(res: dict[str, list[list[Series]]], filled: Filled) -> None:
    got = {gw: s.values[0][1] for gw, s in by_tag(res[""][0], "gateway").items()}
    assert got == per_gateway_total(filled)  # the gateway's counter agrees with the points


def _dead_letters_in_range(res: dict[str, list[list[Series]]], filled: Filled) -> None:
    got = {gw: s.values[0][1] for gw, s in by_tag(res[""][0], "gateway").items()}
    assert got == {gw: pts[-1][1]["dead_letters_total"] for gw, pts in filled.health.items()}
    assert all(v > 0 for v in got.values())


def _dropped_in_range(res: dict[str, list[list[Series]]], filled: Filled) -> None:
    got = {gw: s.values[0][1] for gw, s in by_tag(res[""][0], "gateway").items()}
    assert got == dict.fromkeys(filled.gateways, 0)


def _log_size(res: dict[str, list[list[Series]]], filled: Filled) -> None:
    got = {gw: s.values[0][1] for gw, s in by_tag(res[""][0], "gateway").items()}
    assert got == {gw: pts[-1][1]["log_bytes"] for gw, pts in filled.health.items()}


def _readings_per_s(res: dict[str, list[list[Series]]], filled: Filled) -> None:
    series = by_tag(res[""][0], "gateway")
    assert set(series) == set(filled.gateways)
    for gw, s in series.items():
        got = [v for v in column(s, "mean") if v is not None]
        want = [v["readings_per_s"] for _, v in filled.health[gw]]
        assert got == pytest.approx(want)  # 10 s interval: one health point per bucket


def _buffered_per_sink(res: dict[str, list[list[Series]]], filled: Filled) -> None:
    series = by_tag(res[""][0], "gateway")
    assert set(series) == set(filled.gateways)
    for gw, s in series.items():
        assert {"uplink", "influx"} <= set(s.columns)
        uplink = [v for v in column(s, "uplink") if v is not None]
        assert max(uplink) == max(v["depth_uplink"] for _, v in filled.health[gw])
        assert uplink[-1] == 0  # drained
    assert max(v for v in column(series["gh-site-1"], "uplink") if v is not None) > 0


def _link_state(res: dict[str, list[list[Series]]], filled: Filled) -> None:
    series = by_tag(res[""][0], "gateway")
    assert set(series) == set(filled.gateways)
    cloud = {gw: {v for v in column(s, "cloud") if v is not None} for gw, s in series.items()}
    site = {gw: {v for v in column(s, "site") if v is not None} for gw, s in series.items()}
    assert cloud == {"gh-site-1": {0, 1}, "gh-site-2": {1}}
    assert site == {gw: {1} for gw in filled.gateways}


def _dead_letters(res: dict[str, list[list[Series]]], filled: Filled) -> None:
    series = by_tag(res[""][0], "gateway")
    got = {gw: sum(v for v in column(s, s.columns[1]) if v is not None)
           for gw, s in series.items()}
    assert got == {gw: pts[-1][1]["dead_letters_total"] for gw, pts in filled.health.items()}


def _metric(res: dict[str, list[list[Series]]], filled: Filled) -> None:
    assert set(res) == set(METRICS)  # one panel per metric
    for metric, (series,) in res.items():
        per_device = by_tag(series, "device")
        assert set(per_device) == set(DEVICES)
        for device, s in per_device.items():
            got = [(t, v) for t, v in s.values if v is not None]
            want = filled.series[(device, metric)]
            assert [t for t, _ in got] == [t for t, _ in want]
            assert [v for _, v in got] == pytest.approx([v for _, v in want])


def _events(res: dict[str, list[list[Series]]], filled: Filled) -> None:
    (table,) = res[""][0]
    types = [row[table.columns.index("type")] for row in table.values]
    assert types == [e["type"] for e in sorted(filled.events, key=lambda e: -e["time"])]
    summaries = {row[table.columns.index("summary")] for row in table.values}
    assert summaries == {e["summary"] for e in filled.events}


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

ANNOTATIONS = {  # name -> the event types it draws
    "Alerts fired": {"io.fieldgate.alert.fired"},
    "Alerts resolved": {"io.fieldgate.alert.resolved"},
    "Commands": {"io.fieldgate.command.issued"},
    "Devices offline/online": {"io.fieldgate.device.offline"},
}


def test_every_panel_and_annotation_has_a_check(dashboard: dict[str, Any]) -> None:
    assert sorted(p["title"] for p in panels(dashboard)) == sorted(PANELS)
    assert sorted(a["name"] for a in annotations(dashboard)) == sorted(ANNOTATIONS)


@pytest.mark.parametrize("title", sorted(PANELS))
def test_panel_shows_its_series(grafana: Grafana, fieldgate_db: Filled,  # noqa: F811
                                title: str) -> None:
    (panel,) = [p for p in panels(grafana.dashboard) if p["title"] == title]
    assert grafana.interval_ms == 10_000  # 3 h over 1000 px: Grafana's 10 s step
    PANELS[title](panel_results(grafana, panel), fieldgate_db)


@pytest.mark.parametrize("name", sorted(ANNOTATIONS))
def test_annotation_marks_its_events(grafana: Grafana, fieldgate_db: Filled,  # noqa: F811
                                     name: str) -> None:
    (spec,) = [a for a in annotations(grafana.dashboard) if a["name"] == name]
    (series,) = grafana.run(spec["query"])
    # Grafana reads the annotation's text and tags from these columns.
    for col in [spec["textColumn"], *spec["tagsColumn"].split(",")]:
        assert col in series.columns
    want = [e for e in fieldgate_db.events if e["type"] in ANNOTATIONS[name]]
    assert [row[0] for row in series.values] == [e["time"] for e in want]
    assert column(series, spec["textColumn"]) == [e["summary"] for e in want]


def test_variables_list_what_was_written_and_chain(grafana: Grafana,
                                                   fieldgate_db: Filled) -> None:  # noqa: F811
    assert grafana.variables["gateway"].options == fieldgate_db.gateways
    assert grafana.variables["device"].options == sorted(DEVICES)
    assert grafana.variables["metric"].options == sorted(METRICS)
    grafana.load_variables({"gateway": ["gh-site-2"]})
    assert grafana.variables["device"].options == ["gh-4"]


def test_a_selection_narrows_the_panels(grafana: Grafana) -> None:
    grafana.load_variables({"gateway": ["gh-site-1"], "device": ["gh-1", "gh-3"]})
    (panel,) = [p for p in panels(grafana.dashboard) if p["title"] == "$metric"]
    res = panel_results(grafana, {**panel, "repeat": None})
    res_temp = grafana.run(panel["targets"][0]["query"], {"metric": "temp"})
    assert set(by_tag(res_temp, "device")) == {"gh-1", "gh-3"}
    assert res  # the unrepeated form runs too
    (readings,) = [p for p in panels(grafana.dashboard) if p["title"] == "Readings/s per gateway"]
    assert set(by_tag(grafana.run(readings["targets"][0]["query"]), "gateway")) == {"gh-site-1"}
    (fired,) = [a for a in annotations(grafana.dashboard) if a["name"] == "Alerts fired"]
    grafana.load_variables({"device": ["gh-2"]})
    assert grafana.run(fired["query"]) == []  # gh-2 never overheated


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
