"""Write requests to InfluxDB: one narrow interface (``Writer.write(body) -> WriteResult``),
so a test or a future transport can take its place.

``HttpWriter`` speaks both write APIs on urllib3, the HTTP library influxdb-client runs on:

- v2: ``POST /api/v2/write?org=&bucket=&precision=`` with ``Authorization: Token``, exactly
  the request influxdb-client's synchronous WriteApi sends (InfluxDB 2.x, 3.x, 1.8+,
  VictoriaMetrics). We do not import influxdb-client in the gateway: measured here, the
  import alone adds 26 MB of RSS (40 -> 66 MB), a third of the 80 MB budget for a Pi, and
  its per-request machinery buys nothing for a body we already encoded. It remains the
  oracle of the line-protocol tests and the baseline of bench/bench_influx.py.
- v1: ``POST /write?db=&rp=&precision=`` with basic auth (InfluxDB 1.x as Debian ships it,
  which has no v2 API).

Both return what happened instead of raising: an HTTP status (0 when no response came:
refused, reset, timed out, TLS failure), the server's message and its Retry-After.
Credentials travel in headers, never in the URL, so no error message can carry them.
"""

from __future__ import annotations

import base64
import gzip
import json
import ssl
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import urlencode

import urllib3

from fieldkit.units import Precision
from gateway.config import Influx, InfluxApi

_V1_PRECISION = {Precision.S: "s", Precision.MS: "ms", Precision.US: "u", Precision.NS: "n"}
# Longest server message kept (it goes into dead letters and one log line).
_MESSAGE_MAX = 500


@dataclass(frozen=True, slots=True)
class WriteResult:
    status: int                  # HTTP status; 0: no response (network error)
    message: str = ""            # the server's error message, or what went wrong
    retry_after: float | None = None  # seconds, from a Retry-After header


class Writer(Protocol):
    where: str  # what the log lines name: URL and database or bucket

    def write(self, body: bytes) -> WriteResult: ...
    def close(self) -> None: ...


def make_writer(cfg: Influx) -> Writer:
    """The transport for ``cfg``; reads the secret now (SecretError if unreadable)."""
    return HttpWriter(cfg)


def server_message(body: bytes | str | None) -> str:
    """The error text from an InfluxDB (``{"error"}``/``{"message"}``) or other response."""
    if not body:
        return ""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        text = str(data.get("error") or data.get("message") or text)
    return " ".join(text.split())[:_MESSAGE_MAX]


def retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        from datetime import UTC, datetime  # noqa: PLC0415 - rare path

        return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


def _network_error(err: BaseException) -> WriteResult:
    reason = getattr(err, "reason", None) or err
    return WriteResult(0, " ".join(str(reason).split())[:_MESSAGE_MAX])


class HttpWriter:
    """POSTs line protocol to ``/write`` (v1) or ``/api/v2/write`` (v2) on a pool of one
    connection (one request in flight, kept alive between batches)."""

    def __init__(self, cfg: Influx) -> None:
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        if cfg.api is InfluxApi.V2:
            params = {"org": cfg.org or "", "bucket": cfg.bucket,
                      "precision": cfg.precision.value}
            path = "/api/v2/write"
            self.where = f"{cfg.url} bucket {cfg.bucket!r}"
            token = cfg.token()
            if token is not None:
                headers["Authorization"] = f"Token {token}"
        else:
            params = {"db": cfg.database, "precision": _V1_PRECISION[cfg.precision]}
            if cfg.retention_policy:
                params["rp"] = cfg.retention_policy
            path = "/write"
            self.where = f"{cfg.url} database {cfg.database!r}"
            if cfg.username is not None:
                secret = f"{cfg.username}:{cfg.password() or ''}".encode()
                headers["Authorization"] = "Basic " + base64.b64encode(secret).decode()
        self._url = f"{cfg.url}{path}?{urlencode(params)}"
        self._gzip = cfg.gzip
        if self._gzip:
            headers["Content-Encoding"] = "gzip"
        self._headers = headers
        tls: dict[str, Any] = {}
        if cfg.url.startswith("https:"):
            tls = {"cert_reqs": ssl.CERT_REQUIRED if cfg.verify else ssl.CERT_NONE}
            if cfg.ca_file is not None:
                tls["ca_certs"] = str(cfg.ca_file)
        self._pool = urllib3.PoolManager(num_pools=1, maxsize=1, retries=False,
                                         timeout=urllib3.Timeout(total=cfg.timeout), **tls)

    def write(self, body: bytes) -> WriteResult:
        data = gzip.compress(body, compresslevel=5) if self._gzip else body
        try:
            resp = self._pool.request("POST", self._url, body=data, headers=self._headers,
                                      redirect=False)
        except (urllib3.exceptions.HTTPError, OSError) as err:
            return _network_error(err)
        if 200 <= resp.status < 300:
            return WriteResult(resp.status)
        return WriteResult(resp.status, server_message(resp.data),
                           retry_after(resp.headers.get("Retry-After")))

    def close(self) -> None:
        self._pool.clear()
