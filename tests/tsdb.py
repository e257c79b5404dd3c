"""Real time-series servers for tests and benches, on free ports in temp dirs.

- ``InfluxD``: InfluxDB 1.6.7 (Debian's ``influxdb``): ``/write`` and ``/query``
  (InfluxQL), no v2 API. Optionally with auth (and an admin user it creates and queries
  as, or none: then the test creates the first user itself, which 1.x allows anyone).
- ``VictoriaMetrics``: accepts the v2 write API influxdb-client uses; read back with
  ``export`` (``/internal/force_flush`` then ``/api/v1/export``); series are named
  ``<measurement>_<field>``.

Both can be stopped and started again on the same port and data (outage tests), and are
ready when their health endpoint answers, never after a sleep. Usable from any test:
``from tests.tsdb import InfluxD``, or the fixtures below: ``influxd`` (one server for the
session; each test module uses databases of its own), ``victoria`` (one per test) and
``fieldgate_db`` (a database of hand-written points in the sink's schema, known exactly,
for the `gateway query` tests; the dashboard tests fill theirs with the real sink).
"""

from __future__ import annotations

import base64
import json
import math
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.influxd import CONF
from gateway.mosquitto import end_process, free_port
from tests.tools import need

_START_TIMEOUT = 30.0

# The config the demo runs influxd with (one place for both).
INFLUXD_CONF = CONF


def _binary(name: str) -> str:
    return need(name, {"influxd": "influxdb"}.get(name, name))


class _Server:
    name = ""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.dir = workdir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def start(self) -> _Server:
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(self._argv(), stdout=out, stderr=out)
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start: {self.log_path.read_text()}")
            try:
                if self._ready():
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} on port {self.port} not ready in {_START_TIMEOUT} s")

    def stop(self) -> None:
        end_process(self.proc, 15)
        self.proc = None

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()


class InfluxD(_Server):
    """influxd 1.x with a generated config: HTTP and RPC ports free, meta/data/wal in tmp."""

    name = "influxd"

    def __init__(self, workdir: Path, *, auth: bool = False, max_body: int = 25_000_000,
                 admin: tuple[str, str] | None = None) -> None:
        """``admin``: with ``auth``, the user created on start and queried as; without
        one, queries go unauthenticated unless given ``auth=``."""
        super().__init__(workdir)
        self.auth = auth
        self.admin = admin
        self.conf = self.dir / "influxdb.conf"
        self.conf.write_text(INFLUXD_CONF.format(rpc=free_port(), port=self.port,
                                                 dir=self.dir, auth=str(auth).lower(),
                                                 max_body=max_body))
        self._admin_created = False

    def _argv(self) -> list[str]:
        return [_binary("influxd"), "run", "-config", str(self.conf)]

    def _ready(self) -> bool:
        status, _ = self.request("GET", "/ping")
        return status == 204

    def start(self) -> InfluxD:
        super().start()
        if self.auth and self.admin is not None and not self._admin_created:
            # With auth on and no users yet, InfluxDB 1.x lets anyone create the admin.
            user, password = self.admin
            self.query(f"CREATE USER {user} WITH PASSWORD '{password}' WITH ALL PRIVILEGES",
                       auth=("", ""))
            self._admin_created = True
        return self

    def _auth_headers(self, auth: tuple[str, str] | None = None) -> dict[str, str]:
        if auth is None:
            if not self.auth or self.admin is None:
                return {}
            auth = self.admin
        if auth == ("", ""):
            return {}
        token = base64.b64encode(":".join(auth).encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def query(self, q: str, db: str | None = None, *,
              auth: tuple[str, str] | None = None) -> Any:
        """Run InfluxQL (POST, so statements that write are allowed too) as the admin, or
        as ``auth``; the parsed JSON (epoch ms timestamps). Raises on an error."""
        params = {"q": q, "epoch": "ms"}
        if db:
            params["db"] = db
        status, body = self.request("POST", "/query", urllib.parse.urlencode(params).encode(),
                                    {"Content-Type": "application/x-www-form-urlencoded",
                                     **self._auth_headers(auth)})
        data = json.loads(body or b"{}")
        errors = [r["error"] for r in data.get("results", []) if "error" in r]
        if status >= 300 or "error" in data or errors:
            raise RuntimeError(f"query {q!r}: {status} {data}")
        return data

    def create_database(self, db: str) -> None:
        self.query(f'CREATE DATABASE "{db}"')

    def write(self, db: str, lines: str | Sequence[str],
              precision: str = "ms") -> tuple[int, bytes]:
        """POST /write: a body, or lines (sent 5000 to a request); the server's answer (the
        first refusal, if any)."""
        qs = urllib.parse.urlencode({"db": db, "precision": precision})
        bodies = [lines] if isinstance(lines, str) else \
            ["\n".join(lines[i:i + 5000]) for i in range(0, len(lines), 5000)]
        status, answer = 204, b""
        for body in bodies:
            status, answer = self.request("POST", f"/write?{qs}", body.encode(),
                                          self._auth_headers())
            if status >= 300:
                break
        return status, answer

    def points(self, db: str, measurement: str = "telemetry") -> list[dict[str, Any]]:
        """Every point of a measurement as a dict (time in epoch ms, tags and fields)."""
        data = self.query(f'SELECT * FROM "{measurement}"', db)
        out: list[dict[str, Any]] = []
        for series in data["results"][0].get("series", []):
            cols = series["columns"]
            out.extend(dict(zip(cols, row, strict=True)) for row in series["values"])
        return out

    def count(self, db: str, measurement: str = "telemetry", field: str = "*") -> int:
        data = self.query(f'SELECT count({field}) FROM "{measurement}"', db)
        series = data["results"][0].get("series")
        if not series:
            return 0
        return max(v for v in series[0]["values"][0][1:] if v is not None)


class VictoriaMetrics(_Server):
    """victoria-metrics single node: -retentionPeriod=100y so old test timestamps stay."""

    name = "victoria"

    def _argv(self) -> list[str]:
        return [_binary("victoria-metrics"), "-retentionPeriod=100y",
                f"-httpListenAddr=127.0.0.1:{self.port}",
                f"-storageDataPath={self.dir / 'data'}", "-loggerLevel=ERROR"]

    def _ready(self) -> bool:
        status, body = self.request("GET", "/health")
        return status == 200 and body.strip() == b"OK"

    def export(self, match: str = '{__name__=~".+"}') -> list[dict[str, Any]]:
        """Every stored series matching ``match``: {"metric": labels, "values", "timestamps"}."""
        self.request("GET", "/internal/force_flush")
        qs = urllib.parse.urlencode({"match[]": match, "start": "0"})
        status, body = self.request("GET", f"/api/v1/export?{qs}")
        if status != 200:
            raise RuntimeError(f"export: {status} {body[:300]!r}")
        return [json.loads(line) for line in body.splitlines() if line.strip()]

    def samples(self, match: str = '{__name__=~".+"}') -> int:
        return sum(len(s["values"]) for s in self.export(match))


# --- Hand-written points in the sink's schema, for the `gateway query` tests ---------------

STEP_S = 10                 # one reading per device every 10 s, as a slow greenhouse sends
SPAN_S = 3 * 3600           # three hours of history: enough for `--since 6h`
DEVICES = {                 # device -> (gateway, site, zone)
    "gh-1": ("gh-site-1", "greenhouse", "north"),
    "gh-2": ("gh-site-1", "greenhouse", "north"),
    "gh-3": ("gh-site-1", "greenhouse", "south"),
    "gh-4": ("gh-site-2", "nursery", "east"),
}
METRICS = ("temp", "hum", "soil")


@dataclass
class Filled:
    """What `fill_fieldgate` wrote, for tests to compare query answers with."""

    db: str
    start_ms: int                                    # first reading's timestamp
    end_ms: int                                      # last reading's timestamp
    readings: dict[str, int] = field(default_factory=dict)          # device -> count
    last: dict[str, dict[str, float]] = field(default_factory=dict)  # device -> metric -> value
    series: dict[tuple[str, str], list[tuple[int, float]]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    # gateway -> [(time ms, {field: value})] of the `fieldgate` measurement
    health: dict[str, list[tuple[int, dict[str, float]]]] = field(default_factory=dict)

    @property
    def gateways(self) -> list[str]:
        return sorted({gw for gw, _, _ in DEVICES.values()})


def _esc_tag(value: str) -> str:
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=") \
        .replace(" ", "\\ ")


def _esc_str(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _line(measurement: str, tags: dict[str, str], fields: dict[str, float | str],
          ts_ms: int) -> str:
    tag_part = "".join(f",{k}={_esc_tag(v)}" for k, v in sorted(tags.items()))
    field_part = ",".join(
        f'{k}="{_esc_str(v)}"' if isinstance(v, str) else f"{k}={float(v)!r}"
        for k, v in fields.items())
    return f"{measurement}{tag_part} {field_part} {ts_ms}"


def _value(device: str, metric: str, t: float) -> float:
    """A smooth daily swing with a per-device offset."""
    n = int(device.rsplit("-", 1)[1])
    phase = 2 * math.pi * t / 86400
    if metric == "temp":
        value = 24 + n * 0.5 + 3 * math.sin(phase) + 0.3 * math.sin(t / 97 + n)
    elif metric == "hum":
        value = 60 - n + 5 * math.cos(phase) + 0.5 * math.sin(t / 53 + n)
    else:
        value = 35 - n * 2 + 0.2 * math.sin(t / 31 + n)
    return round(value, 2)


def fill_fieldgate(influx: InfluxD, db: str, *, now: float | None = None) -> Filled:
    """Fill ``db`` with the three measurements a gateway writes, ending just before ``now``.

    gh-1's temperature climbs over 30 °C an hour before the end: an alert fires, a fan
    command goes out, the alert resolves 10 minutes later. gh-3 goes offline for 20 minutes
    (no readings; a device.offline event). The cloud link of gh-site-1 is down for 15
    minutes (link_cloud 0, the uplink depth grows and drains). Returns what it wrote.
    """
    influx.create_database(db)
    end_ms = (int(now if now is not None else time.time()) // STEP_S * STEP_S - STEP_S) * 1000
    start_ms = end_ms - SPAN_S * 1000
    filled = Filled(db=db, start_ms=start_ms, end_ms=end_ms)
    lines: list[str] = []
    hot_from, hot_to = end_ms - 3600_000, end_ms - 3000_000
    offline_from, offline_to = end_ms - 5400_000, end_ms - 4200_000
    for device, (gateway, site, zone) in DEVICES.items():
        tags = {"gateway": gateway, "site": site, "device": device, "zone": zone}
        count = 0
        for ts in range(start_ms, end_ms + 1, STEP_S * 1000):
            if device == "gh-3" and offline_from <= ts < offline_to:
                continue
            values = {m: _value(device, m, ts / 1000) for m in METRICS}
            if device == "gh-1" and hot_from <= ts < hot_to:
                values["temp"] = round(values["temp"] + 8.0, 2)
            lines.append(_line("telemetry", tags, dict(values), ts))
            for metric, value in values.items():
                filled.series.setdefault((device, metric), []).append((ts, value))
            filled.last[device] = values
            count += 1
        filled.readings[device] = count

    def event(ts: int, type_: str, device: str, rule: str, severity: str, summary: str,
              value: float | None) -> None:
        gateway, site, _ = DEVICES[device]
        ev_id = f"{gateway}-{ts}-{type_.rsplit('.', 1)[1]}"
        fields: dict[str, float | str] = {"summary": summary, "id": ev_id}
        if value is not None:
            fields["value"] = value
        tags = {"type": type_, "rule": rule, "device": device, "severity": severity,
                "gateway": gateway, "site": site}
        lines.append(_line("events", {k: v for k, v in tags.items() if v}, fields, ts))
        filled.events.append({"time": ts, "type": type_, "device": device, "rule": rule,
                              "severity": severity, "summary": summary, "value": value,
                              "gateway": gateway, "id": ev_id})

    fire = hot_from + 60_000
    event(fire, "io.fieldgate.alert.fired", "gh-1", "TooHot", "warning",
          "gh-1 too hot: avg temp 32.1 > 30", 32.1)
    event(fire + 1_000, "io.fieldgate.command.issued", "gh-1", "TooHot", "",
          "fan on for gh-1 (TooHot)", None)
    event(hot_to + 60_000, "io.fieldgate.alert.resolved", "gh-1", "TooHot", "warning",
          "gh-1 back to normal: avg temp 27.9", 27.9)
    event(offline_from + 30_000, "io.fieldgate.device.offline", "gh-3", "", "",
          "gh-3 sent nothing for 30s", None)

    cut_from, cut_to = end_ms - 2 * 3600_000, end_ms - 2 * 3600_000 + 900_000
    for gateway, site in sorted({(gw, s) for gw, s, _ in DEVICES.values()}):
        devices = [d for d, (gw, _, _) in DEVICES.items() if gw == gateway]
        # A gateway reports its health once before its first reading: counters at 0.
        health = {"readings_total": 0.0, "readings_per_s": 0.0, "dead_letters_total": 0.0,
                  "dropped_total": 0.0, "log_bytes": 4096.0, "depth_uplink": 0.0,
                  "depth_influx": 0.0, "link_site": 1.0, "link_cloud": 1.0}
        points = [(start_ms - STEP_S * 1000, dict(health))]
        for ts in range(start_ms, end_ms + 1, STEP_S * 1000):
            per_step = float(sum(1 for d in devices
                                 if not (d == "gh-3" and offline_from <= ts < offline_to)))
            cut = gateway == "gh-site-1" and cut_from <= ts < cut_to
            health["readings_total"] += per_step
            health["readings_per_s"] = per_step / STEP_S
            if ts % 600_000 == 0:
                health["dead_letters_total"] += 1  # a malformed payload every 10 minutes
            health["log_bytes"] = 4096.0 + health["readings_total"] * 120
            health["depth_uplink"] = health["depth_uplink"] + per_step if cut else \
                max(0.0, health["depth_uplink"] - 50)
            health["link_cloud"] = 0.0 if cut else 1.0
            points.append((ts, dict(health)))
        for ts, values in points:
            lines.append(_line("fieldgate", {"gateway": gateway, "site": site},
                               dict(values), ts))
        filled.health[gateway] = points
    status, answer = influx.write(db, lines)
    assert status == 204, answer
    return filled


# --- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def influxd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxD]:
    """One InfluxDB 1.x for the session; each test module uses databases of its own."""
    server = InfluxD(tmp_path_factory.mktemp("influxd")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fieldgate_db(influxd: InfluxD) -> Filled:
    """Database ``fieldgate`` filled once per session by `fill_fieldgate`."""
    return fill_fieldgate(influxd, "fieldgate")


@pytest.fixture
def victoria(tmp_path: Path) -> Iterator[VictoriaMetrics]:
    server = VictoriaMetrics(tmp_path).start()
    yield server
    server.stop()
