"""The durable log on its own: appends, cursors, caps, expiry, dead letters, corruption."""

from __future__ import annotations

import random
import sqlite3
import time

import orjson
import pytest

from gateway.config import LogSection
from gateway.errors import LogCorruptError, LogError
from gateway.events import Event
from gateway.ingest.redelivery import TAIL_KEYS, Redeliveries, message_key
from gateway.log.reader import LogReader
from gateway.log.stats import log_stats
from gateway.log.store import LogStore, Message
from gateway.records import DeadLetter, Reason
from tests.tools import open_log

NOW = time.time()


def _msg(i: int, device: str = "d", ts: float = 1000.0) -> Message:
    payload = orjson.dumps({"i": i})
    # Values that compress about as badly as a real sensor's noise (the log compresses).
    noise = random.Random(i)
    return Message("sensors/d/telemetry", payload, message_key("sensors/d/telemetry", payload, i),
                   [(device, ts + i, {"i": i, "pad": 12345.5, "a": noise.random(),
                                      "b": noise.random() * 1e6})], 0.0)


def _redeliveries(store: LogStore) -> Redeliveries:
    """What ingest builds from the log at start."""
    return Redeliveries(store.recent_keys(TAIL_KEYS))


def _append(store: LogStore, seen: Redeliveries, messages: list[Message]) -> None:
    """Append as ingest does: the log keeps the messages, ``seen`` notes their keys."""
    result = store.append(messages, now=NOW)
    seen.logged([m.key for m in messages[:result.accepted]])


def _cfg(tmp_path, **kw) -> LogSection:
    return LogSection(path=tmp_path / "log.db", **kw)


def _bodies(store: LogStore, path) -> list[dict]:
    reader = LogReader(path)
    rows = reader.read(0, max_readings=10**6, max_bytes=10**9)
    reader.close()
    return [orjson.loads(b"[" + r.body + b"]")[k] for r in rows for k in range(r.n)]


def test_append_assigns_consecutive_seqs_and_survives_reopen(tmp_path):
    store = open_log(_cfg(tmp_path), "gw", ["uplink"])
    result = store.append([_msg(i) for i in range(5)], now=NOW)
    assert (result.accepted, result.readings) == (5, 5)
    store.close()
    store = open_log(_cfg(tmp_path), "gw", ["uplink"])
    assert store.next_seq == 6
    store.append([_msg(5)], now=NOW)
    got = _bodies(store, tmp_path / "log.db")
    assert [r["seq"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert [r["i"] for r in got] == list(range(6))
    assert {k: got[0][k] for k in ("seq", "device", "ts", "i", "pad")} == \
        {"seq": 1, "device": "d", "ts": 1000.0, "i": 0, "pad": 12345.5}


def test_cursor_ack_is_durable(tmp_path):
    store = open_log(_cfg(tmp_path), "gw", ["uplink"])
    assert store.cursor("uplink") == 1
    store.append([_msg(i) for i in range(3)], now=NOW)
    store.ack("uplink", 3)
    store.close()
    assert open_log(_cfg(tmp_path), "gw", ["uplink"]).cursor("uplink") == 3


def test_log_belongs_to_one_gateway(tmp_path):
    open_log(_cfg(tmp_path), "gw-a").close()
    with pytest.raises(LogError, match="belongs to gateway 'gw-a'"):
        open_log(_cfg(tmp_path), "gw-b")


def test_corrupt_file_is_a_clear_error(tmp_path):
    (tmp_path / "log.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(LogCorruptError) as info:
        open_log(_cfg(tmp_path), "gw", ["uplink"])
    assert str(tmp_path / "log.db") in str(info.value)
    assert "move it aside" in str(info.value)


def test_drop_oldest_prefers_delivered_then_counts(tmp_path):
    cap = 256 * 1024
    store = open_log(_cfg(tmp_path, max_bytes=cap), "gw", ["uplink"])
    store.cursor("uplink")
    store.append([_msg(i) for i in range(2000)], now=NOW)
    store.ack("uplink", 2001)          # all 2000 delivered
    store.append([_msg(i) for i in range(2000, 4000)], now=NOW)
    assert _file_used(tmp_path) <= cap
    assert store.counters["dropped.cap"] == 0  # only delivered readings made room
    store.append([_msg(i) for i in range(4000, 8000)], now=NOW)
    assert _file_used(tmp_path) <= cap
    dropped = store.counters["dropped.cap"]
    assert dropped > 0
    kept = _bodies(store, tmp_path / "log.db")
    assert kept[-1]["i"] == 7999      # the newest survive
    assert len([r for r in kept if r["seq"] >= 2001]) == 6000 - dropped
    # What was dropped is no longer owed: the depth counts what the sink can still get.
    assert store.snapshot.depth("uplink") == len(kept)


def test_cap_holds_the_real_file_size(tmp_path):
    """The cap is the file, not an estimate of record bytes: fill it many times over with
    rows of every size and the file (database and WAL) stays within the cap and the WAL
    limit."""
    cap = 1024 * 1024
    store = open_log(_cfg(tmp_path, max_bytes=cap), "gw", ["uplink"])
    for round_ in range(40):
        pad = "x" * (round_ * 37 % 900)
        msgs = [Message("sensors/d/telemetry", b"{}", 0,
                        [("d", 1000.0 + i, {"v": float(i), "pad": pad})] * (1 + i % 5), 0.0)
                for i in range(200)]
        store.append(msgs, now=NOW)
        assert _file_used(tmp_path) <= cap
    store.close()
    assert (tmp_path / "log.db").stat().st_size <= cap + 64 * 1024


def _file_used(tmp_path) -> int:
    import sqlite3

    conn = sqlite3.connect(tmp_path / "log.db")
    pages, free, size = (conn.execute(f"PRAGMA {p}").fetchone()[0]
                         for p in ("page_count", "freelist_count", "page_size"))
    conn.close()
    return (pages - free) * size


def test_refuse_accepts_a_prefix_then_nothing(tmp_path):
    store = open_log(_cfg(tmp_path, max_bytes=256 * 1024, when_full="refuse"), "gw", ["uplink"])
    store.cursor("uplink")
    result = store.append([_msg(i) for i in range(8000)], now=NOW)
    assert 0 < result.accepted < 8000
    assert store.full
    assert store.append([_msg(5000)], now=NOW).accepted == 0
    assert store.counters["full_episodes"] == 1
    store.ack("uplink", store.next_seq)  # the sink caught up: delivered rows can go
    assert store.append([_msg(5001)], now=NOW).accepted == 1
    assert not store.full


def test_dead_letters_are_stored_bounded_and_counted(tmp_path):
    store = open_log(_cfg(tmp_path, dlq_max_rows=3, dlq_max_payload=8), "gw", ["uplink"])
    bad = [Message("t/x", b"0123456789abcdef", 1, DeadLetter(Reason.BAD_JSON, "not JSON"), 5.0)
           for _ in range(5)]
    result = store.append(bad, now=NOW)
    assert result.dead_letters == 5
    stats = log_stats(store._conn)
    assert stats["dead_letters"] == {"bad_json": 3}
    assert store.counters["dead_letters.bad_json"] == 5
    assert store.counters["dead_letters_evicted"] == 2
    size, payload = store._conn.execute("SELECT size, payload FROM dead_letters").fetchone()
    assert (size, payload) == (16, b"01234567")


def test_expiry_drops_old_records_and_counts_undelivered(tmp_path):
    store = open_log(_cfg(tmp_path, max_age=60), "gw", ["uplink"])
    store.cursor("uplink")
    store.append([_msg(i) for i in range(10)], now=NOW - 100)
    store.ack("uplink", 5)             # 4 delivered, 6 not
    store.append([_msg(i) for i in range(10, 12)], now=NOW)
    store.housekeeping(now=NOW, force=True)
    assert store.counters["dropped.age"] == 6
    assert [r["i"] for r in _bodies(store, tmp_path / "log.db")] == [10, 11]


def test_redelivery_is_recognised_by_packet_id_whatever_the_window(tmp_path):
    """A broker with an unlimited in-flight window (Mosquitto max_inflight_messages 0) may
    redeliver any of 65535 messages: each is recognised, before and after a restart, dead
    letters too; a new message that reuses a packet id with other content is not."""
    store = open_log(_cfg(tmp_path), "gw", ["uplink"])
    seen = _redeliveries(store)
    msgs = [_msg(i) for i in range(1, 5001)]
    bad = [Message("t/x", b"\xff", message_key("t/x", b"\xff", 6000 + i),
                   DeadLetter(Reason.BAD_JSON, "not JSON"), 5.0) for i in range(3)]
    _append(store, seen, msgs + bad)
    assert all(seen.is_redelivery(m.key) for m in msgs + bad)
    assert all(seen.is_redelivery(m.key) for m in msgs[:10])  # redelivered twice
    store.close()
    store = open_log(_cfg(tmp_path), "gw", ["uplink"])
    seen = _redeliveries(store)
    assert all(seen.is_redelivery(m.key) for m in msgs + bad)
    # Packet id 7 reused (its PUBACK went through) for a new message, then redelivered.
    payload = b'{"i":70}'
    new = Message("sensors/d/telemetry", payload, message_key("sensors/d/telemetry", payload, 7),
                  [("d", 5000.0, {"i": 70})], 0.0)
    assert not seen.is_redelivery(new.key)
    _append(store, seen, [new])
    assert seen.is_redelivery(new.key)
    assert not seen.is_redelivery(msgs[6].key)       # the older use of id 7


def test_seq_never_goes_back_after_everything_was_removed(tmp_path):
    store = open_log(_cfg(tmp_path, max_age=60), "gw", ["uplink"])
    store.append([_msg(i) for i in range(10)], now=NOW - 100)
    store.housekeeping(now=NOW, force=True)      # all expired
    store.close()
    store = open_log(_cfg(tmp_path, max_age=60), "gw", ["uplink"])
    assert store.next_seq == 11


def test_full_disk_is_survived_and_reported(tmp_path, caplog):
    """SQLite's own "database or disk is full" (max_page_count stands in for the disk)."""
    store = open_log(_cfg(tmp_path), "gw", ["uplink"])
    store.append([_msg(0)], now=NOW)
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count = {pages + 2}")
    results = [store.append([_msg(i) for i in range(k * 200, k * 200 + 200)], now=NOW)
               for k in range(1, 6)]
    assert any(r.accepted == 0 for r in results)      # refused, not raised
    assert store.full
    assert store.counters["full_episodes"] == 1
    assert caplog.text.count("Log full (disk is full)") == 1
    kept = _bodies(store, tmp_path / "log.db")
    assert [r["seq"] for r in kept] == list(range(1, len(kept) + 1))  # nothing half-written
    store._conn.execute("PRAGMA max_page_count = 1000000")   # space again
    store._retention._disk_retry_at = 0.0
    store.housekeeping(force=True)
    assert not store.full
    assert store.append([_msg(9999)], now=NOW).accepted == 1


def test_a_removed_sink_does_not_pin_the_log(tmp_path, caplog):
    store = open_log(_cfg(tmp_path, max_bytes=256 * 1024, when_full="refuse"), "gw", ["uplink"])
    store.cursor("uplink")
    store.close()
    store = open_log(_cfg(tmp_path, max_bytes=256 * 1024, when_full="refuse"), "gw", [])
    assert "not configured" in caplog.text
    for k in range(20):  # 10x the cap: nothing waits for the removed sink
        assert store.append([_msg(i) for i in range(k * 1000, k * 1000 + 1000)],
                            now=NOW).accepted == 1000
    assert not store.full


def test_component_state_survives_a_restart(tmp_path):
    store = open_log(_cfg(tmp_path), "gw", ["uplink"])
    assert store.load_state("alerts") is None
    store.save_state("alerts", b'{"TooHot/gh-1": "firing"}')
    store.save_state("alerts", b'{"TooHot/gh-1": "resolved"}')
    store.close()
    assert open_log(_cfg(tmp_path), "gw", ["uplink"]).load_state("alerts") == \
        b'{"TooHot/gh-1": "resolved"}'


def test_events_get_seqs_between_readings(tmp_path):
    from gateway.events import Event

    store = open_log(_cfg(tmp_path), "gw", ["uplink"])
    store.append([_msg(0)], now=NOW)
    assert store.append_events([Event("io.fieldgate.test", "d", NOW), Event("x", "d", NOW)],
                               now=NOW) == [2, 3]
    store.append([_msg(1)], now=NOW)
    assert store.next_seq == 5


def test_full_disk_while_logging_events_and_state_is_survived(tmp_path):
    from gateway.events import Event

    store = open_log(_cfg(tmp_path), "gw", ["uplink"])
    store.append([_msg(0)], now=NOW)
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count = {pages}")
    big = {"pad": "x" * 20_000}
    assert store.append_events([Event("io.fieldgate.test", "d", NOW, big)] * 5, now=NOW) == []
    store.save_state("engine", b"y" * 50_000)
    assert store.full
    assert store.counters["dropped.disk_full_events"] == 5
    assert store.counters["state_saves_failed"] == 1


def test_an_idle_log_writes_nothing(tmp_path):
    """Housekeeping on an idle gateway must not write (each write is flash wear and, with
    synchronous=FULL, an fsync): only moved cursors, expiry and counted drops are written."""
    store = open_log(_cfg(tmp_path), "gw", ["uplink"])
    store.cursor("uplink")
    store.append([_msg(i) for i in range(10)], now=NOW)
    store.ack("uplink", 5)
    store.housekeeping(force=True)           # the moved cursor is saved once
    changes = store._conn.total_changes
    for _ in range(5):
        store.housekeeping(force=True)
    assert store._conn.total_changes == changes
    wal = tmp_path / "log.db-wal"
    size = wal.stat().st_size
    store.housekeeping(force=True)
    assert wal.stat().st_size == size


def test_housekeeping_survives_a_clock_step_back(tmp_path, monkeypatch):
    """Housekeeping runs on the monotonic clock: after the wall clock steps back an hour
    (NTP on a Pi without RTC), a full log under refuse still reopens once sinks caught up."""
    import gateway.log.store as store_mod

    wall = [NOW]
    mono = [1000.0]
    monkeypatch.setattr(store_mod.time, "time", lambda: wall[0])
    monkeypatch.setattr(store_mod.time, "monotonic", lambda: mono[0])
    store = open_log(_cfg(tmp_path, max_bytes=256 * 1024, when_full="refuse"), "gw", ["uplink"])
    store.cursor("uplink")
    store.append([_msg(i) for i in range(8000)])
    assert store.full
    store.housekeeping()
    wall[0] -= 3600                          # the clock steps back
    mono[0] += 5
    store.ack("uplink", store.next_seq)      # the sink caught up
    store.housekeeping()
    assert not store.full


def test_counters_agree_with_the_data_after_a_crash(tmp_path):
    """Dead-letter and drop counters are committed with the rows they count, and the
    readings total is derived from seq: reopening without a clean close loses none."""
    store = open_log(_cfg(tmp_path), "gw", ["uplink"])
    bad = [Message("t/x", b"{", 0, DeadLetter(Reason.BAD_JSON, "not JSON"), 5.0)] * 3
    store.append([_msg(i) for i in range(1, 101)] + bad, now=NOW)
    # No close(), no housekeeping: as if SIGKILLed right after the commit.
    again = open_log(_cfg(tmp_path), "gw", ["uplink"])
    assert again.counters["readings"] == 100
    assert again.counters["dead_letters.bad_json"] == 3
    assert log_stats(again._conn)["counters"]["readings"] == 100


def test_events_and_state_commit_together_or_not_at_all(tmp_path):
    """A rule tick logs its events and saves alert and command state in one commit: when
    the state cannot be written (a fault injected by a trigger), the events are not in the
    log either, so a restart cannot see "fired" without the state that says so."""
    from gateway.events import Event

    store = open_log(_cfg(tmp_path), "gw", ["uplink"])
    fired = Event("io.fieldgate.alert.fired", "d", NOW, {"rule": "Hot"})
    assert store.append_events_with_state([fired], [("engine", b"1"), ("commands", b"a")],
                                          now=NOW) == [1]
    assert store.load_state("engine") == b"1" and store.load_state("commands") == b"a"
    store._conn.execute("CREATE TRIGGER fault BEFORE INSERT ON state "
                        "BEGIN SELECT RAISE(FAIL, 'database or disk is full'); END")
    assert store.append_events_with_state([fired], [("engine", b"2")], now=NOW) == []
    assert store.load_state("engine") == b"1"
    assert [r.seq for r in LogReader(tmp_path / "log.db").read(
        0, max_readings=10, max_bytes=10**6)] == [1]
    assert store.counters["state_saves_failed"] == 1


def test_the_wal_is_bounded(tmp_path):
    """The WAL is checkpointed and cut back, so the log's disk use is the cap plus a bound."""
    from gateway.log.schema import JOURNAL_LIMIT, WAL_PAGES

    store = open_log(_cfg(tmp_path, max_bytes=64 * 1024 * 1024), "gw", ["uplink"])
    wal = tmp_path / "log.db-wal"
    biggest = 0
    for k in range(100):
        store.append([_msg(i) for i in range(k * 1000, k * 1000 + 1000)], now=NOW)
        biggest = max(biggest, wal.stat().st_size)
    assert (tmp_path / "log.db").stat().st_size > 1024 * 1024  # checkpoints happened
    assert biggest <= max(JOURNAL_LIMIT, (WAL_PAGES + 200) * 1080)


def test_a_commit_is_one_compressed_row_read_back_in_any_slices(tmp_path):
    """A group commit is stored as compressed rows; readers get exactly the readings they
    ask for, whatever the bounds and wherever a cursor falls inside a row."""
    store = open_log(_cfg(tmp_path), "gw", ["uplink"])
    msgs = [_msg(i) for i in range(3000)]
    store.append(msgs, now=NOW)
    rows = store._conn.execute("SELECT n, codec, length(body) FROM records").fetchall()
    assert len(rows) <= 3 and all(codec == 1 for _, codec, _ in rows)
    raw = sum(len(orjson.dumps({"seq": 1, "device": "d", "ts": 1.0, **m.outcome[0][2]}))
              for m in msgs)
    assert sum(size for *_, size in rows) < raw / 2
    reader = LogReader(tmp_path / "log.db")
    seq, got = 1, []
    for bound in [1, 7, 500, 1, 2000, 3000]:
        batch = reader.read(seq, max_readings=bound, max_bytes=10**9)
        readings = [r for row in batch for r in orjson.loads(b"[" + row.body + b"]")]
        assert len(readings) == min(bound, 3001 - seq) == sum(row.n for row in batch)
        assert [r["seq"] for r in readings] == list(range(seq, seq + len(readings)))
        got += readings
        seq += len(readings)
    assert [r["i"] for r in got] == list(range(3000))
    small = reader.read(10, max_readings=10**6, max_bytes=300)
    assert small[0].seq == 10 and sum(row.n for row in small) >= 1
    assert sum(len(row.body) + 1 for row in small) <= 300
    between = reader.between(1500, 1510)
    assert [r["seq"] for row in between for r in orjson.loads(b"[" + row.body + b"]")] == \
        list(range(1500, 1510))


def test_a_log_written_by_the_previous_version_is_upgraded_and_read(tmp_path):
    """A v1 log file (one uncompressed row per site message, no dead-letter keys) opens,
    is migrated in place, and its rows are forwarded and recognised as before."""
    import sqlite3

    old = sqlite3.connect(tmp_path / "log.db", isolation_level=None)
    old.executescript(OLD_SCHEMA)
    old.execute("INSERT INTO meta VALUES ('schema', '1'), ('gateway_id', 'gw')")
    key = message_key("sensors/d/telemetry", b"[1,2]", 42)
    old.execute("INSERT INTO records VALUES (1, 2, 0, ?, ?, ?)", (NOW, key,
                b'{"seq":1,"device":"d","ts":1.0,"v":1},{"seq":2,"device":"d","ts":2.0,"v":2}'))
    old.close()
    store = open_log(_cfg(tmp_path), "gw", ["uplink"])
    assert _redeliveries(store).is_redelivery(key)
    store.append([_msg(7)], now=NOW)
    assert [r["seq"] for r in _bodies(store, tmp_path / "log.db")] == [1, 2, 3]
    assert LogReader(tmp_path / "log.db").read(2, max_readings=1, max_bytes=10**6)[0].body == \
        b'{"seq":2,"device":"d","ts":2.0,"v":2}'


# The schema of a v1 log file, as the first release wrote it.
OLD_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE records (seq INTEGER PRIMARY KEY, n INTEGER NOT NULL, kind INTEGER NOT NULL,
    created REAL NOT NULL, msg_key INTEGER NOT NULL, body BLOB NOT NULL);
CREATE TABLE cursors (sink TEXT PRIMARY KEY, next_seq INTEGER NOT NULL);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE state (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE dead_letters (id INTEGER PRIMARY KEY, ts REAL NOT NULL, topic TEXT NOT NULL,
    reason TEXT NOT NULL, detail TEXT NOT NULL, size INTEGER NOT NULL, payload BLOB NOT NULL,
    replayed REAL);
"""


def test_an_identical_message_a_whole_packet_id_cycle_later_is_not_a_redelivery(tmp_path):
    """A door sensor that always sends "0": after 65,535 messages the broker reuses packet
    ids for the same bytes. A DUP of an unlogged message must not match the id's use a
    whole cycle back; a DUP of one logged in the last commits still matches, across a
    restart too."""
    store = open_log(_cfg(tmp_path), "gw", ["uplink"])

    def door(mid: int) -> Message:
        return Message("sensors/door/open", b"0", message_key("sensors/door/open", b"0", mid),
                       [("door", 1000.0 + mid, {"open": 0})], 0.0)

    total = 70_000
    seen = _redeliveries(store)
    for start in range(0, total, 5000):
        _append(store, seen, [door(i % 65535 + 1) for i in range(start, start + 5000)])
    unlogged = door(total % 65535 + 1)      # the next one; its id was last used 65,535 ago
    recent = door((total - 3) % 65535 + 1)  # logged three messages ago
    assert not seen.is_redelivery(unlogged.key)
    assert seen.is_redelivery(recent.key)
    store.close()
    seen = _redeliveries(open_log(_cfg(tmp_path), "gw", ["uplink"]))
    assert not seen.is_redelivery(unlogged.key)
    assert seen.is_redelivery(recent.key)


def _same_reads(store: LogStore, path, starts: range, bounds: list[tuple[int, int]]) -> int:
    """Reads through the writer's recent rows equal reads of the file, for every start and
    bound; returns how many reads the recent rows answered without the file."""
    memory = LogReader(path, recent=store.recent)
    disk = LogReader(path)
    answered = 0
    for start in starts:
        for max_readings, max_bytes in bounds:
            kept = store.recent.since(start, max_readings)
            got = memory.read(start, max_readings=max_readings, max_bytes=max_bytes)
            assert got == disk.read(start, max_readings=max_readings, max_bytes=max_bytes), \
                (start, max_readings, max_bytes)
            answered += kept is not None
    memory.close()
    disk.close()
    return answered


def test_the_rows_just_committed_are_read_from_memory_exactly_as_from_the_file(tmp_path):
    """The uplink reads what the last commits wrote from the writer's memory (no query, no
    decompression); whatever the start and the bounds, it gets what the file holds, also
    after events, expiry and a trim at the cap made the memory start again."""
    path = tmp_path / "log.db"
    store = open_log(_cfg(tmp_path, max_age=60, max_bytes=256 * 1024), "gw", ["uplink"])
    bounds = [(1, 10**9), (3, 10**9), (500, 10**9), (10**6, 300), (10**6, 10**9)]
    store.append([_msg(i) for i in range(40)], now=NOW - 100)
    store.append([_msg(i) for i in range(40, 45)], now=NOW)
    assert _same_reads(store, path, range(1, 47), bounds) == 45 * len(bounds)
    # An event is not telemetry: the memory starts again with the next commit.
    store.append_events([Event("io.fieldgate.test", "d", NOW)], now=NOW)
    store.append([_msg(i) for i in range(45, 50)], now=NOW)
    assert _same_reads(store, path, range(1, 53), bounds) == 5 * len(bounds)
    store.ack("uplink", 30)
    store.housekeeping(now=NOW, force=True)    # expires the first commit's 40 readings
    assert _same_reads(store, path, range(1, 53), bounds) == 0
    i = 50
    while not store.counters["dropped.cap"] and i < 100_000:   # to the cap: trimmed
        store.append([_msg(j) for j in range(i, i + 200)], now=NOW)
        i += 200
    assert store.counters["dropped.cap"] > 0
    trimmed = store.next_seq
    assert _same_reads(store, path, range(trimmed - 120, trimmed + 1), bounds) == 0
    store.append([_msg(j) for j in range(i, i + 50)], now=NOW)   # below the cap again
    assert _same_reads(store, path, range(trimmed - 120, trimmed + 51), bounds) \
        == 50 * len(bounds)


def test_moved_cursors_ride_on_a_due_commit(tmp_path):
    """Cursors are made durable about once a second; a commit due then carries them, so a
    gateway under load syncs once per group commit and not once more for the cursors."""
    store = open_log(_cfg(tmp_path), "gw", ["uplink"])
    store.cursor("uplink")
    store.append([_msg(i) for i in range(3)], now=NOW)
    store.housekeeping(now=NOW, force=True)
    store.ack("uplink", 3)
    store._last_housekeeping = -1e9            # a second has passed since the last save
    store.append([_msg(3)], now=NOW)
    saved = LogReader(tmp_path / "log.db")._conn.execute(
        "SELECT next_seq FROM cursors WHERE sink = 'uplink'").fetchone()
    assert saved == (3,)


def test_a_read_steps_through_the_rows_it_returns_however_long_the_log(tmp_path):
    """A batch read from a long backlog (the drain after an outage) steps through the rows
    that make the batch, not through as many rows as the batch has readings: that fetched
    (and paid for) up to 500 rows of 100 readings for each 500-reading batch."""
    def sqlite_steps(commits: int) -> int:
        path = tmp_path / f"log-{commits}.db"
        store = open_log(LogSection(path=path), "gw", ["uplink"])
        for c in range(commits):
            store.append([_msg(c * 100 + i) for i in range(100)], now=NOW)
        store.close()
        conn = sqlite3.connect(path)
        steps = [0]

        def count() -> int:
            steps[0] += 1
            return 0
        conn.set_progress_handler(count, 1)
        rows = LogReader(None, conn=conn).read(1, max_readings=250, max_bytes=10**9)
        assert sum(row.n for row in rows) == 250
        conn.close()
        return steps[0]

    assert sqlite_steps(400) <= 1.5 * sqlite_steps(4)
