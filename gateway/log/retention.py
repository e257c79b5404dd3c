"""Holding the log to its bounds: ``log.max_bytes`` (and ``when_full``), ``log.max_age``,
``log.dlq_max_rows``.

Everything here runs inside the writer's transaction, so the rows dropped at a bound and
the counter that says so are committed together. Delivered records go first; what a sink
had not delivered is counted under ``dropped.<reason>`` (cap, age) and reported as a drop
episode: one line when it starts and one when it ends, never silent.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Callable

from gateway.config import LogSection, WhenFull
from gateway.log.schema import ROW_OVERHEAD
from gateway.log.state import Counters, Cursors

log = logging.getLogger(__name__)

# When the cap is hit, trim to this fraction of it so that trimming is not paid on every
# following commit; a lower value frees more at once but throws away more history.
TRIM_TO = 0.9
# After the disk filled up, wait this long before trying to write again.
_DISK_FULL_RETRY = 10.0
# A drop episode (logged once at its start and once at its end) ends after this long without
# a drop; shorter logs more lines during a long outage, longer reports the end later.
_DROP_EPISODE_QUIET = 60.0


class Retention:
    """The log's size and fullness, and what is removed to hold its bounds."""

    def __init__(self, cfg: LogSection, conn: sqlite3.Connection, cursors: Cursors,
                 counters: Counters, next_seq: Callable[[], int]) -> None:
        """``next_seq`` gives the log's next sequence number (kept when rows are removed)."""
        self._cfg = cfg
        self._conn = conn
        self._cursors = cursors
        self._counters = counters
        self._next_seq = next_seq
        self.full = False
        self._disk_retry_at = 0.0
        self._drop_episodes: dict[str, list[float]] = {}  # reason -> [readings, last drop]
        self.dlq_count: int = conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
        # A WAL database's page size is fixed once the file exists.
        self._page_size: int = conn.execute("PRAGMA page_size").fetchone()[0]
        # Bumped by every deletion of records (cap, age), for readers of recent rows.
        self.deletions = 0
        # Bytes the log occupies (used pages of the file); the cap is held against this.
        self.bytes = self.used_bytes()

    def used_bytes(self) -> int:
        """Bytes of the file in use: pages minus free pages (as of this transaction). The file
        itself does not shrink; freed pages are reused, so it stays near the cap."""
        pages = self._conn.execute("PRAGMA page_count").fetchone()[0]
        free = self._conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int((pages - free) * self._page_size)

    def delivered_below(self) -> int:
        return self._cursors.lowest(self._next_seq())

    # -- the byte cap -------------------------------------------------------------------------

    def hold_cap(self, counted: Counter[str]) -> None:
        """After inserting: row sizes only estimate the pages they fill, so measure the file
        and, under drop_oldest, trim what the estimate missed in the same transaction."""
        self.bytes = self.used_bytes()
        if self.bytes > self._cfg.max_bytes and self._cfg.when_full is WhenFull.DROP_OLDEST:
            target = int(self._cfg.max_bytes * TRIM_TO)
            self._delete_oldest(target, below=self.delivered_below(), reason=None,
                                counted=counted)
            self._delete_oldest(target, below=None, reason="cap", counted=counted)

    def make_room(self, incoming: int, counted: Counter[str]) -> bool:
        """Trim so that ``incoming`` more bytes fit; False when the policy says refuse."""
        target = int(self._cfg.max_bytes * TRIM_TO) - incoming
        self._delete_oldest(target, below=self.delivered_below(), reason=None,
                            counted=counted)
        limit = int(self._cfg.max_bytes * TRIM_TO) if self.full else self._cfg.max_bytes
        if self.bytes <= target or self.bytes + incoming <= limit:
            return True
        if self._cfg.when_full is WhenFull.REFUSE:
            self.enter_full(f"log.max_bytes {self._cfg.max_bytes} reached")
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
            delivered = self.delivered_below() if reason is not None else 0
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
                self.count_drop(reason, dropped, counted)

    def _delete_through(self, last: int, end: int) -> None:
        """Delete records with seq <= last (inside the caller's transaction); ``end`` is the
        first seq after them. Sinks whose cursor was behind skip what is gone, so their depth
        counts only what they can still deliver."""
        # Sequence numbers must survive the rows that carried them.
        self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('next_seq', ?)",
                           (str(self._next_seq()),))
        self._conn.execute("DELETE FROM records WHERE seq <= ?", (last,))
        self.deletions += 1
        self._cursors.skip_to(end, self._conn)
        self.bytes = self.used_bytes()

    # -- full, and drops ----------------------------------------------------------------------

    def count_drop(self, reason: str, readings: int, counted: Counter[str] | None = None,
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
            self._counters.unsaved[f"dropped.{reason}"] += readings

    def _end_drop_episodes(self) -> None:
        now = time.monotonic()
        for reason, (count, last) in list(self._drop_episodes.items()):
            if now - last >= _DROP_EPISODE_QUIET:
                log.warning("Log stopped dropping (%s): %d undelivered readings dropped",
                            reason, count)
                del self._drop_episodes[reason]

    def enter_full(self, why: str, *, disk: bool = False) -> None:
        if disk:
            self._disk_retry_at = time.monotonic() + _DISK_FULL_RETRY
        if not self.full:
            log.warning("Log full (%s): refusing new readings until %s", why,
                        "space is freed" if disk else "sinks catch up")
            self.full = True
            self._counters.unsaved["full_episodes"] += 1

    def leave_full(self) -> None:
        if self.full:
            log.info("Log accepting readings again")
            self.full = False

    # -- dead letters -------------------------------------------------------------------------

    def trim_dead_letters(self, added: int, counted: Counter[str]) -> None:
        """Inside the transaction that adds ``added`` dead letters: evict the oldest beyond
        log.dlq_max_rows (counted under ``dead_letters_evicted``)."""
        count = self.dlq_count + added
        excess = count - self._cfg.dlq_max_rows
        if excess <= 0:
            return
        self._conn.execute(
            "DELETE FROM dead_letters WHERE id IN "
            "(SELECT id FROM dead_letters ORDER BY id LIMIT ?)", (excess,)
        )
        counted["dead_letters_evicted"] += excess

    def dead_letters_committed(self, added: int) -> None:
        self.dlq_count = min(self.dlq_count + added, self._cfg.dlq_max_rows)

    def recount(self) -> None:
        """Re-read sizes after a rolled-back transaction (trimming may have been undone)."""
        self.bytes = self.used_bytes()
        self.dlq_count = self._conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]

    # -- age, and the periodic turn -----------------------------------------------------------

    def housekeeping(self, now: float, mono: float, counted: Counter[str]) -> bool:
        """Inside the writer's transaction: expire old records and, when the log is full and
        its retry is due, remove what the sinks delivered since. True if that retry ran."""
        retry_full = self.full and mono >= self._disk_retry_at
        self._expire(now - self._cfg.max_age, counted)
        if retry_full:
            # Sinks may have caught up: delivered records make room for new ones.
            target = int(self._cfg.max_bytes * TRIM_TO)
            self._delete_oldest(target, below=self.delivered_below(), reason=None,
                                counted=counted)
        return retry_full

    def housekeeping_done(self, retry_full: bool) -> None:
        """After housekeeping's commit."""
        if retry_full and self.bytes <= int(self._cfg.max_bytes * TRIM_TO):
            self.leave_full()
        if self._drop_episodes:
            self._end_drop_episodes()

    def _expire(self, cutoff: float, counted: Counter[str]) -> None:
        """Remove records appended before ``cutoff``, oldest first, in seq order.

        Walks the primary key from the oldest row and stops at the first younger one, so
        this costs nothing when nothing expired (no scan of the table every second). After
        a clock step back, rows behind a younger one wait for it: nothing is lost early.
        """
        delivered = self.delivered_below()
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
            self.count_drop("age", undelivered, counted)
            if last != rows[-1][0] or len(rows) < 1000:
                return
