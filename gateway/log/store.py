"""The log's writer: group-committed appends, dead letters, sink cursors, caps and retention.

One thread writes (the ingest loop). Sinks read with their own connection (``LogReader``)
and report progress with ``ack``, which only touches memory under a lock; the writer makes
cursors durable with its next commit. A crash can therefore make a sink resend a little:
delivery is at-least-once and every reading carries its ``seq`` for de-duplication.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import zlib
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from gateway.config import LogSection, WhenFull
from gateway.errors import LogError
from gateway.events import Event, render
from gateway.ingest.decode import DeadLetter, Reading
from gateway.log.schema import ROW_OVERHEAD, connect

log = logging.getLogger(__name__)

KIND_TELEMETRY = 0
KIND_EVENT = 1

# When the cap is hit, trim to this fraction of it so that trimming is not paid on every
# following commit; a lower value frees more at once but throws away more history.
_TRIM_TO = 0.9
# How often expired records are removed and cursors/counters are made durable when idle.
_HOUSEKEEPING_EVERY = 1.0
# After the disk filled up, wait this long before trying to write again.
_DISK_FULL_RETRY = 10.0
# Message keys remembered for spotting site redeliveries; must exceed the messages a broker
# can have unacknowledged in one session (site.receive_maximum, at most 65535).
_TAIL_KEYS = 65_536
# A drop episode (logged once at its start and once at its end) ends after this long without
# a drop; shorter logs more lines during a long outage, longer reports the end later.
_DROP_EPISODE_QUIET = 60.0


@dataclass(slots=True)
class Message:
    """One site message on its way into the log."""

    topic: str
    payload: bytes
    key: int            # crc32 of topic + payload
    outcome: list[Reading] | DeadLetter
    received: float


@dataclass(frozen=True, slots=True)
class AppendResult:
    accepted: int       # messages made durable (a prefix of those offered)
    readings: int       # readings among them
    dead_letters: int


def message_key(topic: str, payload: bytes, mid: int) -> int:
    """Identifies a site message for redelivery checks: a broker redelivers with the same
    packet id (MQTT 4.4), so the id plus a checksum of topic and payload tells a redelivery
    from a new message that merely carries the same value."""
    return (mid << 32) | zlib.crc32(payload, zlib.crc32(topic.encode()))


class LogStore:
    """Append-only durable log of readings with one cursor per sink."""

    def __init__(self, cfg: LogSection, gateway_id: str, sinks: Sequence[str] = ()) -> None:
        self._cfg = cfg
        self._path: Path = cfg.path
        self._conn = connect(cfg.path, synchronous=cfg.synchronous.value.upper())
        self._claim(gateway_id)
        self._gateway_id = gateway_id
        self._lock = threading.Lock()
        row = self._conn.execute(
            "SELECT COALESCE(MAX(seq + n), 1), COALESCE(SUM(length(body)), 0), count(*) "
            "FROM records"
        ).fetchone()
        saved = self._conn.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
        # Sequence numbers never go back, even when every record was delivered and removed:
        # consumers de-duplicate by seq.
        self.next_seq: int = max(row[0], int(saved[0]) if saved else 1)
        self.bytes: int = row[1] + row[2] * ROW_OVERHEAD
        # Only configured sinks hold records back; a sink that was removed from the config
        # must not pin the log (its cursor stays in the file, for `gateway log stats`).
        stored = dict(self._conn.execute("SELECT sink, next_seq FROM cursors"))
        for name in sorted(set(stored) - set(sinks)):
            log.warning("Log has a cursor for sink %r, which is not configured; ignoring it",
                        name)
        self._cursors: dict[str, int] = {k: v for k, v in stored.items() if k in sinks}
        self._cursors_dirty = False
        self.counters: Counter[str] = Counter(
            dict(self._conn.execute("SELECT name, value FROM counters"))
        )
        self._counters_saved = Counter(self.counters)
        self._full = False
        self._disk_retry_at = 0.0
        self._drop_episodes: dict[str, list[float]] = {}  # reason -> [readings, last drop]
        self._recent_keys: Counter[int] = Counter()
        # Keys of the last messages appended, newest last; seeded from the file so that a
        # restart recognises redeliveries too. Kept in memory because delivered rows may be
        # removed (at the cap) before the site broker redelivers their messages.
        self._tail: deque[int] = deque(
            (k for (k,) in self._conn.execute(
                "SELECT msg_key FROM (SELECT seq, msg_key FROM records ORDER BY seq DESC "
                "LIMIT ?) ORDER BY seq", (_TAIL_KEYS,))),
            maxlen=_TAIL_KEYS,
        )
        self._last_housekeeping = 0.0
        self._dlq_count: int = self._conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]

    @property
    def path(self) -> Path:
        return self._path

    @property
    def full(self) -> bool:
        """True while the log is at its cap and refusing new readings."""
        return self._full

    def _claim(self, gateway_id: str) -> None:
        row = self._conn.execute("SELECT value FROM meta WHERE key='gateway_id'").fetchone()
        if row is None:
            self._conn.execute("INSERT INTO meta VALUES ('gateway_id', ?)", (gateway_id,))
        elif row[0] != gateway_id:
            raise LogError(
                f"Log file {str(self._path)!r} belongs to gateway {row[0]!r}, not "
                f"{gateway_id!r}; point log.path elsewhere or fix gateway_id"
            )

    # -- sinks ------------------------------------------------------------------------------

    def cursor(self, sink: str) -> int:
        """The next seq the sink has not had acknowledged; new sinks start at the log's tail."""
        with self._lock:
            if sink not in self._cursors:
                self._cursors[sink] = self.oldest_seq()
                self._cursors_dirty = True
            return self._cursors[sink]

    def ack(self, sink: str, next_seq: int) -> None:
        """Everything below ``next_seq`` was acknowledged by the sink's destination."""
        with self._lock:
            if next_seq > self._cursors.get(sink, 0):
                self._cursors[sink] = next_seq
                self._cursors_dirty = True

    def cursors(self) -> dict[str, int]:
        with self._lock:
            return dict(self._cursors)

    def counter_snapshot(self) -> dict[str, int]:
        """A copy of the persisted counters, safe to take from another thread."""
        for _ in range(10):
            try:
                return dict(self.counters)
            except RuntimeError:  # the writer added a key while we copied; try again
                continue
        return {}

    def oldest_seq(self) -> int:
        row = self._conn.execute("SELECT MIN(seq) FROM records").fetchone()
        return int(row[0]) if row[0] is not None else self.next_seq

    def _delivered_below(self) -> int:
        with self._lock:
            return min(self._cursors.values(), default=self.next_seq)

    # -- redeliveries -------------------------------------------------------------------------

    def remember_tail(self, rows: int) -> None:
        """Take the keys of the last ``rows`` messages, to recognise site redeliveries.

        Called on every (re)connect to the site broker: the broker redelivers (DUP flag)
        messages it sent in the last session and had no PUBACK for; those are among the last
        ones we appended (at most receive_maximum of them, when the broker holds to it).
        """
        tail = list(self._tail)[-rows:]
        self._recent_keys = Counter(tail)

    def is_redelivery(self, key: int) -> bool:
        if self._recent_keys[key] > 0:
            self._recent_keys[key] -= 1
            return True
        return False

    # -- appending ----------------------------------------------------------------------------

    def append(self, messages: Sequence[Message], now: float | None = None) -> AppendResult:
        """Make messages durable in one transaction; returns how many were accepted.

        Under ``when_full: refuse`` a full log accepts only the prefix that fits; the caller
        keeps the rest unacknowledged, so the site broker holds them.
        """
        now = time.time() if now is None else now
        rows: list[tuple[int, int, int, float, int, bytes]] = []
        dead: list[tuple[float, str, str, str, int, bytes]] = []
        seq = self.next_seq
        added = 0
        readings = 0
        accepted = 0
        refused = False
        limit = self._cfg.max_bytes
        dlq_cap = self._cfg.dlq_max_payload
        conn = self._conn
        try:
            # Room is made inside the transaction: the rows dropped at the cap and the rows
            # that replace them are committed together, or neither is.
            conn.execute("BEGIN")
            for msg in messages:
                outcome = msg.outcome
                if isinstance(outcome, DeadLetter):
                    dead.append((msg.received, msg.topic, outcome.reason.value,
                                 outcome.detail, len(msg.payload), msg.payload[:dlq_cap]))
                    accepted += 1
                    continue
                body = b",".join(
                    [orjson.dumps({"seq": seq + i, "device": dev, "ts": ts, **metrics})
                     for i, (dev, ts, metrics) in enumerate(outcome)]
                )
                size = len(body) + ROW_OVERHEAD
                if self.bytes + added + size > limit and not self._make_room(added + size):
                    refused = True
                    break
                rows.append((seq, len(outcome), KIND_TELEMETRY, now, msg.key, body))
                seq += len(outcome)
                readings += len(outcome)
                added += size
                accepted += 1
            if rows:
                conn.executemany("INSERT INTO records VALUES (?,?,?,?,?,?)", rows)
            if dead:
                conn.executemany(
                    "INSERT INTO dead_letters (ts, topic, reason, detail, size, payload) "
                    "VALUES (?,?,?,?,?,?)", dead,
                )
                if self._dlq_count + len(dead) > self._cfg.dlq_max_rows:
                    self._trim_dead_letters(self._dlq_count + len(dead))
            conn.execute("COMMIT")
        except sqlite3.Error as err:
            self._write_failed(err)
            return AppendResult(0, 0, 0)
        self._dlq_count = min(self._dlq_count + len(dead), self._cfg.dlq_max_rows)
        for entry in dead:
            self.counters[f"dead_letters.{entry[2]}"] += 1
        self.counters["readings"] += readings
        self.next_seq = seq
        self.bytes += added
        self._tail.extend(msg.key for msg in messages[:accepted])
        if not refused:
            self._leave_full()
        return AppendResult(accepted, readings, len(dead))

    def add_dead_letters(self, entries: Sequence[tuple[str, str, str, bytes]],
                         now: float | None = None) -> bool:
        """Dead-letter records a sink's destination refused for good, each (topic, reason,
        detail, payload); counted under ``dead_letters.<reason>`` like ingest's. False if
        they could not be written (full disk): the sink keeps them and tries again."""
        if not entries:
            return True
        now = time.time() if now is None else now
        cap = self._cfg.dlq_max_payload
        rows = [(now, topic, reason, detail, len(payload), payload[:cap])
                for topic, reason, detail, payload in entries]
        try:
            self._conn.execute("BEGIN")
            self._conn.executemany(
                "INSERT INTO dead_letters (ts, topic, reason, detail, size, payload) "
                "VALUES (?,?,?,?,?,?)", rows,
            )
            if self._dlq_count + len(rows) > self._cfg.dlq_max_rows:
                self._trim_dead_letters(self._dlq_count + len(rows))
            self._conn.execute("COMMIT")
        except sqlite3.Error as err:
            self._write_failed(err)
            return False
        self._dlq_count = min(self._dlq_count + len(rows), self._cfg.dlq_max_rows)
        for row in rows:
            self.counters[f"dead_letters.{row[2]}"] += 1
        return True

    def save_state(self, name: str, value: bytes) -> None:
        """Keep a component's state (the rule engine's alert states) with the log, durably.
        On a full disk the previous state stays and the log reports itself full."""
        try:
            self._conn.execute("INSERT OR REPLACE INTO state VALUES (?, ?)", (name, value))
        except sqlite3.Error as err:
            self._write_failed(err)
            self.counters["state_saves_failed"] += 1

    def load_state(self, name: str) -> bytes | None:
        row = self._conn.execute("SELECT value FROM state WHERE name = ?", (name,)).fetchone()
        return None if row is None else bytes(row[0])

    def append_events(self, events: Sequence[Event], now: float | None = None) -> list[int]:
        """Log events (one row each) in one transaction; returns their sequence numbers.

        Events are few and say what happened to the readings, so they are never refused:
        at the cap, room is made as for readings (drop_oldest), or the cap is exceeded by
        them (refuse).
        """
        if not events:
            return []
        now = time.time() if now is None else now
        seqs = list(range(self.next_seq, self.next_seq + len(events)))
        rows = [(seq, 1, KIND_EVENT, now, 0, render(event, self._gateway_id, seq))
                for seq, event in zip(seqs, events, strict=True)]
        added = sum(len(r[5]) + ROW_OVERHEAD for r in rows)
        try:
            self._conn.execute("BEGIN")
            if self.bytes + added > self._cfg.max_bytes \
                    and self._cfg.when_full is WhenFull.DROP_OLDEST:
                self._make_room(added)
            self._conn.executemany("INSERT INTO records VALUES (?,?,?,?,?,?)", rows)
            self._conn.execute("COMMIT")
        except sqlite3.Error as err:
            self._write_failed(err)
            self._count_drop("disk_full_events", len(events))
            return []
        self.next_seq = seqs[-1] + 1
        self.bytes += added
        self.counters["events"] += len(events)
        return seqs

    def _make_room(self, incoming: int) -> bool:
        """Trim so that ``incoming`` more bytes fit; False when the policy says refuse."""
        target = int(self._cfg.max_bytes * _TRIM_TO) - incoming
        self._delete_oldest(target, below=self._delivered_below(), reason=None)
        if self.bytes <= target or self.bytes + incoming <= self._cfg.max_bytes:
            return True
        if self._cfg.when_full is WhenFull.REFUSE:
            self._enter_full(f"log.max_bytes {self._cfg.max_bytes} reached")
            return False
        self._delete_oldest(target, below=None, reason="cap")
        return True

    def _delete_oldest(self, target: int, below: int | None, reason: str | None) -> None:
        """Delete the oldest rows until ``bytes <= target`` (only rows with seq < below)."""
        while self.bytes > target:
            rows = self._conn.execute(
                "SELECT seq, n, length(body) FROM records ORDER BY seq LIMIT 1000"
            ).fetchall()
            last = None
            freed = 0
            dropped = 0
            for seq, n, size in rows:
                if below is not None and seq + n > below:
                    break
                last = seq
                freed += size + ROW_OVERHEAD
                dropped += n
                if self.bytes - freed <= target:
                    break
            if last is None:
                return
            self._delete_through(last, freed)
            if reason is not None:
                self._count_drop(reason, dropped)

    def _delete_through(self, last: int, freed: int) -> None:
        """Delete records with seq <= last (inside the caller's transaction)."""
        # Sequence numbers must survive the rows that carried them.
        self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('next_seq', ?)",
                           (str(self.next_seq),))
        self._conn.execute("DELETE FROM records WHERE seq <= ?", (last,))
        self.bytes -= freed

    def _count_drop(self, reason: str, readings: int) -> None:
        if readings <= 0:
            return
        if reason not in self._drop_episodes:
            log.warning("Log dropping undelivered readings (%s, when_full: %s); see "
                        "`gateway log stats`", reason, self._cfg.when_full.value)
        episode = self._drop_episodes.setdefault(reason, [0, 0.0])
        episode[0] += readings
        episode[1] = time.monotonic()
        self.counters[f"dropped.{reason}"] += readings

    def _end_drop_episodes(self) -> None:
        now = time.monotonic()
        for reason, (count, last) in list(self._drop_episodes.items()):
            if now - last >= _DROP_EPISODE_QUIET:
                log.warning("Log stopped dropping (%s): %d undelivered readings dropped",
                            reason, count)
                del self._drop_episodes[reason]

    def _enter_full(self, why: str, *, disk: bool = False) -> None:
        if disk:
            self._disk_retry_at = time.monotonic() + _DISK_FULL_RETRY
        if not self._full:
            log.warning("Log full (%s): refusing new readings until %s", why,
                        "space is freed" if disk else "sinks catch up")
            self._full = True
            self.counters["full_episodes"] += 1

    def _leave_full(self) -> None:
        if self._full:
            log.info("Log accepting readings again")
            self._full = False

    def _trim_dead_letters(self, count: int) -> None:
        excess = count - self._cfg.dlq_max_rows
        self._conn.execute(
            "DELETE FROM dead_letters WHERE id IN "
            "(SELECT id FROM dead_letters ORDER BY id LIMIT ?)", (excess,)
        )
        self.counters["dead_letters_evicted"] += excess

    def _recount(self) -> None:
        """Re-read sizes after a rolled-back transaction (trimming may have been undone)."""
        body, rows = self._conn.execute(
            "SELECT COALESCE(SUM(length(body)), 0), count(*) FROM records").fetchone()
        self.bytes = body + rows * ROW_OVERHEAD
        self._dlq_count = self._conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]

    def _save_state(self) -> None:
        """Write next_seq, cursors and changed counters; called inside a transaction.

        Once a second (housekeeping), not per commit: each of these rows sits on its own
        page, and writing them with every group commit tripled the bytes written and
        fsynced. A crash can lose up to a second of counter increments and cursor progress
        (the sink then resends; consumers de-duplicate by seq), never a reading.
        """
        self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('next_seq', ?)",
                           (str(self.next_seq),))
        with self._lock:
            if self._cursors_dirty:
                self._conn.executemany(
                    "INSERT OR REPLACE INTO cursors VALUES (?, ?)", self._cursors.items()
                )
                self._cursors_dirty = False
        changed = [(k, v) for k, v in self.counters.items() if self._counters_saved[k] != v]
        if changed:
            self._conn.executemany("INSERT OR REPLACE INTO counters VALUES (?, ?)", changed)
            for k, v in changed:
                self._counters_saved[k] = v

    def _write_failed(self, err: sqlite3.Error) -> None:
        """After a failed write: undo it; a full disk makes the log refuse (reported, retried
        later); any other error is raised as LogError."""
        self._rollback()
        self._recount()
        if not _is_disk_full(err):
            raise LogError(f"Cannot write log file {str(self._path)!r}: {err}") from err
        self._enter_full("disk is full", disk=True)

    def _rollback(self) -> None:
        try:
            self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            log.debug("Rollback after a failed commit failed too", exc_info=True)

    # -- housekeeping -------------------------------------------------------------------------

    def housekeeping(self, now: float | None = None, *, force: bool = False) -> None:
        """Expire old records and persist cursors; cheap to call on every loop turn."""
        now = time.time() if now is None else now
        if not force and now - self._last_housekeeping < _HOUSEKEEPING_EVERY:
            return
        self._last_housekeeping = now
        try:
            self._conn.execute("BEGIN")
            self._expire(now - self._cfg.max_age)
            if self._full and time.monotonic() >= self._disk_retry_at:
                # Sinks may have caught up: delivered records make room for new ones.
                target = int(self._cfg.max_bytes * _TRIM_TO)
                self._delete_oldest(target, below=self._delivered_below(), reason=None)
            self._save_state()
            self._conn.execute("COMMIT")
        except sqlite3.Error as err:
            self._write_failed(err)
            return
        if (self._full and time.monotonic() >= self._disk_retry_at
                and self.bytes <= int(self._cfg.max_bytes * _TRIM_TO)):
            self._leave_full()
        if self._drop_episodes:
            self._end_drop_episodes()

    def _expire(self, cutoff: float) -> None:
        """Remove records appended before ``cutoff``, oldest first, in seq order.

        Walks the primary key from the oldest row and stops at the first younger one, so
        this costs nothing when nothing expired (no scan of the table every second). After
        a clock step back, rows behind a younger one wait for it: nothing is lost early.
        """
        delivered = self._delivered_below()
        while True:
            rows = self._conn.execute(
                "SELECT seq, n, length(body), created FROM records ORDER BY seq LIMIT 1000"
            ).fetchall()
            last = None
            freed = 0
            undelivered = 0
            for seq, n, size, created in rows:
                if created >= cutoff:
                    break
                last = seq
                freed += size + ROW_OVERHEAD
                if seq + n > delivered:
                    undelivered += n
            if last is None:
                return
            self._delete_through(last, freed)
            self._count_drop("age", undelivered)
            if last != rows[-1][0] or len(rows) < 1000:
                return

    def close(self) -> None:
        try:
            self.housekeeping(force=True)
        finally:
            self._conn.close()


def _is_disk_full(err: sqlite3.Error) -> bool:
    return getattr(err, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "full" in str(err)
