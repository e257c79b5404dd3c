"""Appending to the log: site messages (readings in group-committed, compressed rows, or
dead letters), events, and records a sink's destination refused for good.

Each method runs one transaction's inserts and leaves BEGIN/COMMIT and the handling of a
failed write to the caller (``LogStore``), which also moves the log's state on only after
the commit. A telemetry row's body is its readings as comma-joined JSON objects, each led
by its ``seq`` (what the uplink forwards as is and ``LogReader`` cuts at); a message's key
is stored with it as an opaque number (ingest's redelivery check gives it its meaning).
"""

from __future__ import annotations

import sqlite3
import zlib
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import orjson

from gateway.config import LogSection, WhenFull
from gateway.log.reader import LogReader
from gateway.log.retention import TRIM_TO, Retention
from gateway.log.schema import CODEC_RAW, CODEC_ZLIB, KIND_EVENT, KIND_TELEMETRY, ROW_OVERHEAD
from gateway.records import DeadLetter, Event, Reading

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
# Longest topic kept with a dead letter, in UTF-8 bytes. MQTT allows 64 KiB; the topic is
# the operator's clue to where a message came from, and 1 KiB of it is plenty, where 64 KiB
# a row would let a misbehaving publisher fill the dead-letter table 64 times faster.
DLQ_TOPIC_MAX = 1024
# Said in the detail of a dead letter whose topic was cut (`gateway log replay` skips it).
DLQ_TOPIC_CUT = "topic truncated to 1 KiB"

_INSERT = ("INSERT INTO records (seq, n, kind, created, msg_key, body, codec, keys) "
           "VALUES (?,?,?,?,?,?,?,?)")

# Renders an event as the body the log keeps for it: (event, gateway id, its seq) -> bytes.
EventBody = Callable[[Event, str, int], bytes]
# An event's row: seq, n, kind, created, msg_key, body.
EventRow = tuple[int, int, int, float, int, bytes]


@dataclass(slots=True)
class Message:
    """One site message on its way into the log."""

    topic: str
    payload: bytes
    key: int            # kept with the message, for ingest (gateway.ingest.redelivery)
    outcome: list[Reading] | DeadLetter
    received: float


@dataclass(frozen=True, slots=True)
class AppendResult:
    accepted: int       # messages made durable (a prefix of those offered)
    readings: int       # readings among them
    dead_letters: int


@dataclass(frozen=True, slots=True)
class Appended:
    """What ``Appender.messages`` inserted, to be taken over once committed."""

    result: AppendResult
    next_seq: int
    refused: bool       # the log refused the rest (when_full: refuse)
    plain: list[tuple[int, int, bytes]]   # the telemetry rows: seq, n, body before zlib


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


class Appender:
    """The inserts of the log's writer, inside the caller's transaction."""

    def __init__(self, cfg: LogSection, conn: sqlite3.Connection, retention: Retention,
                 gateway_id: str, event_body: EventBody) -> None:
        self._cfg = cfg
        self._conn = conn
        self._retention = retention
        self._gateway_id = gateway_id
        self._event_body = event_body
        self._ratio = 0.35   # compressed / raw body bytes, learnt from each group

    def messages(self, messages: Sequence[Message], seq: int, now: float,
                 counted: Counter[str]) -> Appended:
        """Insert messages from sequence number ``seq`` on: readings into grouped rows, dead
        letters into their table. Under ``when_full: refuse`` a full log takes only the
        prefix that fits."""
        retention = self._retention
        rows: list[tuple[int, int, int, float, int, bytes, int, bytes]] = []
        dead: list[tuple[float, str, str, str, int, bytes, int]] = []
        added = 0
        readings = 0
        accepted = 0
        refused = False
        # Once full, stay full until sinks made room for a good part of the cap: accepting
        # one message per freed row would pause and resume the site session endlessly.
        limit = int(self._cfg.max_bytes * TRIM_TO) if retention.full else self._cfg.max_bytes
        dlq_cap = self._cfg.dlq_max_payload
        conn = self._conn
        ratio = self._ratio
        plain: list[tuple[int, int, bytes]] = []
        dumps = orjson.dumps
        group = _Group(seq)

        def close_group() -> None:
            nonlocal group
            if group.n:
                raw = b",".join(group.bodies)
                body = zlib.compress(raw, _ZLIB_LEVEL)
                self._ratio = min(1.1, max(0.05, 0.8 * self._ratio + 0.2 * len(body) / len(raw)))
                rows.append((group.seq, group.n, KIND_TELEMETRY, now, 0, body, CODEC_ZLIB,
                             group.keys.tobytes()))
                plain.append((group.seq, group.n, raw))
            group = _Group(seq)

        # Room is made inside the transaction: the rows dropped at the cap and the rows
        # that replace them are committed together, or neither is.
        for msg in messages:
            outcome = msg.outcome
            if isinstance(outcome, DeadLetter):
                topic, detail = dlq_topic(msg.topic, outcome.detail)
                dead.append((msg.received, topic, outcome.reason.value, detail,
                             len(msg.payload), msg.payload[:dlq_cap], msg.key))
                accepted += 1
                continue
            if len(outcome) == 1:   # the common message: one reading
                dev, ts, metrics = outcome[0]
                body = dumps({"seq": seq, "device": dev, "ts": ts, **metrics})
            else:
                body = b",".join(
                    [dumps({"seq": seq + i, "device": dev, "ts": ts, **metrics})
                     for i, (dev, ts, metrics) in enumerate(outcome)]
                )
            size = int(len(body) * ratio) + _KEY_BYTES
            if retention.bytes + added + size > limit - _NEAR_CAP:
                # Near the cap estimates are not enough: write what is pending and
                # measure the file, then make room for this message if it needs it
                # (before inserting more, so freed pages are reused, not the file grown).
                close_group()
                if rows:
                    conn.executemany(_INSERT, rows)
                    rows.clear()
                    retention.bytes = retention.used_bytes()
                    added = 0
                if retention.bytes + size > limit and not retention.make_room(size, counted):
                    refused = True
                    break
            n = len(outcome)
            if group.n and (group.n + n > _GROUP_READINGS
                            or group.raw + len(body) > _GROUP_BYTES):
                close_group()
            group.add(body, n, msg.key)
            seq += n
            readings += n
            added += size
            accepted += 1
        close_group()
        if len(rows) == 1:
            conn.execute(_INSERT, rows[0])
        elif rows:
            conn.executemany(_INSERT, rows)
        if readings:
            retention.hold_cap(counted)
        if dead:
            conn.executemany(
                "INSERT INTO dead_letters (ts, topic, reason, detail, size, payload, "
                "msg_key) VALUES (?,?,?,?,?,?,?)", dead,
            )
            for entry in dead:
                counted[f"dead_letters.{entry[2]}"] += 1
            retention.trim_dead_letters(len(dead), counted)
        return Appended(AppendResult(accepted, readings, len(dead)), seq, refused, plain)

    def event_rows(self, events: Sequence[Event], seq: int, now: float) -> list[EventRow]:
        """Events' rows as records ``seq``, ``seq + 1``, ... (before the transaction)."""
        return [(seq + i, 1, KIND_EVENT, now, 0,
                 self._event_body(event, self._gateway_id, seq + i))
                for i, event in enumerate(events)]

    def events(self, rows: Sequence[EventRow], counted: Counter[str]) -> None:
        """Insert events' rows.

        Events are few and say what happened to the readings, so they are never refused:
        at the cap, room is made as for readings (drop_oldest), or the cap is exceeded by
        them (refuse).
        """
        if not rows:
            return
        added = sum(len(r[5]) + ROW_OVERHEAD for r in rows)
        if self._retention.bytes + added > self._cfg.max_bytes \
                and self._cfg.when_full is WhenFull.DROP_OLDEST:
            self._retention.make_room(added, counted)
        self._conn.executemany(_INSERT, [(*r, CODEC_RAW, None) for r in rows])
        counted["events"] += len(rows)

    def dead_letters(self, entries: Sequence[tuple[str, str, str, bytes]], now: float,
                     counted: Counter[str]) -> int:
        """Insert dead letters, each (topic, reason, detail, payload); returns how many."""
        cap = self._cfg.dlq_max_payload
        rows = []
        for topic, reason, detail, payload in entries:
            kept_topic, kept_detail = dlq_topic(topic, detail)
            rows.append((now, kept_topic, reason, kept_detail, len(payload), payload[:cap]))
        counted.update(f"dead_letters.{row[2]}" for row in rows)
        self._conn.executemany(
            "INSERT INTO dead_letters (ts, topic, reason, detail, size, payload) "
            "VALUES (?,?,?,?,?,?)", rows,
        )
        self._retention.trim_dead_letters(len(rows), counted)
        return len(rows)

    def refused_records(self, first: int, end: int, *, topic: str, reason: str,
                        detail: str) -> tuple[list[tuple[str, str, str, bytes]], int]:
        """The records with seq in [first, end) as dead-letter entries, one per row, and the
        readings they hold (what ``dead_letters`` then inserts)."""
        entries = []
        readings = 0
        for row in LogReader(None, conn=self._conn).between(first, end):
            payload = row.body if row.kind == KIND_EVENT else b"[" + row.body + b"]"
            entries.append((topic, reason, f"{detail}; seq {row.seq}-{row.seq + row.n - 1}",
                            payload))
            readings += row.n
        return entries, readings


def dlq_topic(topic: str, detail: str) -> tuple[str, str]:
    """A dead letter's topic as stored, cut to ``DLQ_TOPIC_MAX`` bytes, and its detail, which
    then says so."""
    if len(topic) * 4 <= DLQ_TOPIC_MAX:  # at most 4 bytes a character: short enough
        return topic, detail
    raw = topic.encode()
    if len(raw) <= DLQ_TOPIC_MAX:
        return topic, detail
    return (raw[:DLQ_TOPIC_MAX].decode("utf-8", "ignore"),
            f"{detail}; {DLQ_TOPIC_CUT} (of {len(raw)} bytes)")
