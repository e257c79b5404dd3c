"""SQLite schema of the durable log and opening a connection with the right pragmas."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gateway.errors import LogCorruptError, LogError

SCHEMA_VERSION = 3

# Schema changes that an older log file is brought up to on open, by the version they lead to.
MIGRATIONS = {
    # v2: dead letters keep their site message key, so a redelivered bad message is
    # recognised like a redelivered good one.
    2: "ALTER TABLE dead_letters ADD COLUMN msg_key INTEGER NOT NULL DEFAULT 0",
    # v3: a row holds a group commit's readings, compressed, with its messages' keys.
    3: "ALTER TABLE records ADD COLUMN codec INTEGER NOT NULL DEFAULT 0; "
       "ALTER TABLE records ADD COLUMN keys BLOB",
}

# records.kind: what a row holds.
KIND_TELEMETRY = 0
KIND_EVENT = 1

# records.codec: how body is stored.
CODEC_RAW = 0
CODEC_ZLIB = 1

# Records cost a little more than their body on disk (row header, rowid, index entries); this
# estimate makes the byte cap track the file's real growth closely enough.
ROW_OVERHEAD = 40

# Page size of new log files. Each group commit rewrites the last, partly filled page of the
# records table (and its parent) in the WAL, and again at the checkpoint: smaller pages
# write fewer bytes per commit at low rates (flash wear), larger ones cost fewer pages per
# row at high rates.
PAGE_SIZE = 1024
# Checkpoint when the WAL holds this many pages (4 MiB of 1 KiB pages): a page rewritten by
# many commits in between reaches the database file once; longer makes the WAL bigger and
# reopening slower. After a checkpoint the WAL file is cut back to JOURNAL_LIMIT bytes, so
# the log's disk use is log.max_bytes plus at most about this much.
WAL_PAGES = 4096
JOURNAL_LIMIT = 4 * 1024 * 1024

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    seq      INTEGER PRIMARY KEY,  -- sequence number of the first reading in the row
    n        INTEGER NOT NULL,     -- readings in the row (seq .. seq+n-1)
    kind     INTEGER NOT NULL,     -- 0 telemetry, 1 event
    created  REAL    NOT NULL,     -- when the row was appended (epoch seconds)
    msg_key  INTEGER NOT NULL,     -- v2 rows: the one site message's key (else 0)
    body     BLOB    NOT NULL,     -- readings as comma-joined JSON objects, each with its seq
    codec    INTEGER NOT NULL DEFAULT 0,  -- 0 body as is, 1 zlib
    keys     BLOB                  -- packed uint64 keys of the site messages in the row
);
CREATE TABLE IF NOT EXISTS cursors (sink TEXT PRIMARY KEY, next_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, value BLOB NOT NULL);  -- e.g. alerts
CREATE TABLE IF NOT EXISTS dead_letters (
    id       INTEGER PRIMARY KEY,
    ts       REAL    NOT NULL,
    topic    TEXT    NOT NULL,
    reason   TEXT    NOT NULL,
    detail   TEXT    NOT NULL,
    size     INTEGER NOT NULL,     -- size of the payload as received
    payload  BLOB    NOT NULL,     -- the payload, truncated to log.dlq_max_payload
    replayed REAL,                 -- when `gateway log replay` sent it again
    msg_key  INTEGER NOT NULL DEFAULT 0  -- as in records (0: not from the site broker)
);
"""


def connect(path: Path, *, synchronous: str = "FULL", readonly: bool = False) -> sqlite3.Connection:
    """Open the log database, creating it when missing (unless readonly)."""
    if readonly and not path.exists():
        raise LogError(f"Log file {str(path)!r} does not exist; check log.path in the config")
    try:
        if readonly:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        if not readonly:
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # new files only
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_PAGES}")
            conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_LIMIT}")
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            conn.executescript(SCHEMA)
            row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) < SCHEMA_VERSION:
                _migrate(conn, int(row[0]))
            elif int(row[0]) != SCHEMA_VERSION:
                raise LogError(
                    f"Log file {str(path)!r} has schema {row[0]}, this gateway reads "
                    f"{SCHEMA_VERSION}; drain it with the older version or move it aside"
                )
        else:
            conn.execute("SELECT count(*) FROM meta").fetchone()
    except sqlite3.OperationalError as err:
        if "locked" in str(err):
            raise LogError(f"Log file {str(path)!r} is locked by another process; is another "
                           "gateway running with the same log.path?") from None
        if "unable to open" in str(err) or "readonly" in str(err):
            raise LogError(f"Log file {str(path)!r} cannot be opened for writing ({err}); "
                           "check log.path and the user the gateway runs as") from None
        raise LogCorruptError(str(path), str(err)) from None
    except sqlite3.DatabaseError as err:
        raise LogCorruptError(str(path), str(err)) from None
    except PermissionError as err:
        raise LogError(f"Log file {str(path)!r}: {err.strerror}; check log.path and "
                       "the user the gateway runs as") from None
    return conn


def _migrate(conn: sqlite3.Connection, version: int) -> None:
    conn.execute("BEGIN")
    for target in range(version + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[target].split("; "):
            conn.execute(statement)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION),))
    conn.execute("COMMIT")
