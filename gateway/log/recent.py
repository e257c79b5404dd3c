"""The log's newest telemetry rows, kept in memory after their commit for the uplink.

The uplink forwards, on the turn of the loop after a group commit, the rows that commit
wrote. Reading them back from SQLite costs two queries, their locks and a decompression on
every commit, at low rates a good part of what a commit costs. ``LogStore`` therefore keeps
the plain bodies of the rows it committed last (``RecentRows``); a ``LogReader`` given
them serves a read that starts inside them from memory and reads the file otherwise. Only
what is committed enters (a record still enters the log before any sink sees it), and
what is kept is exactly what the file holds: anything else that changes the log's end or
removes records (events, trimming at the cap, expiry, a rolled-back write) clears it.

Not thread-safe: for readers in the writer's thread (the daemon's loop).
"""

from __future__ import annotations

from bisect import bisect_right

from gateway.log.schema import CODEC_RAW, KIND_TELEMETRY

# Plain body bytes kept. A reader more than this behind the log's end reads the file, as
# before; more costs memory (the bodies are held uncompressed), less sends a sink that
# lags by a few commits to the file. A batch is at most 256 KiB by default.
RECENT_BYTES = 256 * 1024

# A row as LogReader reads it from the file: seq, n, body, kind, codec.
StoredRow = tuple[int, int, bytes, int, int]


class RecentRows:
    """The last committed telemetry rows, contiguous up to the log's end (``end``)."""

    __slots__ = ("_bodies", "_bytes", "_ns", "_seqs", "end")

    def __init__(self) -> None:
        self._seqs: list[int] = []
        self._ns: list[int] = []
        self._bodies: list[bytes] = []
        self._bytes = 0
        self.end = 0

    def clear(self) -> None:
        self._seqs.clear()
        self._ns.clear()
        self._bodies.clear()
        self._bytes = 0
        self.end = 0

    def committed(self, rows: list[tuple[int, int, bytes]], end: int) -> None:
        """Telemetry rows (seq, n, plain body) were committed; ``end`` is the log's next seq
        now. Rows that do not continue what is kept make it start again from them."""
        if not rows:
            if end != self.end:
                self.clear()
            return
        if rows[-1][0] + rows[-1][1] != end:
            self.clear()   # the commit took more than these rows: not a contiguous run
            return
        if self.end != rows[0][0]:
            self.clear()
        for seq, n, body in rows:
            self._seqs.append(seq)
            self._ns.append(n)
            self._bodies.append(body)
            self._bytes += len(body)
        self.end = end
        # Keep at least the last commit's rows; drop the oldest beyond the byte bound.
        drop = 0
        keep_from = len(self._seqs) - len(rows)
        while drop < keep_from and self._bytes > RECENT_BYTES:
            self._bytes -= len(self._bodies[drop])
            drop += 1
        if drop:
            del self._seqs[:drop], self._ns[:drop], self._bodies[:drop]

    def since(self, seq: int, limit: int) -> list[StoredRow] | None:
        """Up to ``limit`` rows from the one holding ``seq`` on, as the file would return
        them; None when ``seq`` is not kept here."""
        seqs = self._seqs
        if not seqs or not seqs[0] <= seq < self.end:
            return None
        i = bisect_right(seqs, seq) - 1
        j = i + max(1, limit)
        return [(s, n, body, KIND_TELEMETRY, CODEC_RAW)
                for s, n, body in zip(seqs[i:j], self._ns[i:j], self._bodies[i:j],
                                      strict=True)]
