"""Reading the log: what sinks forward and what `gateway log` shows."""

from __future__ import annotations

import sqlite3
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate
from operator import itemgetter
from pathlib import Path

from gateway.log.schema import connect


@dataclass(frozen=True, slots=True)
class Row:
    seq: int
    n: int
    body: bytes
    kind: int = 0  # 0 telemetry, 1 event


@dataclass(frozen=True, slots=True)
class Run:
    """What ``read_run`` read: the bodies of a run of telemetry rows or of one event."""

    kind: int
    bodies: list[bytes]
    end: int  # the seq after the last reading read


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

    def read_run(self, from_seq: int, *, max_readings: int, max_bytes: int) -> Run | None:
        """What ``read`` returns, as one ``Run`` of bodies rather than a ``Row`` per row
        (the influx sink's path: a drain of many small rows spent its time on per-row
        Python). The bounds may cut it shorter than ``read`` where seq has gaps.

        Usually the run is every row of seq ``from_seq .. from_seq + max_readings - 1``:
        one aggregate query finds that it holds no event and fits ``max_bytes``, a second
        fetches the bodies alone. Otherwise each row's kind and size are looked at.
        """
        to = from_seq + max_readings
        # Rows ending past ``to`` hold readings beyond the bound: not in this run.
        last, end, size, event = self._conn.execute(
            "SELECT max(seq), max(seq + n), sum(length(body) + 1), "
            "min(CASE WHEN kind != 0 THEN seq END) "
            "FROM records WHERE seq >= ? AND seq < ? AND seq + n <= ?",
            (from_seq, to, to)).fetchone()
        if last is not None and event is None and size <= max_bytes:
            # Up to ``last``: rows appended since are past it (and rows dropped since at
            # the cap are simply not there).
            rows = self._conn.execute(
                "SELECT body FROM records WHERE seq >= ? AND seq <= ? ORDER BY seq",
                (from_seq, last)).fetchall()
            return Run(0, list(map(itemgetter(0), rows)), end)
        rows = self._conn.execute(
            "SELECT seq, n, kind, body FROM records WHERE seq >= ? ORDER BY seq LIMIT ?",
            (from_seq, max_readings),
        ).fetchall()
        if not rows:
            return None
        # Columns by C-level maps: zip(*rows) would make an iterator object per row.
        seqs, ns, kinds, bodies = (list(map(itemgetter(i), rows)) for i in range(4))
        if kinds[0] != 0:
            return Run(kinds[0], [bodies[0]], seqs[0] + ns[0])
        count = len(rows)
        if kinds.count(0) != count:
            count = kinds.index(next(k for k in kinds if k != 0))
        if sum(ns[:count]) > max_readings:
            count = max(1, bisect_right(list(accumulate(ns[:count])), max_readings))
        if sum(map(len, bodies[:count])) + count > max_bytes:
            sizes = accumulate(map((1).__add__, map(len, bodies[:count])))
            count = max(1, bisect_right(list(sizes), max_bytes))
        return Run(0, bodies[:count], seqs[count - 1] + ns[count - 1])

    def close(self) -> None:
        self._conn.close()
