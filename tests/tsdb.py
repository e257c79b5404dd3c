"""Real time-series servers for tests and benches, on free ports in temp dirs.

- ``InfluxD``: InfluxDB 1.6.7 (Debian's ``influxdb``): ``/write`` and ``/query``
  (InfluxQL), no v2 API. Optionally with auth and an admin user.
- ``VictoriaMetrics``: accepts the v2 write API influxdb-client uses; read back with
  ``export`` (``/internal/force_flush`` then ``/api/v1/export``); series are named
  ``<measurement>_<field>``.

Both can be stopped and started again on the same port and data (outage tests), and are
ready when their health endpoint answers, never after a sleep. Usable from any test:
``from tests.tsdb import InfluxD``, or the ``influxd`` / ``victoria`` fixtures below.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.influxd import CONF
from gateway.mosquitto import free_port
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
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
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
                 admin: tuple[str, str] = ("admin", "admin-pw")) -> None:
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
        if self.auth and not self._admin_created:
            # With auth on and no users yet, InfluxDB 1.x lets anyone create the admin.
            user, password = self.admin
            self.query(f"CREATE USER {user} WITH PASSWORD '{password}' WITH ALL PRIVILEGES",
                       method="POST")
            self._admin_created = True
        return self

    def _auth_headers(self) -> dict[str, str]:
        if not self.auth:
            return {}
        token = base64.b64encode(":".join(self.admin).encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def query(self, q: str, db: str | None = None, *, method: str = "GET") -> Any:
        """Run InfluxQL; the parsed JSON (epoch ms timestamps). Raises on an error."""
        params = {"q": q, "epoch": "ms"}
        if db:
            params["db"] = db
        qs = urllib.parse.urlencode(params)
        status, body = self.request(method, f"/query?{qs}", b"" if method == "POST" else None,
                                    self._auth_headers())
        data = json.loads(body or b"{}")
        errors = [r["error"] for r in data.get("results", []) if "error" in r]
        if status >= 300 or "error" in data or errors:
            raise RuntimeError(f"query {q!r}: {status} {data}")
        return data

    def create_database(self, db: str) -> None:
        self.query(f'CREATE DATABASE "{db}"', method="POST")

    def write(self, db: str, lines: str, precision: str = "ms") -> tuple[int, bytes]:
        qs = urllib.parse.urlencode({"db": db, "precision": precision})
        return self.request("POST", f"/write?{qs}", lines.encode(), self._auth_headers())

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


@pytest.fixture
def influxd(tmp_path: Path) -> Iterator[InfluxD]:
    server = InfluxD(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def victoria(tmp_path: Path) -> Iterator[VictoriaMetrics]:
    server = VictoriaMetrics(tmp_path).start()
    yield server
    server.stop()
