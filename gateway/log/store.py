"""The log's writer: group-committed appends, dead letters, sink cursors, caps and retention.

One thread writes (the ingest loop). Sinks read with their own connection (``LogReader``)
and report progress with ``ack``, which only touches memory under a lock; the writer makes
cursors durable at most once a second. A crash can therefore make a sink resend a little:
delivery is at-least-once and every reading carries its ``seq`` for de-duplication.

Counters are committed in the transaction that changes the data they count (a dead letter
and its counter, a trim and its drop counter), and the number of readings ever logged is
derived from the sequence numbers, so no crash can make them disagree with the data. An
idle log writes nothing.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import zlib
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from gateway.config import LogSection, WhenFull
from gateway.errors import LogError
from gateway.events import render
from gateway.log.reader import LogReader
from gateway.log.schema import CODEC_RAW, CODEC_ZLIB, ROW_OVERHEAD, connect
from gateway.records import DeadLetter, Event, Reading

log = logging.getLogger(__name__)

KIND_TELEMETRY = 0
KIND_EVENT = 1

# When the cap is hit, trim to this fraction of it so that trimming is not paid on every
# following commit; a lower value frees more at once but throws away more history.
_TRIM_TO = 0.9
# How often expired records are removed and moved cursors are made durable. Each save is a
# page write (flash wear): longer saves writes, a crash then makes sinks resend more.
_HOUSEKEEPING_EVERY = 1.0
# A group commit's readings go into rows of at most this many readings and bytes (before
# compression). Larger rows compress better and cost fewer B-tree pages per commit (flash
# wear); a sink that reads part of a row decompresses all of it.
_GROUP_READINGS = 2048
_GROUP_BYTES = 256 * 1024
# zlib level: 1 is ~4x smaller on telemetry JSON at ~1 us per reading; higher levels gain
# little on such short, similar objects and cost several times the CPU.
_ZLIB_LEVEL = 1
# Bytes a message's key adds to its row (array of uint64).
_KEY_BYTES = 8
# Within this many bytes of the cap, appends measure the file instead of estimating: the
# file can outgrow the cap by about this much; smaller measures more often.
_NEAR_CAP = 32 * 1024
# After the disk filled up, wait this long before trying to write again.
_DISK_FULL_RETRY = 10.0
# Site messages whose keys are read back at start-up to recognise redeliveries: every packet
# id (1..65535) that can be in flight, with room for the ones reused since.
_TAIL_KEYS = 131_072
# A redelivery was logged at most this many site messages before the crash: what was
# committed but whose PUBACK did not reach the broker (the last commits' worth; bounded by
# the site session's in-flight messages, at most 65,535). Half the packet-id space: an
# id's previous use under Mosquitto's turn-by-turn ids is a whole cycle (65,535) back.
_REDELIVERY_WINDOW = 32_768
# A drop episode (logged once at its start and once at its end) ends after this long without
# a drop; shorter logs more lines during a long outage, longer reports the end later.
_DROP_EPISODE_QUIET = 60.0
# Longest topic kept with a dead letter, in UTF-8 bytes. MQTT allows 64 KiB; the topic is
# the operator's clue to where a message came from, and 1 KiB of it is plenty, where 64 KiB
# a row would let a misbehaving publisher fill the dead-letter table 64 times faster.
DLQ_TOPIC_MAX = 1024
# Said in the detail of a dead letter whose topic was cut (`gateway log replay` skips it).
DLQ_TOPIC_CUT = "topic truncated to 1 KiB"


@dataclass(slots=True)
class Message:
    """One site message on its way into the log."""

    topic: str
    payload: bytes
    key: int            # crc32 of topic + payload
    outcome: list[Reading] | DeadLetter
    received: float


_INSERT = ("INSERT INTO records (seq, n, kind, created, msg_key, body, codec, keys) "
           "VALUES (?,?,?,?,?,?,?,?)")


class _Group:
    """The site messages of one commit that go into one row."""

    __slots__ = ("bodies", "keys", "n", "raw", "seq")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.n = 0
        self.raw = 0
        self.bodies: list[bytes] = []
        self.keys = array("Q")

    def add(self, body: bytes, n: int, key: int) -> None:
        self.bodies.append(body)
        self.n += n
        self.raw += len(body) + 1
        self.keys.append(key)


@dataclass(frozen=True, slots=True)
class LogSnapshot:
    """The log as of its last commit, for threads other than the writer (/metrics)."""

    next_seq: int
    bytes: int
    full: bool
    counters: dict[str, int]   # persisted counters, plus "readings" (derived from seq)
    cursors: dict[str, int]    # sink -> next seq it has not delivered

    def depth(self, sink: str) -> int:
        """Records (readings and events) the sink has still to deliver."""
        return max(0, self.next_seq - self.cursors.get(sink, self.next_seq))


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


def readings_total(next_seq: int, events: int) -> int:
    """Readings ever logged: every reading and every event took one sequence number."""
    return max(0, next_seq - 1 - events)


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
        # Bytes the log occupies (used pages of the file); the cap is held against this.
        self.bytes: int = row[1] + row[2] * ROW_OVERHEAD
        # Only configured sinks hold records back; a sink that was removed from the config
        # must not pin the log (its cursor stays in the file, for `gateway log stats`).
        stored = dict(self._conn.execute("SELECT sink, next_seq FROM cursors"))
        for name in sorted(set(stored) - set(sinks)):
            log.warning("Log has a cursor for sink %r, which is not configured; ignoring it",
                        name)
        self._cursors: dict[str, int] = {k: v for k, v in stored.items() if k in sinks}
        self._cursors_dirty = False
        self._counters: Counter[str] = Counter(
            dict(self._conn.execute("SELECT name, value FROM counters"))
        )
        # Older logs kept a running count of readings; it is derived from seq now.
        self._counters.pop("readings", None)
        self._unsaved: Counter[str] = Counter()  # counted while nothing could be written
        self._ratio = 0.35   # compressed / raw body bytes, learnt from each group
        self._full = False
        self._disk_retry_at = 0.0
        self._drop_episodes: dict[str, list[float]] = {}  # reason -> [readings, last drop]
        # For each packet id, the checksum of the last site message logged under it (records
        # and dead letters alike); seeded from the file so a restart recognises redeliveries.
        # Each with its place in logging order (self._logged counts site messages logged).
        self._logged = 0
        self._last_by_mid: dict[int, tuple[int, int]] = self._read_packet_ids()
        self._last_housekeeping = -_HOUSEKEEPING_EVERY
        self._dlq_count: int = self._conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
        self.bytes = self._used_bytes()
        self.snapshot: LogSnapshot = self._snapshot()

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
            moved = next_seq > self._cursors.get(sink, 0)
            if moved:
                self._cursors[sink] = next_seq
                self._cursors_dirty = True
        if moved:
            self._publish()  # depth gauges see it now, not at the next commit

    def cursors(self) -> dict[str, int]:
        with self._lock:
            return dict(self._cursors)

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

    def _delivered_below(self) -> int:
        with self._lock:
            return min(self._cursors.values(), default=self.next_seq)

    def _snapshot(self) -> LogSnapshot:
        counters = dict(self._counters + self._unsaved)
        counters["readings"] = readings_total(self.next_seq, counters.get("events", 0))
        with self._lock:
            cursors = dict(self._cursors)
        return LogSnapshot(self.next_seq, self.bytes, self._full, counters, cursors)

    def _publish(self) -> None:
        """Hand the metrics thread a consistent picture (one reference swap, no shared dicts)."""
        self.snapshot = self._snapshot()

    def _used_bytes(self) -> int:
        """Bytes of the file in use: pages minus free pages (as of this transaction). The file
        itself does not shrink; freed pages are reused, so it stays near the cap."""
        pages = self._conn.execute("PRAGMA page_count").fetchone()[0]
        free = self._conn.execute("PRAGMA freelist_count").fetchone()[0]
        size = self._conn.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * size)

    # -- redeliveries -------------------------------------------------------------------------

    def _read_packet_ids(self) -> dict[int, tuple[int, int]]:
        """Packet id -> (checksum, logging order) of the last site message logged under it,
        from the file."""
        # Two uses of one packet id are a commit apart (the broker reuses an id only after
        # our PUBACK, sent after the commit), so ordering by time finds the last one.
        found: list[tuple[float, int, int, int]] = []   # (time, row order, index, key)
        seen = 0
        before = None
        while seen < _TAIL_KEYS:
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
            "ORDER BY id DESC LIMIT ?", (_TAIL_KEYS,)))
        found.sort()
        self._logged = len(found)
        return {key >> 32: (key & 0xFFFFFFFF, order)
                for order, (*_, key) in enumerate(found)}

    def is_redelivery(self, key: int) -> bool:
        """True when a DUP message is one already logged.

        A broker reuses a packet id only after our PUBACK for its previous message, so a
        redelivery (DUP) carries the id of a message we logged and did not get to
        acknowledge, or of one we never logged. It was logged exactly when the last message
        logged under that id has the same topic and payload. This holds whatever the broker's
        in-flight window (Mosquitto's max_inflight_messages 0 included).

        One case it cannot tell: a message lost before its commit whose packet id last
        carried byte-identical content (a door sensor sending "0"). Mosquitto hands out ids
        in turn, so that previous use is ~65,535 messages old, while a true redelivery was
        logged among the last few commits: a match older than _REDELIVERY_WINDOW messages
        is taken for a new message.
        """
        entry = self._last_by_mid.get(key >> 32)
        return (entry is not None and entry[0] == key & 0xFFFFFFFF
                and entry[1] >= self._logged - _REDELIVERY_WINDOW)

    # -- appending ----------------------------------------------------------------------------

    def append(self, messages: Sequence[Message], now: float | None = None) -> AppendResult:
        """Make messages durable in one transaction; returns how many were accepted.

        Under ``when_full: refuse`` a full log accepts only the prefix that fits; the caller
        keeps the rest unacknowledged, so the site broker holds them.
        """
        now = time.time() if now is None else now
        rows: list[tuple[int, int, int, float, int, bytes, int, bytes]] = []
        dead: list[tuple[float, str, str, str, int, bytes, int]] = []
        seq = self.next_seq
        added = 0
        readings = 0
        accepted = 0
        refused = False
        # Once full, stay full until sinks made room for a good part of the cap: accepting
        # one message per freed row would pause and resume the site session endlessly.
        limit = int(self._cfg.max_bytes * _TRIM_TO) if self._full else self._cfg.max_bytes
        dlq_cap = self._cfg.dlq_max_payload
        conn = self._conn
        counted: Counter[str] = Counter()
        ratio = self._ratio
        group = _Group(seq)

        def close_group() -> None:
            nonlocal group
            if group.n:
                raw = b",".join(group.bodies)
                body = zlib.compress(raw, _ZLIB_LEVEL)
                self._ratio = min(1.1, max(0.05, 0.8 * self._ratio + 0.2 * len(body) / len(raw)))
                rows.append((group.seq, group.n, KIND_TELEMETRY, now, 0, body, CODEC_ZLIB,
                             group.keys.tobytes()))
            group = _Group(seq)

        try:
            # Room is made inside the transaction: the rows dropped at the cap and the rows
            # that replace them are committed together, or neither is.
            conn.execute("BEGIN")
            for msg in messages:
                outcome = msg.outcome
                if isinstance(outcome, DeadLetter):
                    topic, detail = _dlq_topic(msg.topic, outcome.detail)
                    dead.append((msg.received, topic, outcome.reason.value, detail,
                                 len(msg.payload), msg.payload[:dlq_cap], msg.key))
                    accepted += 1
                    continue
                body = b",".join(
                    [orjson.dumps({"seq": seq + i, "device": dev, "ts": ts, **metrics})
                     for i, (dev, ts, metrics) in enumerate(outcome)]
                )
                size = int(len(body) * ratio) + _KEY_BYTES
                if self.bytes + added + size > limit - _NEAR_CAP:
                    # Near the cap estimates are not enough: write what is pending and
                    # measure the file, then make room for this message if it needs it
                    # (before inserting more, so freed pages are reused, not the file grown).
                    close_group()
                    if rows:
                        conn.executemany(_INSERT, rows)
                        rows.clear()
                        self.bytes = self._used_bytes()
                        added = 0
                    if self.bytes + size > limit and not self._make_room(size, counted):
                        refused = True
                        break
                if group.n and (group.n + len(outcome) > _GROUP_READINGS
                                or group.raw + len(body) > _GROUP_BYTES):
                    close_group()
                group.add(body, len(outcome), msg.key)
                seq += len(outcome)
                readings += len(outcome)
                added += size
                accepted += 1
            close_group()
            if rows:
                conn.executemany(_INSERT, rows)
            if readings:
                self._hold_cap(counted)
            if dead:
                conn.executemany(
                    "INSERT INTO dead_letters (ts, topic, reason, detail, size, payload, "
                    "msg_key) VALUES (?,?,?,?,?,?,?)", dead,
                )
                for entry in dead:
                    counted[f"dead_letters.{entry[2]}"] += 1
                if self._dlq_count + len(dead) > self._cfg.dlq_max_rows:
                    counted["dead_letters_evicted"] += self._trim_dead_letters(
                        self._dlq_count + len(dead))
            self._write_counters(counted)
            conn.execute("COMMIT")
        except sqlite3.Error as err:
            self._write_failed(err)
            return AppendResult(0, 0, 0)
        self._dlq_count = min(self._dlq_count + len(dead), self._cfg.dlq_max_rows)
        self._counted(counted)
        self.next_seq = seq
        last = self._last_by_mid
        order = self._logged
        for msg in messages[:accepted]:
            if msg.key >> 32:
                last[msg.key >> 32] = (msg.key & 0xFFFFFFFF, order)
                order += 1
        self._logged = order
        self.bytes = self._used_bytes()
        if not refused:
            self._leave_full()
        self._publish()
        return AppendResult(accepted, readings, len(dead))

    def _write_counters(self, delta: Counter[str]) -> None:
        """Add to the persisted counters inside the caller's transaction, with any counted
        while nothing could be written; the caller then calls ``_counted(delta)``."""
        delta.update(self._unsaved)
        if delta:
            self._conn.executemany(
                "INSERT INTO counters VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                list(delta.items()),
            )

    def _counted(self, delta: Counter[str]) -> None:
        """After the commit that wrote ``delta``."""
        self._counters.update(delta)
        self._unsaved.clear()

    def add_dead_letters(self, entries: Sequence[tuple[str, str, str, bytes]],
                         now: float | None = None) -> bool:
        """Dead-letter records a sink's destination refused for good, each (topic, reason,
        detail, payload); counted under ``dead_letters.<reason>`` like ingest's. False if
        they could not be written (full disk): the sink keeps them and tries again."""
        if not entries:
            return True
        now = time.time() if now is None else now
        cap = self._cfg.dlq_max_payload
        rows = []
        for topic, reason, detail, payload in entries:
            kept_topic, kept_detail = _dlq_topic(topic, detail)
            rows.append((now, kept_topic, reason, kept_detail, len(payload), payload[:cap]))
        counted: Counter[str] = Counter(f"dead_letters.{row[2]}" for row in rows)
        try:
            self._conn.execute("BEGIN")
            self._conn.executemany(
                "INSERT INTO dead_letters (ts, topic, reason, detail, size, payload) "
                "VALUES (?,?,?,?,?,?)", rows,
            )
            if self._dlq_count + len(rows) > self._cfg.dlq_max_rows:
                counted["dead_letters_evicted"] += self._trim_dead_letters(
                    self._dlq_count + len(rows))
            self._write_counters(counted)
            self._conn.execute("COMMIT")
        except sqlite3.Error as err:
            self._write_failed(err)
            return False
        self._dlq_count = min(self._dlq_count + len(rows), self._cfg.dlq_max_rows)
        self._counted(counted)
        self._publish()
        return True

    def save_state(self, name: str, value: bytes) -> None:
        """Keep a component's state (the rule engine's alert states) with the log, durably.
        On a full disk the previous state stays and the log reports itself full."""
        self.append_events_with_state((), [(name, value)])

    def load_state(self, name: str) -> bytes | None:
        row = self._conn.execute("SELECT value FROM state WHERE name = ?", (name,)).fetchone()
        return None if row is None else bytes(row[0])

    def append_events(self, events: Sequence[Event], now: float | None = None) -> list[int]:
        """Log events (one row each) in one transaction; returns their sequence numbers.

        Events are few and say what happened to the readings, so they are never refused:
        at the cap, room is made as for readings (drop_oldest), or the cap is exceeded by
        them (refuse).
        """
        return self.append_events_with_state(events, (), now)

    def append_events_with_state(self, events: Sequence[Event],
                                 states: Sequence[tuple[str, bytes]],
                                 now: float | None = None) -> list[int]:
        """Log events and components' states (name, value) in one transaction, so a crash
        cannot keep one without the other (an alert logged as fired but saved as pending
        would fire again, and resend its command)."""
        if not events and not states:
            return []
        now = time.time() if now is None else now
        seqs = list(range(self.next_seq, self.next_seq + len(events)))
        rows = [(seq, 1, KIND_EVENT, now, 0, render(event, self._gateway_id, seq))
                for seq, event in zip(seqs, events, strict=True)]
        added = sum(len(r[5]) + ROW_OVERHEAD for r in rows)
        counted: Counter[str] = Counter()
        try:
            self._conn.execute("BEGIN")
            if rows and self.bytes + added > self._cfg.max_bytes \
                    and self._cfg.when_full is WhenFull.DROP_OLDEST:
                self._make_room(added, counted)
            if rows:
                self._conn.executemany(_INSERT, [(*r, CODEC_RAW, None) for r in rows])
                counted["events"] += len(rows)
            if states:
                self._conn.executemany("INSERT OR REPLACE INTO state VALUES (?, ?)", states)
            self._write_counters(counted)
            self._conn.execute("COMMIT")
        except sqlite3.Error as err:
            self._write_failed(err)
            if events:
                self._count_drop("disk_full_events", len(events), persist=False)
            if states:
                self._unsaved["state_saves_failed"] += len(states)
            self._publish()
            return []
        if seqs:
            self.next_seq = seqs[-1] + 1
        self._counted(counted)
        self.bytes = self._used_bytes()
        self._publish()
        return seqs

    def dead_letter_records(self, first: int, end: int, *, topic: str, reason: str,
                            detail: str, now: float | None = None) -> int | None:
        """Copy the records with seq in [first, end) to the dead-letter table, one row each:
        a sink's destination refused them for good (``gateway log dlq`` shows them). The
        records stay in the log for other sinks; the caller moves its cursor past them.
        Returns the readings they held, or None when the copy could not be written."""
        entries = []
        readings = 0
        for row in LogReader(None, conn=self._conn).between(first, end):
            payload = row.body if row.kind == KIND_EVENT else b"[" + row.body + b"]"
            entries.append((topic, reason, f"{detail}; seq {row.seq}-{row.seq + row.n - 1}",
                            payload))
            readings += row.n
        if not self.add_dead_letters(entries, now):
            return None
        return readings

    def _hold_cap(self, counted: Counter[str]) -> None:
        """After inserting: row sizes only estimate the pages they fill, so measure the file
        and, under drop_oldest, trim what the estimate missed in the same transaction."""
        self.bytes = self._used_bytes()
        if self.bytes > self._cfg.max_bytes and self._cfg.when_full is WhenFull.DROP_OLDEST:
            target = int(self._cfg.max_bytes * _TRIM_TO)
            self._delete_oldest(target, below=self._delivered_below(), reason=None,
                                counted=counted)
            self._delete_oldest(target, below=None, reason="cap", counted=counted)

    def _make_room(self, incoming: int, counted: Counter[str]) -> bool:
        """Trim so that ``incoming`` more bytes fit; False when the policy says refuse."""
        target = int(self._cfg.max_bytes * _TRIM_TO) - incoming
        self._delete_oldest(target, below=self._delivered_below(), reason=None,
                            counted=counted)
        limit = int(self._cfg.max_bytes * _TRIM_TO) if self._full else self._cfg.max_bytes
        if self.bytes <= target or self.bytes + incoming <= limit:
            return True
        if self._cfg.when_full is WhenFull.REFUSE:
            self._enter_full(f"log.max_bytes {self._cfg.max_bytes} reached")
            return False
        self._delete_oldest(target, below=None, reason="cap", counted=counted)
        return True

    def _delete_oldest(self, target: int, below: int | None, reason: str | None,
                       counted: Counter[str]) -> None:
        """Delete the oldest rows until the log's used bytes are ``<= target`` (only rows with
        seq < below). Row sizes guide each step; the file's used pages decide when to stop."""
        while self.bytes > target:
            rows = self._conn.execute(
                "SELECT seq, n, length(body) FROM records ORDER BY seq LIMIT 1000"
            ).fetchall()
            last = None
            end = 0
            freed = 0
            dropped = 0
            delivered = self._delivered_below() if reason is not None else 0
            for seq, n, size in rows:
                if below is not None and seq + n > below:
                    break
                last, end = seq, seq + n
                freed += size + ROW_OVERHEAD
                dropped += max(0, seq + n - max(seq, delivered))
                if self.bytes - freed <= target:
                    break
            if last is None:
                return
            self._delete_through(last, end)
            if reason is not None:
                self._count_drop(reason, dropped, counted)

    def _delete_through(self, last: int, end: int) -> None:
        """Delete records with seq <= last (inside the caller's transaction); ``end`` is the
        first seq after them. Sinks whose cursor was behind skip what is gone, so their depth
        counts only what they can still deliver."""
        # Sequence numbers must survive the rows that carried them.
        self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('next_seq', ?)",
                           (str(self.next_seq),))
        self._conn.execute("DELETE FROM records WHERE seq <= ?", (last,))
        with self._lock:
            moved = {k: end for k, v in self._cursors.items() if v < end}
            if moved:
                self._cursors.update(moved)
                self._conn.executemany("INSERT OR REPLACE INTO cursors VALUES (?, ?)",
                                       moved.items())
        self.bytes = self._used_bytes()

    def _count_drop(self, reason: str, readings: int, counted: Counter[str] | None = None,
                    *, persist: bool = True) -> None:
        """Count dropped readings: into ``counted`` (committed with the deletion), or straight
        into memory when nothing can be written (``persist=False``)."""
        if readings <= 0:
            return
        if reason not in self._drop_episodes:
            log.warning("Log dropping undelivered readings (%s, when_full: %s); see "
                        "`gateway log stats`", reason, self._cfg.when_full.value)
        episode = self._drop_episodes.setdefault(reason, [0, 0.0])
        episode[0] += readings
        episode[1] = time.monotonic()
        if persist and counted is not None:
            counted[f"dropped.{reason}"] += readings
        else:
            self._unsaved[f"dropped.{reason}"] += readings

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
            self._unsaved["full_episodes"] += 1

    def _leave_full(self) -> None:
        if self._full:
            log.info("Log accepting readings again")
            self._full = False

    def _trim_dead_letters(self, count: int) -> int:
        excess = count - self._cfg.dlq_max_rows
        self._conn.execute(
            "DELETE FROM dead_letters WHERE id IN "
            "(SELECT id FROM dead_letters ORDER BY id LIMIT ?)", (excess,)
        )
        return excess

    def _recount(self) -> None:
        """Re-read sizes after a rolled-back transaction (trimming may have been undone)."""
        self.bytes = self._used_bytes()
        self._dlq_count = self._conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
        with self._lock:
            self._cursors.update(
                (k, v) for k, v in self._conn.execute("SELECT sink, next_seq FROM cursors")
                if k in self._cursors and v > self._cursors[k])

    def _save_cursors(self) -> bool:
        """Write moved cursors (inside a transaction); False when nothing moved."""
        with self._lock:
            if not self._cursors_dirty:
                return False
            self._conn.executemany(
                "INSERT OR REPLACE INTO cursors VALUES (?, ?)", self._cursors.items()
            )
            self._cursors_dirty = False
            return True

    def _write_failed(self, err: sqlite3.Error) -> None:
        """After a failed write: undo it; a full disk makes the log refuse (reported, retried
        later); any other error is raised as LogError."""
        self._rollback()
        self._recount()
        if not _is_disk_full(err):
            raise LogError(f"Cannot write log file {str(self._path)!r}: {err}") from err
        self._enter_full("disk is full", disk=True)
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
        retry_full = self._full and mono >= self._disk_retry_at
        try:
            self._conn.execute("BEGIN")
            self._expire(now - self._cfg.max_age, counted)
            if retry_full:
                # Sinks may have caught up: delivered records make room for new ones.
                target = int(self._cfg.max_bytes * _TRIM_TO)
                self._delete_oldest(target, below=self._delivered_below(), reason=None,
                                    counted=counted)
            self._save_cursors()
            self._write_counters(counted)
            # An empty transaction writes nothing to the file.
            self._conn.execute("COMMIT")
        except sqlite3.Error as err:
            self._write_failed(err)
            return
        self._counted(counted)
        if retry_full and self.bytes <= int(self._cfg.max_bytes * _TRIM_TO):
            self._leave_full()
        if self._drop_episodes:
            self._end_drop_episodes()
        self._publish()

    def _expire(self, cutoff: float, counted: Counter[str]) -> None:
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
            end = 0
            undelivered = 0
            for seq, n, _size, created in rows:
                if created >= cutoff:
                    break
                last, end = seq, seq + n
                undelivered += max(0, seq + n - max(seq, delivered))
            if last is None:
                return
            self._delete_through(last, end)
            self._count_drop("age", undelivered, counted)
            if last != rows[-1][0] or len(rows) < 1000:
                return

    def close(self) -> None:
        try:
            self.housekeeping(force=True)
        finally:
            self._conn.close()


def _dlq_topic(topic: str, detail: str) -> tuple[str, str]:
    """A dead letter's topic as stored, cut to ``DLQ_TOPIC_MAX`` bytes, and its detail, which
    then says so."""
    if len(topic) * 4 <= DLQ_TOPIC_MAX:  # at most 4 bytes a character: short enough
        return topic, detail
    raw = topic.encode()
    if len(raw) <= DLQ_TOPIC_MAX:
        return topic, detail
    return (raw[:DLQ_TOPIC_MAX].decode("utf-8", "ignore"),
            f"{detail}; {DLQ_TOPIC_CUT} (of {len(raw)} bytes)")


def _is_disk_full(err: sqlite3.Error) -> bool:
    return getattr(err, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "full" in str(err)
