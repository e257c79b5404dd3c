"""Reading the log: what sinks forward and what `gateway log` shows.

A telemetry row holds the readings of one group commit, compressed (codec 1). Readers see
plain rows: the body is the comma-joined JSON readings, and a row is cut where a bound or
a cursor falls inside it, so a sink never gets more than it asked for.
"""

from __future__ import annotations

import itertools
import sqlite3
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gateway.log.recent import RecentRows, StoredRow
from gateway.log.schema import CODEC_ZLIB, connect

# Each reading in a body is an object that starts with its seq (the log writes it first).
# A quote inside a JSON string is always escaped, so this marks reading boundaries only.
_BOUNDARY = b',{"seq":'


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


def plain_body(body: bytes, codec: int) -> bytes:
    return zlib.decompress(body) if codec == CODEC_ZLIB else bytes(body)


def split_readings(body: bytes) -> list[bytes]:
    """A telemetry body cut into its readings' JSON objects."""
    parts = body.split(_BOUNDARY)
    return parts[:1] + [b'{"seq":' + part for part in parts[1:]]


class LogReader:
    """A read connection of its own; safe to use from a sink's thread."""

    def __init__(self, path: Path | None, *, readonly: bool = False,
                 conn: sqlite3.Connection | None = None,
                 recent: RecentRows | None = None) -> None:
        """Opens ``path``, or reads through ``conn`` (the writer's, for what it reads back).
        ``recent``: the writer's newest rows (``LogStore.recent``), read from memory when a
        read starts inside them; only for a reader in the writer's thread."""
        self._recent = recent
        if conn is not None:
            self._conn = conn
        elif path is None:
            raise ValueError("LogReader needs a path or a connection")
        else:
            self._conn = connect(path, readonly=readonly) if readonly else \
                sqlite3.connect(path, check_same_thread=False)
        # The last row cut into readings: a sink reads a large row in several batches.
        self._cut: tuple[int, list[bytes]] | None = None

    def _readings(self, seq: int, body: bytes, codec: int) -> list[bytes]:
        if self._cut is None or self._cut[0] != seq:
            self._cut = (seq, split_readings(plain_body(body, codec)))
        return self._cut[1]

    def read(self, from_seq: int, *, max_readings: int, max_bytes: int) -> list[Row]:
        """Rows from ``from_seq`` on, in order, within the given bounds, all of one kind:
        a run of telemetry rows, or a single event.

        A row that starts before ``from_seq`` or does not fit the bounds whole is cut; the
        first reading is always returned even if it alone exceeds a bound, so that nothing
        can get stuck.
        """
        kept = None if self._recent is None else self._recent.since(from_seq, max_readings)
        if kept is not None:
            return self._fill(from_seq, kept, max_readings, max_bytes)
        # The row holding from_seq, if it starts before it (one step down the primary key),
        # and those after it, stepped through only as far as the bounds take: the LIMIT
        # counts rows, the bounds readings, so fetching all of them read (and paid for the
        # bodies of) up to max_readings rows of 100s of readings each for one batch.
        first = [row for row in self._conn.execute(
            "SELECT seq, n, body, kind, codec FROM records WHERE seq <= ? "
            "ORDER BY seq DESC LIMIT 1", (from_seq,)) if row[0] + row[1] > from_seq]
        rest = self._conn.execute(
            "SELECT seq, n, body, kind, codec FROM records WHERE seq > ? ORDER BY seq "
            "LIMIT ?", (from_seq, max(1, max_readings)))
        try:
            return self._fill(from_seq, itertools.chain(first, rest), max_readings, max_bytes)
        finally:
            rest.close()

    def _fill(self, from_seq: int, kept: Iterable[StoredRow], max_readings: int,
              max_bytes: int) -> list[Row]:
        out: list[Row] = []
        readings = 0
        size = 0
        for seq, n, body, kind, codec in kept:
            if kind != 0:
                if out:
                    break
                return [Row(seq, n, plain_body(body, codec), kind)]
            start = max(seq, from_seq)
            whole = start == seq and codec != CODEC_ZLIB
            room_n = max_readings - readings
            if whole and n <= room_n and size + len(body) + 1 <= max_bytes:
                out.append(Row(seq, n, bytes(body), kind))
                readings += n
                size += len(body) + 1
                continue
            parts = self._readings(seq, body, codec)
            take: list[bytes] = []
            for part in parts[start - seq:]:
                if (out or take) and (readings + len(take) >= max_readings
                                      or size + len(part) + 1 > max_bytes):
                    break
                take.append(part)
                size += len(part) + 1
            if take:
                out.append(Row(start, len(take), b",".join(take), kind))
                readings += len(take)
            if start + len(take) < seq + n:
                break   # a bound fell inside this row
        return out

    def between(self, first: int, end: int) -> list[Row]:
        """Exactly the records with seq in [first, end), rows cut to fit."""
        out: list[Row] = []
        seq = first
        while seq < end:
            rows = self.read(seq, max_readings=end - seq, max_bytes=1 << 62)
            if not rows:
                break
            for row in rows:
                if row.seq >= end:
                    return out
                keep = min(row.n, end - row.seq)
                if keep < row.n:
                    out.append(Row(row.seq, keep, b",".join(split_readings(row.body)[:keep]),
                                   row.kind))
                else:
                    out.append(row)
                seq = row.seq + keep
        return out

    def read_within(self, from_seq: int, end: int, *, max_readings: int,
                    max_bytes: int) -> list[Row]:
        """``read`` bounded above too: only records with seq in [``from_seq``, ``end``),
        rows cut to fit. Records the log no longer holds are skipped, so the first row may
        start after ``from_seq``; an empty list: nothing is left below ``end``."""
        if end <= from_seq:
            return []
        rows = self.read(from_seq, max_readings=min(max_readings, end - from_seq),
                         max_bytes=max_bytes)
        out: list[Row] = []
        for row in rows:
            if row.seq >= end:
                break
            keep = min(row.n, end - row.seq)
            out.append(row if keep == row.n else Row(
                row.seq, keep, b",".join(split_readings(row.body)[:keep]), row.kind))
        return out

    def read_run(self, from_seq: int, *, max_readings: int, max_bytes: int) -> Run | None:
        """What ``read`` returns, as one ``Run`` of bodies (the influx sink's path)."""
        rows = self.read(from_seq, max_readings=max_readings, max_bytes=max_bytes)
        if not rows:
            return None
        return Run(rows[0].kind, [row.body for row in rows], rows[-1].seq + rows[-1].n)

    def close(self) -> None:
        self._conn.close()
