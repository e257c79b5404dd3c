"""Where the status view gets its facts: the gateway's own /metrics and its log file.

Never a second MQTT subscription: what the view shows is what the gateway made durable
and what it counts. The log is opened read-only (the gateway's WAL lets a reader in while
it writes); /metrics is one HTTP GET.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import split_host_port
from gateway.errors import FieldgateError, LogError
from gateway.log.reader import plain_body
from gateway.log.schema import connect

# Keys of a logged reading that are not metrics.
_NOT_METRICS = frozenset({"seq", "device", "ts", "gateway", "clock_unsynced"})
# Newest log rows (one per group commit, up to 2,048 readings each) read per poll. A busy
# gateway logs more than this in a second; the view then sees the newest rows only (values
# stay current, sparklines sample), and a poll stays a few tens of milliseconds on a Pi.
ROWS_PER_POLL = 200
# How far back (in sequence numbers) the first poll looks for events: enough to find the
# last command to each actuator on a quiet site, bounded so a 1 GB log is not scanned.
EVENT_LOOKBACK = 200_000
# Events read per poll (the feed keeps the newest few anyway).
EVENTS_PER_POLL = 200
# /metrics answers in milliseconds; longer means the gateway is stuck or it is not ours.
_SCRAPE_TIMEOUT = 3.0


class StatusError(FieldgateError):
    """The status view cannot see the gateway (not running, metrics or log unreachable)."""


def metrics_url(listen: str) -> str:
    """The URL of /metrics for a ``metrics.listen`` value (a wildcard host is asked on
    loopback)."""
    host, port = split_host_port(listen)
    if host in ("0.0.0.0", ""):  # noqa: S104 - a bind address, not ours to bind
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"


@dataclass(frozen=True, slots=True)
class MetricsView:
    """The numbers of one /metrics scrape that the view shows."""

    links: dict[str, bool]
    depths: dict[str, int]
    readings_total: float
    dead_letters_total: float
    dropped_total: float
    alerts_firing: float
    log_bytes: float
    log_full: bool


def parse_metrics(text: str) -> MetricsView:
    values: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values.setdefault(sample.name, []).append((dict(sample.labels), sample.value))

    def total(name: str) -> float:
        return sum(v for _, v in values.get(name, []))

    def by(name: str, label: str) -> dict[str, float]:
        return {labels[label]: v for labels, v in values.get(name, []) if label in labels}

    return MetricsView(
        links={k: v >= 1 for k, v in by("fieldgate_link_connected", "link").items()},
        depths={k: int(v) for k, v in by("fieldgate_log_undelivered_readings", "sink").items()},
        readings_total=total("fieldgate_readings_total"),
        dead_letters_total=total("fieldgate_dead_letters_total"),
        dropped_total=total("fieldgate_log_dropped_readings_total"),
        alerts_firing=total("fieldgate_alerts_firing"),
        log_bytes=total("fieldgate_log_bytes"),
        log_full=total("fieldgate_log_full") >= 1,
    )


def scrape(url: str) -> MetricsView:
    """One scrape of the gateway's /metrics; StatusError (one line) when it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=_SCRAPE_TIMEOUT) as resp:  # noqa: S310
            text = resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        raise StatusError(f"the gateway's metrics at {url} answer HTTP {err.code}") from None
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise StatusError(f"the gateway's metrics at {url} do not answer ({reason})") from None
    if "fieldgate_" not in text:
        raise StatusError(f"{url} answers, but not with a Fieldgate gateway's metrics; check "
                          "metrics.listen in the config")
    try:
        return parse_metrics(text)
    except ValueError as err:
        raise StatusError(f"{url}: unreadable metrics ({err})") from None


def gateway_running(pid_file: Path) -> int | None:
    """The pid of the gateway holding ``pid_file`` locked (see daemon.PidLock), or None.

    Asks the kernel rather than trusting the file: a crash leaves the file, not the lock.
    """
    try:
        fd = os.open(pid_file, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class LoggedReading:
    created: float          # when the gateway logged it (its clock, not the device's)
    device: str
    metrics: dict[str, float]


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    seq: int
    created: float
    body: dict[str, Any]    # the CloudEvents JSON the gateway logged


@dataclass(frozen=True, slots=True)
class SinkCursor:
    next_seq: int
    oldest_undelivered: float | None   # when the oldest record it still owes was logged


@dataclass(frozen=True, slots=True)
class TailBatch:
    """What the log gained since the previous poll (the newest part of it, see
    ROWS_PER_POLL), and where each sink's cursor stands."""

    gateway_id: str
    readings: list[LoggedReading]
    events: list[LoggedEvent]
    cursors: dict[str, SinkCursor] = field(default_factory=dict)


class LogTail:
    """Follows the log file read-only: new readings and events on every poll."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.exists():
            raise StatusError(f"log {str(path)!r} does not exist: no gateway has run with this "
                              "config yet (check log.path)")
        try:
            self._conn: sqlite3.Connection = connect(path, readonly=True)
        except LogError as err:
            raise StatusError(str(err)) from None
        self._seen = 0      # highest seq read so far
        self._gateway_id = ""

    def poll(self, *, since: float) -> TailBatch:
        """New records since the previous poll; readings logged before ``since`` (epoch)
        are left out (on the first poll: only the last minute or so is wanted)."""
        try:
            return self._poll(since)
        except sqlite3.Error as err:
            raise StatusError(f"log {str(self.path)!r}: {err}") from None

    def _poll(self, since: float) -> TailBatch:
        conn = self._conn
        if not self._gateway_id:
            row = conn.execute("SELECT value FROM meta WHERE key = 'gateway_id'").fetchone()
            self._gateway_id = str(row[0]) if row else ""
        top = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM records").fetchone()[0]
        readings: list[LoggedReading] = []
        rows = conn.execute(
            "SELECT created, body, codec FROM records WHERE seq > ? AND kind = 0 "
            "ORDER BY seq DESC LIMIT ?", (self._seen, ROWS_PER_POLL)).fetchall()
        for created, body, codec in reversed(rows):
            if created < since:
                continue
            for item in orjson.loads(b"[" + plain_body(body, codec) + b"]"):
                metrics = {k: float(v) for k, v in item.items()
                           if k not in _NOT_METRICS and isinstance(v, int | float)}
                readings.append(LoggedReading(created, str(item.get("device", "")), metrics))
        low = self._seen if self._seen else max(0, top - EVENT_LOOKBACK)
        events = [LoggedEvent(seq, created, orjson.loads(body)) for seq, created, body in
                  reversed(conn.execute(
                      "SELECT seq, created, body FROM records WHERE seq > ? AND kind = 1 "
                      "ORDER BY seq DESC LIMIT ?", (low, EVENTS_PER_POLL)).fetchall())]
        self._seen = max(self._seen, top)
        cursors = {}
        for sink, next_seq in conn.execute("SELECT sink, next_seq FROM cursors ORDER BY sink"):
            oldest = conn.execute("SELECT created FROM records WHERE seq >= ? ORDER BY seq "
                                  "LIMIT 1", (next_seq,)).fetchone()
            cursors[str(sink)] = SinkCursor(int(next_seq), float(oldest[0]) if oldest else None)
        return TailBatch(self._gateway_id, readings, events, cursors)

    def close(self) -> None:
        self._conn.close()
