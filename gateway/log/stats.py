"""What `gateway log stats` shows: depth per sink, bytes, oldest undelivered, dead letters."""

from __future__ import annotations

import sqlite3
from typing import Any

from gateway.log.schema import ROW_OVERHEAD
from gateway.log.state import readings_total


def log_stats(conn: sqlite3.Connection) -> dict[str, Any]:
    rows, readings, body, first, last_end, oldest = conn.execute(
        "SELECT count(*), COALESCE(SUM(n), 0), COALESCE(SUM(length(body)), 0), MIN(seq), "
        "MAX(seq + n), MIN(created) FROM records"
    ).fetchone()
    sinks = {}
    for sink, cursor in conn.execute("SELECT sink, next_seq FROM cursors ORDER BY sink"):
        depth, since = conn.execute(
            "SELECT COALESCE(SUM(n), 0), MIN(created) FROM records WHERE seq >= ?", (cursor,)
        ).fetchone()
        sinks[sink] = {"next_seq": cursor, "undelivered": depth, "oldest_undelivered": since}
    dlq = dict(conn.execute("SELECT reason, count(*) FROM dead_letters GROUP BY reason"))
    counters = dict(conn.execute("SELECT name, value FROM counters ORDER BY name"))
    saved = conn.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
    next_seq = max(last_end or 1, int(saved[0]) if saved else 1)
    # Derived, like the daemon's: every reading and every event took one seq.
    counters["readings"] = readings_total(next_seq, counters.get("events", 0))
    return {
        "records": rows,
        "readings": readings,
        "bytes": body + rows * ROW_OVERHEAD,
        "first_seq": first,
        "next_seq": next_seq,
        "oldest": oldest,
        "sinks": sinks,
        "dead_letters": dlq,
        "counters": counters,
    }
