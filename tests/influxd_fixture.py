"""A real InfluxDB 1.x (`influxd`, Debian package `influxdb`) on free ports, and its data.

`InfluxD` runs one server in a temporary directory: its config binds the HTTP API and the
RPC (backup) service to free loopback ports, and keeps meta, data and WAL in the directory.
Ready means `/ping` answers 204, nothing else.

`fill_fieldgate` writes what a gateway's `influx` sink writes — the schema in DESIGN.md:
`telemetry`, `events` and `fieldgate` — from an emulator-like greenhouse series. It is the
one place that fills the database for `tests/test_query.py` and `tests/test_dashboards.py`:
when the sink lands, this function is what to switch to "run the emulator through the
gateway into this server". It returns what it wrote, so tests compare against that.
"""

from __future__ import annotations

import base64
import math
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.mosquitto import free_port

CONF = """\
reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"

[meta]
  dir = "{dir}/meta"

[data]
  dir = "{dir}/data"
  wal-dir = "{dir}/wal"
  query-log-enabled = false
  trace-logging-enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:{http_port}"
  log-enabled = false
  write-tracing = false

[monitor]
  store-enabled = false

[continuous_queries]
  enabled = false

[logging]
  level = "warn"
"""


def find_influxd() -> str | None:
    return shutil.which("influxd") or next(
        (p for p in ("/usr/bin/influxd", "/usr/sbin/influxd") if Path(p).exists()), None)


class InfluxD:
    """One `influxd` process on free loopback ports, its files under ``workdir``."""

    def __init__(self, workdir: Path, *, auth: bool = False) -> None:
        binary = find_influxd()
        if binary is None:
            raise RuntimeError("influxd is not installed (sudo apt-get install -y influxdb)")
        self.binary = binary
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        self.conf = self.dir / "influxdb.conf"
        conf = CONF.format(dir=self.dir, http_port=self.http_port, rpc_port=free_port())
        if auth:  # users and passwords; the first CREATE USER ... WITH ALL PRIVILEGES is free
            conf = conf.replace("  log-enabled = false",
                                "  log-enabled = false\n  auth-enabled = true")
        self.conf.write_text(conf)
        self.log = self.dir / "influxd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 30) -> InfluxD:
        self.proc = subprocess.Popen([self.binary, "-config", str(self.conf)],
                                     stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"influxd exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as resp:
                    if resp.status == 204:
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"influxd did not answer /ping: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def query(self, q: str, db: str | None = None,
              auth: tuple[str, str] | None = None) -> dict[str, Any]:
        """POST /query (so statements that write, like CREATE DATABASE, are allowed)."""
        params = {"q": q, "epoch": "ms"}
        if db is not None:
            params["db"] = db
        body = urllib.parse.urlencode(params).encode()
        req = urllib.request.Request(f"{self.url}/query", data=body, method="POST")
        if auth is not None:
            pair = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {pair}")
        with urllib.request.urlopen(req, timeout=30) as resp:
            result: dict[str, Any] = orjson.loads(resp.read())
        return result

    def create_database(self, db: str) -> None:
        self.query(f'CREATE DATABASE "{db}"')

    def write(self, db: str, lines: list[str], precision: str = "ms") -> None:
        """Write line protocol through /write, in chunks the server takes comfortably."""
        for start in range(0, len(lines), 5000):
            body = "\n".join(lines[start:start + 5000]).encode()
            req = urllib.request.Request(
                f"{self.url}/write?db={urllib.parse.quote(db)}&precision={precision}",
                data=body, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    assert resp.status == 204, resp.read()
            except urllib.error.HTTPError as err:
                raise AssertionError(f"write refused: {err.code} {err.read()!r}") from err


# --- What a gateway's influx sink writes, from an emulator-like greenhouse ----------------

STEP_S = 10                 # one reading per device every 10 s, as a slow greenhouse sends
SPAN_S = 3 * 3600           # three hours of history: enough for `--since 6h` and a dashboard
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
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


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
    """A smooth daily swing with a per-device offset; gh-1 overheats for a while."""
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
    minutes (link_cloud 0, the uplink depth grows and drains).
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
    influx.write(db, lines)
    return filled


@pytest.fixture(scope="session")
def influxd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxD]:
    """One InfluxDB 1.x for the session; each test module uses its own databases."""
    if find_influxd() is None:
        pytest.fail("influxd is not installed: sudo apt-get install -y influxdb "
                    "(.ci/run installs it)")
    server = InfluxD(tmp_path_factory.mktemp("influxd")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fieldgate_db(influxd: InfluxD) -> Filled:
    """A database filled once per session with what a gateway writes (see fill_fieldgate)."""
    return fill_fieldgate(influxd, "fieldgate")
