"""Reading the log: what sinks forward and what `gateway log` shows."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from gateway.log.schema import connect


@dataclass(frozen=True, slots=True)
class Row:
    seq: int
    n: int
    body: bytes
    kind: int = 0  # 0 telemetry, 1 event


class LogReader:
    """A read connection of its own; safe to use from a sink's thread."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self._conn: sqlite3.Connection = connect(path, readonly=readonly) if readonly else \
            sqlite3.connect(path, check_same_thread=False)

    def read(self, from_seq: int, *, max_readings: int, max_bytes: int) -> list[Row]:
        """Rows from ``from_seq`` on, in order, within the given bounds, all of one kind:
        a run of telemetry rows, or a single event.

        The first row is always returned even if it alone exceeds a bound, so that nothing
        can get stuck. A row whose readings start below ``from_seq`` (never split) is skipped.
        """
        out: list[Row] = []
        readings = 0
        size = 0
        cur = self._conn.execute(
            "SELECT seq, n, body, kind FROM records WHERE seq >= ? ORDER BY seq LIMIT ?",
            (from_seq, max_readings),
        )
        for seq, n, body, kind in cur:
            if out and (kind != 0 or readings + n > max_readings
                        or size + len(body) + 1 > max_bytes):
                break
            out.append(Row(seq, n, body, kind))
            if kind != 0:
                break
            readings += n
            size += len(body) + 1
        cur.close()
        return out

    def close(self) -> None:
        self._conn.close()
