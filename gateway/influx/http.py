"""Write requests to InfluxDB: one narrow interface (``Writer.write(body) -> WriteResult``)
with two transports.

- ``V2Writer``: ``/api/v2/write`` through influxdb-client's synchronous WriteApi (InfluxDB
  2.x, 3.x, 1.8+, VictoriaMetrics). Its batching thread is not used: the sink batches from
  the log and must know the fate of every request before it moves its cursor.
- ``V1Writer``: ``/write?db=&rp=`` (InfluxDB 1.x as Debian ships it, which has no v2 API)
  on urllib3, the HTTP library influxdb-client itself runs on.

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

from gateway.config import Influx, InfluxApi
from gateway.influx.lineproto import Precision

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
    """The transport for ``cfg.api``; reads the secret now (SecretError if unreadable)."""
    return V2Writer(cfg) if cfg.api is InfluxApi.V2 else V1Writer(cfg)


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


class V1Writer:
    def __init__(self, cfg: Influx) -> None:
        params = {"db": cfg.database, "precision": _V1_PRECISION[cfg.precision]}
        if cfg.retention_policy:
            params["rp"] = cfg.retention_policy
        self._url = f"{cfg.url}/write?{urlencode(params)}"
        self.where = f"{cfg.url} database {cfg.database!r}"
        self._headers = {"Content-Type": "text/plain; charset=utf-8"}
        if cfg.username is not None:
            secret = f"{cfg.username}:{cfg.password() or ''}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(secret).decode()
        self._gzip = cfg.gzip
        if self._gzip:
            self._headers["Content-Encoding"] = "gzip"
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


class V2Writer:
    def __init__(self, cfg: Influx) -> None:
        from influxdb_client.client.influxdb_client import InfluxDBClient  # noqa: PLC0415
        from influxdb_client.client.write_api import SYNCHRONOUS  # noqa: PLC0415
        from influxdb_client.domain.write_precision import WritePrecision  # noqa: PLC0415
        from influxdb_client.rest import ApiException  # noqa: PLC0415

        self._api_exception = ApiException
        self.where = f"{cfg.url} bucket {cfg.bucket!r}"
        extra: dict[str, Any] = {"verify_ssl": cfg.verify}
        if cfg.ca_file is not None:
            extra["ssl_ca_cert"] = str(cfg.ca_file)
        assert cfg.org is not None  # the config requires it with api: v2
        # No token (VictoriaMetrics without auth): influxdb-client then sends no header.
        token: Any = cfg.token()
        self._client = InfluxDBClient(url=cfg.url, token=token, org=cfg.org,
                                      timeout=int(cfg.timeout * 1000), enable_gzip=cfg.gzip,
                                      **extra)
        self._api = self._client.write_api(write_options=SYNCHRONOUS)
        self._bucket = cfg.bucket
        self._org: str = cfg.org
        self._precision = getattr(WritePrecision, cfg.precision.name)

    def write(self, body: bytes) -> WriteResult:
        try:
            self._api.write(bucket=self._bucket, org=self._org, record=body,
                            write_precision=self._precision)
        except self._api_exception as err:
            headers = getattr(err, "headers", None) or {}
            return WriteResult(int(err.status or 0), server_message(err.body),
                               retry_after(headers.get("Retry-After")))
        except (urllib3.exceptions.HTTPError, OSError) as err:
            return _network_error(err)
        return WriteResult(204)

    def close(self) -> None:
        self._api.close()  # type: ignore[no-untyped-call]  # influxdb-client: untyped
        self._client.close()  # type: ignore[no-untyped-call]
