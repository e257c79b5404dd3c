"""InfluxQL over HTTP `/query`: InfluxDB 1.x, 2.x (v1 compatibility API) and 3.x.

The standard library's urllib does this: `/query` is one GET with four parameters, and
influxdb-client has no public InfluxQL call (its QueryApi speaks Flux to `/api/v2/query`,
which InfluxDB 1.x and 3.x do not have). urllib also keeps `gateway query --help` fast on
a Pi and adds no dependency.

Credentials travel in headers (Basic for a 1.x user, ``Token`` for 2.x/3.x), never in the
URL, so no error message, proxy log or server access log shows them.
"""

from __future__ import annotations

import base64
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from gateway.config import public_url, read_secret
from gateway.errors import ConfigError, FieldgateError


class QueryError(FieldgateError):
    """A query could not be answered: server unreachable, refused, or the query is wrong."""


class NoDataError(QueryError):
    """The query ran and matched nothing."""


@dataclass(frozen=True, slots=True)
class InfluxConnection:
    """Where and how to reach the InfluxDB that the `influx` sink writes to."""

    url: str
    api: str = "v1"                      # "v1": 1.x user/password; "v2": 2.x/3.x token
    database: str = "fieldgate"          # for v2 the bucket name (its DBRP mapping)
    measurement: str = "telemetry"       # where the sink writes readings (influx.measurement)
    retention_policy: str | None = None
    username: str | None = None
    password: str | None = None
    token: str | None = None
    ca_file: Path | None = None
    verify: bool = True
    timeout: float = 10.0

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        if "@" in parts.netloc:
            raise ConfigError(["influx.url: credentials in the URL are not accepted; use "
                               "username and password_file, or token_file"])
        if parts.query or parts.fragment:
            raise ConfigError([f"influx.url: {public_url(self.url)!r} has a query string or "
                               "fragment, which has no place in the base URL; use username "
                               "and password_file, or token_file"])
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError([f"influx.url: {self.url!r} must be http://host:port or "
                               f"https://host:port, e.g. http://127.0.0.1:8086"])
        if self.api not in ("v1", "v2"):
            raise ConfigError([f"influx.api: {self.api!r} must be v1 (InfluxDB 1.x) or v2 "
                               f"(InfluxDB 2.x/3.x)"])
        if not self.database:
            raise ConfigError(["influx.database: empty; name the database (v1) or the "
                               "bucket (v2) to query"])
        if self.timeout <= 0:
            raise ConfigError([f"influx.timeout: {self.timeout} must be positive"])

    def __repr__(self) -> str:  # secrets never reach a log or a traceback
        return (f"InfluxConnection(url={public_url(self.url)!r}, api={self.api!r}, "
                f"database={self.database!r})")


def _attr(section: Any, name: str, default: Any = None) -> Any:
    if isinstance(section, dict):
        return section.get(name, default)
    return getattr(section, name, default)


def connection_from(section: Any) -> InfluxConnection:
    """Build the connection from the config's `influx` section (a model or a mapping).

    Secrets are read here, from `password_file`/`password_env` and `token_file`/
    `token_env`; a missing file or variable is a SecretError naming it.
    """
    url = _attr(section, "url")
    if not url:
        raise ConfigError(["influx.url: required, e.g. http://127.0.0.1:8086"])
    api = str(getattr(_attr(section, "api", "v1"), "value", _attr(section, "api", "v1")))
    # InfluxQL names a v2 bucket as a database (2.x: its DBRP mapping; 3.x: its name).
    names = ("bucket", "database") if api == "v2" else ("database", "bucket")
    database = next((_attr(section, n) for n in names if _attr(section, n)), "fieldgate")
    timeout = _attr(section, "timeout", 10.0)
    if hasattr(timeout, "total_seconds"):
        timeout = timeout.total_seconds()

    def path(name: str) -> Path | None:
        value = _attr(section, name)
        return Path(value) if value else None

    return InfluxConnection(
        url=str(url).rstrip("/"), api=api, database=str(database),
        measurement=str(_attr(section, "measurement") or "telemetry"),
        retention_policy=_attr(section, "retention_policy") or None,
        username=_attr(section, "username") or None,
        password=read_secret(path("password_file"), _attr(section, "password_env"),
                             "InfluxDB password"),
        token=read_secret(path("token_file"), _attr(section, "token_env"), "InfluxDB token"),
        ca_file=path("ca_file"), verify=bool(_attr(section, "verify", True)),
        timeout=float(timeout if timeout is not None else 10.0),
    )


@dataclass(frozen=True, slots=True)
class Series:
    """One series of a statement's answer, as InfluxDB returns it; times in epoch ms."""

    name: str
    tags: dict[str, str]
    columns: tuple[str, ...]
    values: tuple[tuple[Any, ...], ...]


class InfluxQLClient:
    """Runs InfluxQL statements against `/query` and returns their series."""

    def __init__(self, conn: InfluxConnection) -> None:
        self.conn = conn
        self._where = public_url(conn.url)  # what error lines show: no userinfo, no query
        self._context: ssl.SSLContext | None = None
        if conn.url.startswith("https://"):
            try:
                self._context = ssl.create_default_context(
                    cafile=str(conn.ca_file) if conn.ca_file else None)
            except (ssl.SSLError, OSError) as err:
                raise ConfigError([f"influx.ca_file: {str(conn.ca_file)!r} is not a usable "
                                   f"CA bundle ({err})"]) from None
            if not conn.verify:
                self._context.check_hostname = False
                self._context.verify_mode = ssl.CERT_NONE

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.conn.token is not None:
            headers["Authorization"] = f"Token {self.conn.token}"
        elif self.conn.username is not None:
            pair = f"{self.conn.username}:{self.conn.password or ''}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        return headers

    def query(self, statements: str) -> list[list[Series]]:
        """Run one or more `;`-separated statements; one list of series per statement.

        Raises QueryError with one line saying what went wrong and what to check.
        """
        params = {"db": self.conn.database, "q": statements, "epoch": "ms"}
        if self.conn.retention_policy:
            params["rp"] = self.conn.retention_policy
        url = f"{self.conn.url}/query?{urllib.parse.urlencode(params)}"
        # http(s) only: InfluxConnection refuses other schemes.
        req = urllib.request.Request(url, headers=self._headers(), method="GET")  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=self.conn.timeout,  # noqa: S310
                                        context=self._context) as resp:
                body = resp.read()
        except urllib.error.HTTPError as err:
            raise self._http_error(err.code, err.read()) from None
        except urllib.error.URLError as err:
            raise self._unreachable(err.reason) from None
        except (TimeoutError, ConnectionError) as err:
            raise self._unreachable(err) from None
        return self._parse(body)

    def measurements(self) -> list[str]:
        series = self.query("SHOW MEASUREMENTS")[0]
        return [str(row[0]) for s in series for row in s.values]

    def require_database(self) -> None:
        """QueryError when the server lists its databases and ours is not among them.

        InfluxDB 1.x answers SHOW MEASUREMENTS on a missing database with nothing at all;
        this tells "no such database" from "an empty one".
        """
        try:
            listed = self.query("SHOW DATABASES")[0]
        except QueryError:
            return  # a user without the right to list databases: say nothing more
        names = {str(row[0]) for s in listed for row in s.values}
        if names and self.conn.database not in names:
            raise QueryError(f"InfluxDB at {self._where}: database not found: "
                             f"{self.conn.database}; check influx.database / --db "
                             f"(databases: {', '.join(sorted(names))})")

    def _unreachable(self, reason: object) -> QueryError:
        where = f"InfluxDB at {self._where}"
        if isinstance(reason, ssl.SSLError | ssl.CertificateError):
            return QueryError(f"TLS to {where} failed ({reason}); check influx.ca_file or "
                              f"influx.verify")
        if isinstance(reason, TimeoutError):
            return QueryError(f"{where} did not answer within {self.conn.timeout:g}s; is it "
                              f"overloaded? raise influx.timeout")
        text = getattr(reason, "strerror", None) or str(reason)
        return QueryError(f"cannot reach {where} ({text}); is influxd running? check "
                          f"influx.url or --url")

    def _http_error(self, code: int, body: bytes) -> QueryError:
        detail = _error_text(body)
        where = f"InfluxDB at {self._where}"
        if code in (401, 403):
            how = "token_file/token_env" if self.conn.api == "v2" or self.conn.token \
                else "username and password_file"
            return QueryError(f"{where} refused the credentials (HTTP {code}: {detail}); "
                              f"check influx.{how}")
        if code == 404:
            return QueryError(f"{where} has no database or bucket {self.conn.database!r} "
                              f"(HTTP 404: {detail}); check influx.database / --db")
        if code == 400:
            return QueryError(f"InfluxDB rejected the query: {detail}")
        return QueryError(f"{where} failed (HTTP {code}: {detail}); try again later")

    def _parse(self, body: bytes) -> list[list[Series]]:
        try:
            doc = orjson.loads(body)
            results = doc.get("results")
        except (orjson.JSONDecodeError, AttributeError):
            raise QueryError(f"the server at {self._where} did not answer like InfluxDB "
                             f"(not JSON: {body[:80]!r}); check influx.url") from None
        if doc.get("error"):
            raise QueryError(f"InfluxDB rejected the query: {doc['error']}")
        if not isinstance(results, list):
            raise QueryError(f"the server at {self._where} did not answer like InfluxDB "
                             f"(no results); check influx.url")
        out: list[list[Series]] = []
        for result in results:
            error = result.get("error")
            if error:
                if str(error).startswith("database not found"):
                    raise QueryError(f"InfluxDB at {self._where}: {error}; check "
                                     f"influx.database / --db")
                raise QueryError(f"InfluxDB rejected the query: {error}")
            out.append([
                Series(name=str(s.get("name", "")), tags=dict(s.get("tags") or {}),
                       columns=tuple(s.get("columns") or ()),
                       values=tuple(tuple(v) for v in s.get("values") or ()))
                for s in result.get("series") or ()
            ])
        return out


def _error_text(body: bytes) -> str:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace").strip()[:200] or "no detail"
    if isinstance(doc, dict):
        for key in ("error", "message"):
            if doc.get(key):
                return str(doc[key])
    return str(doc)[:200]
