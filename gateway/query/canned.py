"""The questions people ask at a terminal, as InfluxQL over the sink's schema.

Schema (DESIGN.md, written by the `influx` sink): `telemetry` (tags gateway, site, device
and the device's labels; one float field per metric), `events` (tags type, rule, device,
severity, gateway, site; fields summary, value, id) and `fieldgate` (gateway health).

An answer with no rows is a NoDataError that says why: the measurement is missing (nothing
was written to this database), the device or metric is unknown, or nothing in the window.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

from gateway.query.client import InfluxQLClient, NoDataError, Series
from gateway.query.render import Table, flatten, format_age, format_time

EVENTS = "events"

# A chart of more points than a terminal has columns shows nothing more; this many means
# on a 2-core Pi the query stays cheap and a 200-column terminal still gets full detail.
CHART_POINTS = 240
_NICE_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600,
               43200, 86400)


def quote_ident(name: str) -> str:
    """An InfluxQL identifier in double quotes (measurement, tag or field key)."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote_literal(value: str) -> str:
    """An InfluxQL string literal in single quotes (a tag value)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _since(seconds: float) -> str:
    return f"time > now() - {max(1, math.ceil(seconds))}s"


def _where(filters: dict[str, str | None], *extra: str) -> str:
    parts = [f"{quote_ident(k)} = {quote_literal(v)}" for k, v in filters.items() if v]
    parts.extend(e for e in extra if e)
    return f" WHERE {' AND '.join(parts)}" if parts else ""


def select(what: str, measurement: str, where: str = "", tail: str = "") -> str:
    """A SELECT statement; every name and value in it went through quote_ident/quote_literal."""
    return f"SELECT {what} FROM {quote_ident(measurement)}{where}{tail}"  # noqa: S608


def require_measurement(client: InfluxQLClient, name: str) -> None:
    """NoDataError naming the database when `name` was never written there."""
    have = client.measurements()
    if not have:
        client.require_database()
    if name not in have:
        listed = ", ".join(have) if have else "none"
        raise NoDataError(
            f"no measurement {name!r} in database {client.conn.database!r} (it has: {listed}); "
            f"is the gateway's influx sink writing to this database?")


def adhoc(client: InfluxQLClient, statement: str) -> Table:
    """Run a user's InfluxQL; an empty answer says whether a named measurement is missing."""
    results = client.query(statement)
    series = [s for result in results for s in result]
    if series:
        return flatten(series)
    for name in _measurements_named(statement):
        require_measurement(client, name)
    raise NoDataError("no data: the query matched nothing (check the time range and "
                      "the WHERE clause)")


_FROM = re.compile(r'\bFROM\s+((?:"(?:[^"\\]|\\.)*"|[\w.:-]+)(?:\s*\.\s*(?:"(?:[^"\\]|\\.)*"|'
                   r'[\w:-]+))*)', re.IGNORECASE)


def _measurements_named(statement: str) -> list[str]:
    """Plain measurement names after FROM (the last part of db.rp.measurement)."""
    names = []
    for match in _FROM.finditer(statement):
        parts = re.findall(r'"((?:[^"\\]|\\.)*)"|([\w:-]+)', match.group(1))
        if parts:
            quoted, bare = parts[-1]
            names.append(quoted.replace('\\"', '"') if quoted else bare)
    return names


def _labels(client: InfluxQLClient, key: str) -> list[str]:
    table = quote_ident(client.conn.measurement)
    result = client.query(f"SHOW TAG VALUES FROM {table} WITH KEY = {quote_ident(key)}")[0]
    return sorted({str(row[1]) for s in result for row in s.values})


def metrics(client: InfluxQLClient) -> list[str]:
    result = client.query(f"SHOW FIELD KEYS FROM {quote_ident(client.conn.measurement)}")[0]
    return sorted({str(row[0]) for s in result for row in s.values})


def last(client: InfluxQLClient, *, device: str | None = None, gateway: str | None = None,
         since: float | None = None, now: float | None = None) -> Table:
    """Latest value of each metric per device, with when it was taken and its age."""
    table = client.conn.measurement
    require_measurement(client, table)
    names = metrics(client)
    if not names:
        raise NoDataError(f"measurement {table!r} has no metrics yet")
    where = _where({"device": device, "gateway": gateway},
                   _since(since) if since is not None else "")
    statements = ";".join(select(f"last({quote_ident(m)}) AS value", table, where,
                                 ' GROUP BY "gateway", "device"') for m in names)
    now = time.time() if now is None else now
    rows = []
    for metric, result in zip(names, client.query(statements), strict=True):
        for s in result:
            for ts, value in s.values:
                rows.append((s.tags.get("gateway", ""), s.tags.get("device", ""), metric,
                             value, ts, format_age(now - ts / 1000)))
    if not rows:
        _explain_no_rows(client, device=device, gateway=gateway, since=since)
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    return Table(columns=("gateway", "device", "metric", "value", "time", "age"),
                 rows=tuple(rows))


def alerts(client: InfluxQLClient, *, since: float, device: str | None = None,
           gateway: str | None = None, all_events: bool = False, limit: int = 100) -> Table:
    """Alert events (fired, resolved, …) in the window, oldest first; the newest `limit`."""
    require_measurement(client, EVENTS)
    kind = "" if all_events else r'"type" =~ /^io\.fieldgate\.alert\./'
    where = _where({"device": device, "gateway": gateway}, kind, _since(since))
    result = client.query(select(
        '"type", "gateway", "device", "rule", "severity", "value", "summary"', EVENTS, where,
        f" ORDER BY time DESC LIMIT {int(limit)}"))[0]
    table = flatten(result)
    if not table.rows:
        what = "events" if all_events else "alerts"
        raise NoDataError(f"no {what} in the last {format_age(since)}"
                          + (f" for device {device!r}" if device else "")
                          + (f" from gateway {gateway!r}" if gateway else ""))
    i = table.columns.index("type")
    rows = [(*r[:i], _short_type(r[i]), *r[i + 1:]) for r in reversed(table.rows)]
    columns = (*table.columns[:i], "event", *table.columns[i + 1:])
    return Table(columns=columns, rows=tuple(rows))


def _short_type(value: object) -> object:
    """io.fieldgate.alert.fired -> alert.fired: the prefix is the same on every row."""
    return value.removeprefix("io.fieldgate.") if isinstance(value, str) else value


def step_for(since: float, points: int = CHART_POINTS) -> int:
    """The GROUP BY time() step that gives about `points` points over `since` seconds."""
    want = since / points
    return next((s for s in _NICE_STEPS if s >= want), _NICE_STEPS[-1])


@dataclass(frozen=True, slots=True)
class MetricSeries:
    """One device's metric over a window, averaged per `step_s`; markers are its alerts."""

    device: str
    metric: str
    since_s: float
    step_s: int
    times_ms: tuple[int, ...]
    values: tuple[float, ...]
    markers: tuple[tuple[int, str], ...]    # (time ms, "alert.fired" / "alert.resolved")

    def table(self) -> Table:
        return Table(columns=("time", self.metric),
                     rows=tuple(zip(self.times_ms, self.values, strict=True)))


def series(client: InfluxQLClient, *, device: str, metric: str, since: float,
           step: int | None = None) -> MetricSeries:
    """A device's metric over the last `since` seconds, as mean per step."""
    require_measurement(client, client.conn.measurement)
    step = step or step_for(since)
    where = _where({"device": device}, _since(since))
    alert_types = r' AND "type" =~ /^io\.fieldgate\.alert\./'
    # A SELECT of tags alone returns nothing in InfluxQL: `summary` (a field) comes along.
    statements = (select(f"mean({quote_ident(metric)})", client.conn.measurement, where,
                         f" GROUP BY time({step}s) fill(none)") + ";"
                  + select('"type", "summary"', EVENTS, where + alert_types))
    results = client.query(statements)
    points: list[Series] = results[0]
    times = tuple(int(r[0]) for s in points for r in s.values if r[1] is not None)
    values = tuple(float(r[1]) for s in points for r in s.values if r[1] is not None)
    if not times:
        _explain_no_rows(client, device=device, metric=metric, since=since)
    markers = tuple((int(r[0]), str(_short_type(r[1]))) for s in results[1] for r in s.values)
    return MetricSeries(device=device, metric=metric, since_s=since, step_s=step,
                        times_ms=times, values=values, markers=markers)


def _explain_no_rows(client: InfluxQLClient, *, device: str | None = None,
                     gateway: str | None = None, metric: str | None = None,
                     since: float | None = None) -> None:
    """Raise the NoDataError that says which part of the question matched nothing."""
    if metric is not None:
        known = metrics(client)
        if metric not in known:
            raise NoDataError(f"no metric {metric!r} in {client.conn.measurement!r} (metrics: "
                              f"{', '.join(known) or 'none'})")
    for key, value in (("device", device), ("gateway", gateway)):
        if value is not None:
            known = _labels(client, key)
            if value not in known:
                raise NoDataError(f"no {key} {value!r} in {client.conn.measurement!r} ({key}s: "
                                  f"{', '.join(known) or 'none'})")
    what = f"{metric} readings" if metric else "readings"
    who = f" from {device}" if device else (f" from gateway {gateway}" if gateway else "")
    window = f" in the last {format_age(since)}" if since is not None else ""
    latest = ""
    if metric is not None and device is not None:
        found = client.query(select(f"last({quote_ident(metric)})", client.conn.measurement,
                                    _where({"device": device})))[0]
        if found and found[0].values:
            latest = f" (latest at {format_time(found[0].values[0][0])})"
    raise NoDataError(f"no {what}{who}{window}{latest}")
