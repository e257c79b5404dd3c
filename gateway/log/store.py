"""The log's writer, ``LogStore``: one transaction per group commit, and what it keeps.

One thread writes (the ingest loop). Sinks read with their own connection (``LogReader``)
and report progress with ``ack``. The work is split by job:

- ``append``: what one commit inserts (readings in grouped rows, events, dead letters);
- ``retention``: the byte cap (``when_full``), expiry, the dead-letter cap;
- ``state``: sink cursors, counters, components' saved state, the snapshot for /metrics.

This module opens the file, runs each transaction (undoing it on a failed write: a full
disk makes the log refuse, anything else is a ``LogError``) and moves the state on after
the commit. An idle log writes nothing.
"""

from __future__ import annotations

import builtins
import logging
import sqlite3
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from gateway.config import LogSection
from gateway.errors import LogError
from gateway.log.append import (
    DLQ_TOPIC_CUT,
    DLQ_TOPIC_MAX,
    Appender,
    AppendResult,
    EventBody,
    Message,
)
from gateway.log.recent import RecentRows
from gateway.log.retention import Retention
from gateway.log.schema import KIND_EVENT, KIND_TELEMETRY, connect
from gateway.log.state import (
    Counters,
    Cursors,
    LogSnapshot,
    load_state,
    readings_total,
    save_states,
)
from gateway.records import Event

# Names other modules import from here.
__all__ = ["DLQ_TOPIC_CUT", "DLQ_TOPIC_MAX", "KIND_EVENT", "KIND_TELEMETRY", "AppendResult",
           "LogSnapshot", "LogStore", "Message", "readings_total"]

log = logging.getLogger(__name__)

# How often expired records are removed and moved cursors are made durable. Each save is a
# page write (flash wear): longer saves writes, a crash then makes sinks resend more.
_HOUSEKEEPING_EVERY = 1.0


class LogStore:
    """Append-only durable log of readings with one cursor per sink."""

    def __init__(self, cfg: LogSection, gateway_id: str, sinks: Sequence[str] = (), *,
                 event_body: EventBody) -> None:
        """``event_body`` renders an event as the body the log keeps and the sinks forward
        (the daemon gives ``gateway.events.render``: CloudEvents JSON; the log knows no
        format of its own)."""
        self._cfg = cfg
        self._path: Path = cfg.path
        self._conn = connect(cfg.path, synchronous=cfg.synchronous.value.upper())
        self._claim(gateway_id)
        row = self._conn.execute("SELECT COALESCE(MAX(seq + n), 1) FROM records").fetchone()
        saved = self._conn.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
        # Sequence numbers never go back, even when every record was delivered and removed:
        # consumers de-duplicate by seq.
        self.next_seq: int = max(row[0], int(saved[0]) if saved else 1)
        # Only configured sinks hold records back; a sink that was removed from the config
        # must not pin the log (its cursor stays in the file, for `gateway log stats`).
        stored = dict(self._conn.execute("SELECT sink, next_seq FROM cursors"))
        for name in sorted(set(stored) - set(sinks)):
            log.warning("Log has a cursor for sink %r, which is not configured; ignoring it",
                        name)
        self._cursors = Cursors({k: v for k, v in stored.items() if k in sinks})
        self._counters = Counters(self._conn)
        self._retention = Retention(cfg, self._conn, self._cursors, self._counters,
                                    lambda: self.next_seq)
        self._append = Appender(cfg, self._conn, self._retention, gateway_id, event_body)
        self._last_housekeeping = -_HOUSEKEEPING_EVERY
        self.snapshot: LogSnapshot = self._snapshot()
        # The rows committed last, for a sink's reader in this thread (gateway.log.recent).
        self.recent = RecentRows()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def full(self) -> bool:
        """True while the log is at its cap and refusing new readings."""
        return self._retention.full

    @property
    def bytes(self) -> int:  # (so in this class the type is spelled builtins.bytes)
        """Bytes the log occupies (used pages of the file); log.max_bytes caps this."""
        return self._retention.bytes

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
        return self._cursors.get(sink, self.oldest_seq)

    def ack(self, sink: str, next_seq: int) -> None:
        """Everything below ``next_seq`` was acknowledged by the sink's destination."""
        if self._cursors.ack(sink, next_seq):
            # Depth gauges see it now, not at the next commit; only the cursors changed.
            old = self.snapshot
            self.snapshot = LogSnapshot(old.next_seq, old.bytes, old.full, old.counters,
                                        self._cursors.copy())

    def cursors(self) -> dict[str, int]:
        return self._cursors.copy()

    @property
    def counters(self) -> Counter[str]:
        """Every counter as of the last commit, "readings" included (derived from seq)."""
        return Counter(self.snapshot.counters)

    def counter_snapshot(self) -> dict[str, int]:
        """The counters as of the last commit (safe from any thread: an immutable copy)."""
        return dict(self.snapshot.counters)

    def oldest_seq(self) -> int:
        row = self._conn.execute("SELECT MIN(seq) FROM records").fetchone()
        return int(row[0]) if row[0] is not None else self.next_seq

    def _snapshot(self) -> LogSnapshot:
        counters = self._counters.as_dict()
        counters["readings"] = readings_total(self.next_seq, counters.get("events", 0))
        return LogSnapshot(self.next_seq, self._retention.bytes, self._retention.full,
                           counters, self._cursors.copy())

    def _publish(self) -> None:
        """Hand the metrics thread a consistent picture (one reference swap, no shared dicts)."""
        self.snapshot = self._snapshot()

    # -- message keys -------------------------------------------------------------------------

    def recent_keys(self, limit: int) -> list[int]:
        """The keys kept with the last site messages logged (about ``limit`` of them, records
        and dead letters alike, 0 left out), oldest first."""
        # Two messages' commits are apart in time, so ordering by time puts them in logging
        # order; within a row, keys are in the order of its messages.
        found: list[tuple[float, int, int, int]] = []   # (time, row order, index, key)
        seen = 0
        before = None
        while seen < limit:
            rows = self._conn.execute(
                "SELECT seq, created, msg_key, keys FROM records WHERE kind = 0 AND seq < ? "
                "ORDER BY seq DESC LIMIT 1000", (self.next_seq if before is None else before,),
            ).fetchall()
            if not rows:
                break
            for seq, created, msg_key, keys in rows:
                packed = array("Q", bytes(keys)) if keys else array("Q", [msg_key])
                found.extend((created, seq, i, k) for i, k in enumerate(packed) if k)
                seen += len(packed)
            before = rows[-1][0]
        found.extend((t, o, 0, k) for t, o, k in self._conn.execute(
            "SELECT ts, id, msg_key FROM dead_letters WHERE msg_key != 0 "
            "ORDER BY id DESC LIMIT ?", (limit,)))
        found.sort()
        return [key for *_, key in found]

    # -- appending ----------------------------------------------------------------------------

    def append(self, messages: Sequence[Message], now: float | None = None) -> AppendResult:
        """Make messages durable in one transaction; returns how many were accepted.

        Under ``when_full: refuse`` a full log accepts only the prefix that fits; the caller
        keeps the rest unacknowledged, so the site broker holds them.
        """
        now = time.time() if now is None else now
        counted: Counter[str] = Counter()
        deletions = self._retention.deletions
        # Moved cursors due to be made durable ride on this commit: housekeeping then has
        # nothing to write and costs no sync of its own.
        save_cursors = time.monotonic() - self._last_housekeeping >= _HOUSEKEEPING_EVERY
        try:
            self._conn.execute("BEGIN")
            done = self._append.messages(messages, self.next_seq, now, counted)
            self._counters.write(self._conn, counted)
            if save_cursors:
                self._cursors.save(self._conn)
            self._conn.execute("COMMIT")
        except sqlite3.Error as err:
            self._write_failed(err)
            return AppendResult(0, 0, 0)
        self._retention.dead_letters_committed(done.result.dead_letters)
        self._counters.committed(counted)
        self.next_seq = done.next_seq
        if counted or done.result.dead_letters or not done.result.readings:
            # Otherwise the cap check measured the file last in this transaction.
            self._retention.bytes = self._retention.used_bytes()
        if not done.refused:
            self._retention.leave_full()
        if self._retention.deletions == deletions:
            self.recent.committed(done.plain, self.next_seq)
        else:
            self.recent.clear()   # records went at the cap: read the file
        self._publish()
        return done.result

    def add_dead_letters(self, entries: Sequence[tuple[str, str, str, builtins.bytes]],
                         now: float | None = None) -> bool:
        """Dead-letter records a sink's destination refused for good, each (topic, reason,
        detail, payload); counted under ``dead_letters.<reason>`` like ingest's. False if
        they could not be written (full disk): the sink keeps them and tries again."""
        if not entries:
            return True
        now = time.time() if now is None else now
        counted: Counter[str] = Counter()
        try:
            self._conn.execute("BEGIN")
            added = self._append.dead_letters(entries, now, counted)
            self._counters.write(self._conn, counted)
            self._conn.execute("COMMIT")
        except sqlite3.Error as err:
            self._write_failed(err)
            return False
        self._retention.dead_letters_committed(added)
        self._counters.committed(counted)
        self._publish()
        return True

    def dead_letter_records(self, first: int, end: int, *, topic: str, reason: str,
                            detail: str, now: float | None = None) -> int | None:
        """Copy the records with seq in [first, end) to the dead-letter table, one row each:
        a sink's destination refused them for good (``gateway log dlq`` shows them). The
        records stay in the log for other sinks; the caller moves its cursor past them.
        Returns the readings they held, or None when the copy could not be written."""
        entries, readings = self._append.refused_records(first, end, topic=topic,
                                                         reason=reason, detail=detail)
        if not self.add_dead_letters(entries, now):
            return None
        return readings

    def save_state(self, name: str, value: builtins.bytes) -> None:
        """Keep a component's state (the rule engine's alert states) with the log, durably.
        On a full disk the previous state stays and the log reports itself full."""
        self.append_events_with_state((), [(name, value)])

    def load_state(self, name: str) -> builtins.bytes | None:
        return load_state(self._conn, name)

    def append_events(self, events: Sequence[Event], now: float | None = None) -> list[int]:
        """Log events (one row each) in one transaction; returns their sequence numbers.

        Events are few and say what happened to the readings, so they are never refused:
        at the cap, room is made as for readings (drop_oldest), or the cap is exceeded by
        them (refuse).
        """
        return self.append_events_with_state(events, (), now)

    def append_events_with_state(self, events: Sequence[Event],
                                 states: Sequence[tuple[str, builtins.bytes]],
                                 now: float | None = None) -> list[int]:
        """Log events and components' states (name, value) in one transaction, so a crash
        cannot keep one without the other (an alert logged as fired but saved as pending
        would fire again, and resend its command)."""
        if not events and not states:
            return []
        now = time.time() if now is None else now
        rows = self._append.event_rows(events, self.next_seq, now)
        counted: Counter[str] = Counter()
        try:
            self._conn.execute("BEGIN")
            self._append.events(rows, counted)
            if states:
                save_states(self._conn, states)
            self._counters.write(self._conn, counted)
            self._conn.execute("COMMIT")
        except sqlite3.Error as err:
            self._write_failed(err)
            if events:
                self._retention.count_drop("disk_full_events", len(events), persist=False)
            if states:
                self._counters.unsaved["state_saves_failed"] += len(states)
            self._publish()
            return []
        seqs = [row[0] for row in rows]
        if seqs:
            self.next_seq = seqs[-1] + 1
            self.recent.clear()   # it holds telemetry only
        self._counters.committed(counted)
        self._retention.bytes = self._retention.used_bytes()
        self._publish()
        return seqs

    # -- failed writes ------------------------------------------------------------------------

    def _write_failed(self, err: sqlite3.Error) -> None:
        """After a failed write: undo it; a full disk makes the log refuse (reported, retried
        later); any other error is raised as LogError."""
        self._rollback()
        self.recent.clear()
        self._retention.recount()
        self._cursors.reload(self._conn)   # and saved again at the next housekeeping
        if not _is_disk_full(err):
            raise LogError(f"Cannot write log file {str(self._path)!r}: {err}") from err
        self._retention.enter_full("disk is full", disk=True)
        self._publish()

    def _rollback(self) -> None:
        try:
            self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            log.debug("Rollback after a failed commit failed too", exc_info=True)

    # -- housekeeping -------------------------------------------------------------------------

    def housekeeping(self, now: float | None = None, *, force: bool = False) -> None:
        """Expire old records and persist moved cursors; cheap to call on every loop turn.

        Scheduled on the monotonic clock (a wall-clock step back must not stop it); expiry
        compares wall-clock times, as records are stamped. Writes nothing when nothing
        changed, so an idle gateway does not wear its SD card.
        """
        mono = time.monotonic()
        if not force and mono - self._last_housekeeping < _HOUSEKEEPING_EVERY:
            return
        self._last_housekeeping = mono
        now = time.time() if now is None else now
        counted: Counter[str] = Counter()
        deletions = self._retention.deletions
        try:
            self._conn.execute("BEGIN")
            retry_full = self._retention.housekeeping(now, mono, counted)
            self._cursors.save(self._conn)
            self._counters.write(self._conn, counted)
            # An empty transaction writes nothing to the file.
            self._conn.execute("COMMIT")
        except sqlite3.Error as err:
            self._write_failed(err)
            return
        if self._retention.deletions != deletions:
            self.recent.clear()
        self._counters.committed(counted)
        self._retention.housekeeping_done(retry_full)
        self._publish()

    def close(self) -> None:
        try:
            self.housekeeping(force=True)
        finally:
            self._conn.close()


def _is_disk_full(err: sqlite3.Error) -> bool:
    return getattr(err, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "full" in str(err)
