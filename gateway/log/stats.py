"""What `gateway log stats` shows: depth per sink, bytes, oldest undelivered, dead letters."""

from __future__ import annotations

import sqlite3
from typing import Any

from gateway.log.schema import ROW_OVERHEAD


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
    return {
        "records": rows,
        "readings": readings,
        "bytes": body + rows * ROW_OVERHEAD,
        "first_seq": first,
        "next_seq": last_end,
        "oldest": oldest,
        "sinks": sinks,
        "dead_letters": dlq,
        "counters": counters,
    }
