"""The log's state beside its records: sink cursors, counters and components' saved state.

Sinks acknowledge from their own threads: ``Cursors.ack`` only touches memory under a lock,
and the writer makes moved cursors durable at most once a second (housekeeping). A crash
can therefore make a sink resend a little; every reading carries its ``seq`` for
de-duplication.

Counters are committed in the transaction that changes the data they count (a dead letter
and its counter, a trim and its drop counter): ``Counters.write`` inside the transaction,
``Counters.committed`` after it. The number of readings ever logged is derived from the
sequence numbers, so no crash can make it disagree with the data.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass


def readings_total(next_seq: int, events: int) -> int:
    """Readings ever logged: every reading and every event took one sequence number."""
    return max(0, next_seq - 1 - events)


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


class Cursors:
    """Each configured sink's next seq not yet acknowledged by its destination."""

    def __init__(self, stored: dict[str, int]) -> None:
        self._lock = threading.Lock()
        self._by_sink = stored
        self._dirty = False

    def get(self, sink: str, start: Callable[[], int]) -> int:
        """The sink's cursor; a new sink starts at ``start()`` (the log's tail)."""
        with self._lock:
            if sink not in self._by_sink:
                self._by_sink[sink] = start()
                self._dirty = True
            return self._by_sink[sink]

    def ack(self, sink: str, next_seq: int) -> bool:
        """Everything below ``next_seq`` was acknowledged; True if the cursor moved."""
        with self._lock:
            moved = next_seq > self._by_sink.get(sink, 0)
            if moved:
                self._by_sink[sink] = next_seq
                self._dirty = True
        return moved

    def copy(self) -> dict[str, int]:
        with self._lock:
            return dict(self._by_sink)

    def lowest(self, default: int) -> int:
        """The seq below which every sink has delivered (``default`` without sinks)."""
        with self._lock:
            return min(self._by_sink.values(), default=default)

    def skip_to(self, end: int, conn: sqlite3.Connection) -> None:
        """Records below ``end`` are gone: cursors behind it move there, durably in the
        caller's transaction (a sink's depth counts only what it can still deliver)."""
        with self._lock:
            moved = {k: end for k, v in self._by_sink.items() if v < end}
            if moved:
                self._by_sink.update(moved)
                conn.executemany("INSERT OR REPLACE INTO cursors VALUES (?, ?)", moved.items())

    def save(self, conn: sqlite3.Connection) -> bool:
        """Write moved cursors (inside a transaction); False when nothing moved."""
        with self._lock:
            if not self._dirty:
                return False
            conn.executemany("INSERT OR REPLACE INTO cursors VALUES (?, ?)",
                             self._by_sink.items())
            self._dirty = False
            return True

    def reload(self, conn: sqlite3.Connection) -> None:
        """After a rolled-back transaction: take back moves it made durable and undid, and
        save the cursors again (the transaction may have saved them)."""
        with self._lock:
            self._dirty = True
            self._by_sink.update(
                (k, v) for k, v in conn.execute("SELECT sink, next_seq FROM cursors")
                if k in self._by_sink and v > self._by_sink[k])


class Counters:
    """The log's persisted counters (``dead_letters.<reason>``, ``dropped.<reason>``, ...)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.persisted: Counter[str] = Counter(
            dict(conn.execute("SELECT name, value FROM counters")))
        # Older logs kept a running count of readings; it is derived from seq now.
        self.persisted.pop("readings", None)
        self.unsaved: Counter[str] = Counter()  # counted while nothing could be written

    def write(self, conn: sqlite3.Connection, delta: Counter[str]) -> None:
        """Add to the persisted counters inside the caller's transaction, with any counted
        while nothing could be written; the caller then calls ``committed(delta)``."""
        delta.update(self.unsaved)
        if delta:
            conn.executemany(
                "INSERT INTO counters VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                list(delta.items()),
            )

    def committed(self, delta: Counter[str]) -> None:
        """After the commit that wrote ``delta``."""
        self.persisted.update(delta)
        self.unsaved.clear()

    def total(self) -> Counter[str]:
        return self.persisted + self.unsaved

    def as_dict(self) -> dict[str, int]:
        """``total()`` as a new plain dict (cheaper: every commit takes one)."""
        out = dict(self.persisted)
        for name, value in self.unsaved.items():
            out[name] = out.get(name, 0) + value
        return {k: v for k, v in out.items() if v > 0}


def save_states(conn: sqlite3.Connection, states: Sequence[tuple[str, bytes]]) -> None:
    """Keep components' states (name, value), inside the caller's transaction."""
    conn.executemany("INSERT OR REPLACE INTO state VALUES (?, ?)", states)


def load_state(conn: sqlite3.Connection, name: str) -> bytes | None:
    row = conn.execute("SELECT value FROM state WHERE name = ?", (name,)).fetchone()
    return None if row is None else bytes(row[0])
