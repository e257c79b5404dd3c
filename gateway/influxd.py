"""An InfluxDB 1.x process (`influxd`, Debian's `influxdb`) on free loopback ports in a
directory of its own, for `gateway demo` and the tests (tests/tsdb.py writes its config
with `config_text`).

Ready means `/ping` answers 204, never a sleep.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from gateway.errors import FieldgateError
from gateway.mosquitto import end_process, free_port

INSTALL_HINT = "sudo apt-get install -y influxdb"

# influxd 1.6 is slow to open its stores on a loaded Pi; a hang is caught, not a slow start.
_START_TIMEOUT = 30.0

CONF = """\
reporting-disabled = true
bind-address = "127.0.0.1:{rpc}"
[meta]
  dir = "{dir}/meta"
  logging-enabled = false
[data]
  dir = "{dir}/data"
  wal-dir = "{dir}/wal"
  query-log-enabled = false
  trace-logging-enabled = false
[monitor]
  store-enabled = false
[http]
  enabled = true
  bind-address = "127.0.0.1:{port}"
  auth-enabled = {auth}
  log-enabled = false
  max-body-size = {max_body}
[logging]
  level = "warn"
[subscriber]
  enabled = false
[continuous_queries]
  enabled = false
[retention]
  enabled = false
"""


def config_text(*, port: int, rpc: int, directory: Path, auth: bool = False,
                max_body: int = 25_000_000) -> str:
    """An influxd config: HTTP on ``port`` and RPC (backups) on ``rpc``, both on loopback;
    meta, data and WAL under ``directory``; no usage reporting, no self-monitoring."""
    return CONF.format(rpc=rpc, port=port, dir=directory, auth=str(auth).lower(),
                       max_body=max_body)


def find_influxd() -> str | None:
    """The influxd binary, or None when InfluxDB 1.x is not installed."""
    return shutil.which("influxd") or shutil.which("influxd", path="/usr/bin:/usr/sbin")


class InfluxD:
    """influxd with a generated config, started and stopped by its owner."""

    def __init__(self, workdir: Path, binary: str | None = None) -> None:
        found = binary or find_influxd()
        if found is None:
            raise FieldgateError(f"InfluxDB (influxd) is not installed; run: {INSTALL_HINT}")
        self._binary = found
        self.port = free_port()
        self.dir = workdir / "influxd"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "influxd.log"
        self.conf = self.dir / "influxdb.conf"
        self.conf.write_text(config_text(port=self.port, rpc=free_port(), directory=self.dir))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> InfluxD:
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen([self._binary, "run", "-config", str(self.conf)],
                                         stdout=out, stderr=out)
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:]
                raise FieldgateError(f"influxd exited at start: {' '.join(tail)}")
            if self._request("GET", "/ping") == 204:
                return self
            time.sleep(0.05)
        self.stop()
        raise FieldgateError(f"influxd on port {self.port} not ready within {_START_TIMEOUT:.0f} s")

    def create_database(self, name: str) -> None:
        query = urllib.parse.urlencode({"q": f'CREATE DATABASE "{name}"'})
        status = self._request("POST", f"/query?{query}")
        if status != 200:
            raise FieldgateError(f"influxd refused CREATE DATABASE {name!r} (HTTP {status})")

    def stop(self) -> None:
        end_process(self.proc, 15)
        self.proc = None

    def _request(self, method: str, path: str) -> int:
        # Always http://127.0.0.1:<our port>: no scheme from outside.
        req = urllib.request.Request(self.url + path, method=method,  # noqa: S310
                                     data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310
                return int(resp.status)
        except urllib.error.HTTPError as err:
            return int(err.code)
        except OSError:
            return 0
