"""The worker's local state (SQLite, WAL): per gateway the seq high-water mark, the written
ranges above it, the one open gap (its resend request), and the dead-letter table.

The high-water mark of a gateway is the highest seq such that every seq up to it was
written to InfluxDB or reported lost. Ranges written above it (out of order: other
workers of the group hold the messages in between, or a redelivery is on its way) are kept
as rows until the hole below them closes. A hole whose range above has waited
``gap_wait`` is a gap: its seqs are asked for again (``fieldgate/<id>/resend``), one
request per gateway at a time, at most ``RESEND_MAX`` seqs each.

The workers of a group on one host share the file: every change is one ``BEGIN IMMEDIATE``
transaction, so two workers never ask for the same gap. (Workers on several hosts each
keep their own file and see only their share of each gateway's seqs: there, turn gap
repair off with a long ``gap_wait``, or give them one shared volume.)

A gateway's tracking starts at the first seq any worker wrote for it: what came before
(the gateway ran before the workers did) is not asked for.
"""

from __future__ import annotations

import sqlite3
import uuid
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from gateway.errors import FieldgateError

# The contract's bound on one resend request (ISSUE12.md): a larger hole is asked for in
# pieces, one after the other.
RESEND_MAX = 1_000_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS marks (
    gateway TEXT PRIMARY KEY, hwm INTEGER NOT NULL, lost INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS covered (
    gateway TEXT NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS covered_by_gateway ON covered (gateway, first);
CREATE TABLE IF NOT EXISTS gaps (
    gateway TEXT PRIMARY KEY, first INTEGER NOT NULL, last INTEGER NOT NULL,
    request_id TEXT NOT NULL, asked_at REAL NOT NULL, attempts INTEGER NOT NULL,
    answered INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY, at REAL NOT NULL, topic TEXT NOT NULL, reason TEXT NOT NULL,
    detail TEXT NOT NULL, payload BLOB NOT NULL);
"""
# Bytes of a dead letter's payload kept (the rest is cut; the reason says why it was bad).
_DLQ_PAYLOAD_MAX = 64 * 1024


class GapNews(StrEnum):
    DETECTED = "detected"   # a hole waited gap_wait: asked for
    LOST = "lost"           # the gateway no longer has these seqs, or never answered
    REPAIRED = "repaired"   # the hole closed (resent data written)


@dataclass(frozen=True, slots=True)
class GapReport:
    news: GapNews
    gateway: str
    first: int
    last: int
    count: int              # seqs lost (LOST), in the hole (DETECTED), or re-sent (REPAIRED)


@dataclass(frozen=True, slots=True)
class Request:
    """A resend request to publish: ``fieldgate/<gateway>/resend``."""

    gateway: str
    first: int
    last: int
    request_id: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    at: float
    topic: str
    reason: str
    detail: str
    payload: bytes


def _merge(ranges: list[tuple[int, int, float]]) -> list[tuple[int, int, float]]:
    """Overlapping or adjacent ranges joined; each keeps the earliest write time."""
    out: list[tuple[int, int, float]] = []
    for first, last, at in sorted(ranges):
        if out and first <= out[-1][1] + 1:
            a, b, t = out[-1]
            out[-1] = (a, max(b, last), min(t, at))
        else:
            out.append((first, last, at))
    return out


class IngestState:
    def __init__(self, path: Path, *, dlq_max_rows: int = 100_000) -> None:
        self.path = path
        self._dlq_max = dlq_max_rows
        try:
            self._db = sqlite3.connect(path, timeout=30, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as err:
            raise FieldgateError(f"State file {str(path)!r} is unusable ({err}); move it "
                                 "aside to start afresh (gaps are then tracked from the next "
                                 "seq each gateway sends)") from None

    def close(self) -> None:
        self._db.close()

    # -- seqs ---------------------------------------------------------------------------------

    def record(self, written: dict[str, list[tuple[int, int]]], now: float) -> list[GapReport]:
        """Ranges of seqs now in InfluxDB, per gateway; the gaps this closed."""
        reports: list[GapReport] = []
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for gateway, ranges in written.items():
                reports += self._add(gateway, [(a, b, now) for a, b in ranges])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return reports

    def _add(self, gateway: str, ranges: list[tuple[int, int, float]]) -> list[GapReport]:
        db = self._db
        row = db.execute("SELECT hwm FROM marks WHERE gateway = ?", (gateway,)).fetchone()
        if row is None:
            hwm = min(first for first, _, _ in ranges) - 1
            db.execute("INSERT INTO marks (gateway, hwm) VALUES (?, ?)", (gateway, hwm))
        else:
            hwm = int(row[0])
        fresh = [(max(a, hwm + 1), b, t) for a, b, t in ranges if b > hwm]
        if not fresh:
            return []
        held = db.execute("SELECT first, last, at FROM covered WHERE gateway = ?",
                          (gateway,)).fetchall()
        merged = _merge([*held, *fresh])
        start = hwm
        while merged and merged[0][0] <= hwm + 1:
            hwm = max(hwm, merged.pop(0)[1])
        db.execute("DELETE FROM covered WHERE gateway = ?", (gateway,))
        db.executemany("INSERT INTO covered (gateway, first, last, at) VALUES (?, ?, ?, ?)",
                       [(gateway, a, b, t) for a, b, t in merged])
        if hwm == start:
            return []
        db.execute("UPDATE marks SET hwm = ? WHERE gateway = ?", (hwm, gateway))
        gap = db.execute("SELECT first, last FROM gaps WHERE gateway = ?", (gateway,)).fetchone()
        if gap is not None and hwm >= gap[1]:
            db.execute("DELETE FROM gaps WHERE gateway = ?", (gateway,))
            return [GapReport(GapNews.REPAIRED, gateway, gap[0], gap[1], gap[1] - gap[0] + 1)]
        return []

    def _lose(self, gateway: str, first: int, last: int, now: float) -> GapReport:
        self._add(gateway, [(first, last, now)])
        self._db.execute("UPDATE marks SET lost = lost + ? WHERE gateway = ?",
                         (last - first + 1, gateway))
        return GapReport(GapNews.LOST, gateway, first, last, last - first + 1)

    def due(self, now: float, *, gap_wait: float, resend_timeout: float,
            attempts: int) -> tuple[list[Request], list[GapReport]]:
        """Resend requests to publish now, and what changed: holes that waited
        ``gap_wait`` are asked for; a request unanswered (or whose data did not come)
        after ``resend_timeout`` is asked again, ``attempts`` times in all, then lost."""
        db = self._db
        requests: list[Request] = []
        reports: list[GapReport] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for gateway, first, last, tries in db.execute(
                    "SELECT gateway, first, last, attempts FROM gaps WHERE asked_at <= ?",
                    (now - resend_timeout,)).fetchall():
                if tries >= attempts:
                    db.execute("DELETE FROM gaps WHERE gateway = ?", (gateway,))
                    hwm = self._hwm(gateway)
                    if last > hwm:
                        reports.append(self._lose(gateway, max(first, hwm + 1), last, now))
                    continue
                request = Request(gateway, first, last, uuid.uuid4().hex)
                db.execute("UPDATE gaps SET request_id = ?, asked_at = ?, attempts = ? "
                           "WHERE gateway = ?", (request.request_id, now, tries + 1, gateway))
                requests.append(request)
            for gateway, hole_end, hwm in db.execute(
                    "SELECT c.gateway, min(c.first) - 1, m.hwm FROM covered c "
                    "JOIN marks m ON m.gateway = c.gateway "
                    "WHERE c.gateway NOT IN (SELECT gateway FROM gaps) "
                    "GROUP BY c.gateway HAVING min(c.at) <= ?", (now - gap_wait,)).fetchall():
                first, last = hwm + 1, min(hole_end, hwm + RESEND_MAX)
                request = Request(gateway, first, last, uuid.uuid4().hex)
                db.execute("INSERT INTO gaps (gateway, first, last, request_id, asked_at, "
                           "attempts) VALUES (?, ?, ?, ?, ?, 1)",
                           (gateway, first, last, request.request_id, now))
                requests.append(request)
                reports.append(GapReport(GapNews.DETECTED, gateway, first, hole_end,
                                         hole_end - first + 1))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return requests, reports

    def answer(self, gateway: str, request_id: str, *, missing: list[tuple[int, int]],
               error: str | None, now: float) -> list[GapReport]:
        """The gateway's reply to a resend request: the seqs it no longer has are lost; an
        error other than "busy" loses the whole range (busy: asked again after the
        timeout). A reply to a request we no longer wait for changes nothing."""
        db = self._db
        reports: list[GapReport] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            gap = db.execute("SELECT first, last FROM gaps WHERE gateway = ? AND "
                             "request_id = ?", (gateway, request_id)).fetchone()
            if gap is not None and error != "busy":
                first, last = int(gap[0]), int(gap[1])
                gone = [(first, last)] if error is not None else [
                    (max(a, first), min(b, last)) for a, b in missing
                    if a <= last and b >= first]
                db.execute("UPDATE gaps SET answered = 1 WHERE gateway = ?", (gateway,))
                for a, b in gone:
                    hwm = self._hwm(gateway)
                    if b > hwm:
                        reports.append(self._lose(gateway, max(a, hwm + 1), b, now))
                if self._hwm(gateway) >= last:
                    db.execute("DELETE FROM gaps WHERE gateway = ?", (gateway,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return reports

    def _hwm(self, gateway: str) -> int:
        row = self._db.execute("SELECT hwm FROM marks WHERE gateway = ?", (gateway,)).fetchone()
        return int(row[0]) if row is not None else 0

    def high_water(self, gateway: str) -> int | None:
        row = self._db.execute("SELECT hwm FROM marks WHERE gateway = ?", (gateway,)).fetchone()
        return int(row[0]) if row is not None else None

    def marks(self) -> dict[str, tuple[int, int]]:
        """gateway -> (high-water mark, seqs reported lost)."""
        return {gw: (int(h), int(lost)) for gw, h, lost in
                self._db.execute("SELECT gateway, hwm, lost FROM marks ORDER BY gateway")}

    # -- dead letters -------------------------------------------------------------------------

    def dead_letter(self, topic: str, reason: str, detail: str, payload: bytes,
                    now: float) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            cur = db.execute("INSERT INTO dead_letters (at, topic, reason, detail, payload) "
                             "VALUES (?, ?, ?, ?, ?)",
                             (now, topic, reason, detail[:1000], payload[:_DLQ_PAYLOAD_MAX]))
            newest = cur.lastrowid or 0
            db.execute("DELETE FROM dead_letters WHERE id <= ?", (newest - self._dlq_max,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def dead_letters(self, limit: int = 50) -> list[DeadLetter]:
        rows = self._db.execute("SELECT id, at, topic, reason, detail, payload FROM "
                                "dead_letters ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [DeadLetter(int(i), float(at), t, r, d, bytes(p)) for i, at, t, r, d, p in rows]

    def dead_letter_counts(self) -> dict[str, int]:
        return {r: int(n) for r, n in self._db.execute(
            "SELECT reason, count(*) FROM dead_letters GROUP BY reason")}
