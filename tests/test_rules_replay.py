"""`gateway rules replay` (issue 8): labels and config as in production, the live engine's
tolerances on a clock that one skewed timestamp cannot move, duplicates counted once, the
vectorised JSONL decoder agreeing with the plain one, and the summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.engine.replay import Replay, columns_of, replay, replay_clock
from gateway.recorded import _bulk, _from_rows, _jsonl_rows, _scan, decode_jsonl, read_columns
from gateway.rulefiles import load_rule_files
from tests.test_rules_cli import gateway

ROOT = Path(__file__).resolve().parents[1]
GREENHOUSE = ROOT / "rules" / "greenhouse.yaml"
T0 = 1_800_000_000.0


def greenhouse_record(path: Path, *, skew_at: int | None = None, seconds: int = 300,
                      devices: int = 10) -> Path:
    """gh-0..: every 5 s; gh-0 and gh-1 run hot (33 °C) after a minute."""
    rng = np.random.default_rng(3)
    lines = []
    for s in range(0, seconds, 5):
        for d in range(devices):
            temp = 33.0 if d < 2 and s >= 60 else 22.0
            lines.append({"device": f"gh-{d}", "ts": round(T0 + s + rng.uniform(0, 1), 3),
                          "temp": round(temp + rng.normal(0, 0.2), 2), "hum": 50.0})
    if skew_at is not None:
        # the emulator's `skew` fault: one reading stamped an hour ahead
        lines.insert(skew_at, {"device": "gh-5", "ts": T0 + 3600 + skew_at / 10,
                               "temp": 99.0, "hum": 50.0})
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    return path


def events_of(out: str) -> list[dict]:
    return [orjson.loads(line) for line in out.splitlines()]


def fired_devices(events: list[dict], rule: str = "TooHot") -> set[str]:
    return {e["device"] for e in events
            if e["type"] == "io.fieldgate.alert.fired" and e["rule"] == rule}


def test_readme_example_fires_once_devices_have_labels(tmp_path):
    rec = greenhouse_record(tmp_path / "gh.jsonl")
    bare = gateway("rules", "replay", "--rules", str(GREENHOUSE), "--input", str(rec),
                   "--format", "jsonl")
    assert bare.returncode == 0, bare.stderr
    assert events_of(bare.stdout) == []  # the group matches zone=north: no labels, no match
    out = gateway("rules", "replay", "--rules", str(GREENHOUSE), "--labels",
                  "gh-*=zone:north", "--input", str(rec), "--format", "jsonl")
    assert out.returncode == 0, out.stderr
    assert fired_devices(events_of(out.stdout)) == {"gh-0", "gh-1"}
    bad = gateway("rules", "replay", "--rules", str(GREENHOUSE), "--labels", "gh-*",
                  "--input", str(rec))
    assert bad.returncode == 2 and "DEVICE-GLOB=key:value" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_config_gives_rules_labels_and_interval(tmp_path):
    rec = greenhouse_record(tmp_path / "gh.jsonl")
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(yaml.safe_dump({
        "gateway_id": "g", "log": {"path": str(tmp_path / "l.db")},
        "rules": [str(GREENHOUSE)], "device_labels": {"gh-1": {"zone": "north"}},
        "engine": {"tick": "5s"}}))
    out = gateway("rules", "replay", "--config", str(cfg), "--input", str(rec),
                  "--format", "jsonl")
    assert out.returncode == 0, out.stderr
    events = events_of(out.stdout)
    assert fired_devices(events) == {"gh-1"}
    assert all(e["time"] % 5 == 0 for e in events)  # the config's tick, not 1 s
    # --labels add to the config's labels
    out = gateway("rules", "replay", "--config", str(cfg), "--labels", "gh-0=zone:north",
                  "--input", str(rec), "--format", "jsonl")
    assert fired_devices(events_of(out.stdout)) == {"gh-0", "gh-1"}
    none = gateway("rules", "replay", "--input", str(rec))
    assert none.returncode == 2 and "no rules" in none.stderr


def test_one_skewed_timestamp_is_set_aside_not_followed(tmp_path):
    """Issue 8: one reading stamped 1 h ahead moved the replay clock an hour: ~300 later
    readings were dropped as late, every device went offline, and the 99 °C fired."""
    clean = greenhouse_record(tmp_path / "clean.jsonl")
    skewed = greenhouse_record(tmp_path / "skewed.jsonl", skew_at=150)
    args = ["rules", "replay", "--rules", str(GREENHOUSE), "--labels", "gh-*=zone:north",
            "--format", "jsonl", "--input"]
    want = gateway(*args, str(clean))
    got = gateway(*args, str(skewed))
    assert got.returncode == 0, got.stderr
    assert events_of(got.stdout) == events_of(want.stdout)
    summary = orjson.loads(got.stderr.strip().splitlines()[-1])
    assert summary["type"] == "summary"
    assert summary["set_aside"] == {"late": 0, "future": 2, "duplicate": 0,
                                    "unused_metric": 0, "too_many_devices": 0}
    assert summary["values"] == summary["values_used"] + 2


def test_replay_clock_follows_gaps_but_not_outliers():
    ts = 1000.0 + np.arange(200.0)
    ts[40] += 3600  # one skewed reading
    ts[120:] += 7200  # a real gap: the recording paused two hours
    clock = replay_clock(ts)
    assert np.all(np.diff(clock) >= 0)
    expected = ts.copy()
    expected[40] = ts[41]  # the skewed one is ingested at its neighbours' time (median)
    assert np.array_equal(clock, expected)
    assert replay_clock(np.array([5.0])).tolist() == [5.0]


def test_duplicates_in_a_recording_count_once(tmp_path):
    groups = load_rule_files([GREENHOUSE])
    rows = [(f"gh-{d}", T0 + s, {"temp": 31.0}) for s in range(0, 120, 5) for d in range(2)]
    run = Replay(groups, labels=[("gh-*", {"zone": "north"})])
    twice = [r for row in rows for r in (row, row)]
    list(run.feed(columns_of(twice)))
    list(run.finish())
    assert run.summary.drops.duplicate == len(rows)
    assert run.summary.used == len(rows)


def test_summary_table_lists_events_per_rule(tmp_path):
    rec = greenhouse_record(tmp_path / "gh.jsonl", skew_at=10)
    out = gateway("rules", "replay", "--rules", str(GREENHOUSE), "--labels",
                  "gh-*=zone:north", "--input", str(rec))
    assert out.returncode == 0, out.stderr
    tail = out.stdout.strip().splitlines()
    assert any(line.startswith("readings   601 (1202 values)") for line in tail)
    assert "used       1200 values" in tail
    assert "set aside  0 late, 2 future, 0 duplicate, 0 unused metric, 0 too many devices" in tail
    assert "events     greenhouse/TooHot: command 2, fired 2" in tail


def test_replay_api_keeps_its_shape():
    groups = load_rule_files([ROOT / "rules" / "machines.yaml"])
    readings = [("press-1", 1000.0 + 10 * i, {"current": v})
                for i, v in enumerate([10, 25, 10, 10, 10, 10, 10, 10, 10])]
    kinds = [(e.time, str(e.kind)) for e in replay(groups, readings, interval=10)]
    assert kinds == [(1010.0, "fired"), (1010.0, "command"), (1070.0, "resolved")]


# -- the decoder ------------------------------------------------------------------------

names = st.text(st.characters(codec="utf-8", exclude_characters='"\\\n\r'), min_size=1,
                max_size=12)
values = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False,
                                                         allow_infinity=False, width=32),
                   st.booleans(), st.none())


@st.composite
def jsonl(draw: st.DrawFn) -> bytes:
    out = []
    for _ in range(draw(st.integers(1, 12))):
        row: dict = {"device": draw(names), "ts": draw(st.floats(0, 1e10))}
        for _ in range(draw(st.integers(0, 4))):
            row[draw(names.filter(lambda k: k not in ("device", "ts", "seq")))] = draw(values)
        if draw(st.booleans()):
            row["seq"] = draw(st.integers(0, 100))
        items = list(row.items())
        if draw(st.booleans()):
            items.reverse()
        sep = draw(st.sampled_from([",", ", ", " ,\t"]))
        colon = draw(st.sampled_from([":", ": ", " : "]))
        out.append("{" + sep.join(f"{orjson.dumps(k).decode()}{colon}"
                                  f"{orjson.dumps(v).decode()}" for k, v in items) + "}")
        if draw(st.integers(0, 5)) == 0:
            out.append("")
    return ("\n".join(out) + draw(st.sampled_from(["\n", "", "\r\n"]))).encode()


def as_readings(cols) -> list:
    out = []
    for i in range(cols.readings):
        vals = {cols.metrics[m]: v for r, m, v in zip(cols.row.tolist(), cols.metric.tolist(),
                                                     cols.value.tolist(), strict=True) if r == i}
        out.append((cols.devices[cols.device[i]], float(cols.ts[i]), vals))
    return out


@settings(max_examples=300, deadline=None)
@given(jsonl())
def test_bulk_decoder_agrees_with_the_plain_one(data):
    plain = as_readings(_from_rows(_jsonl_rows(data, "f", 1)))
    assert as_readings(decode_jsonl(data, "f")) == plain
    bulk = _bulk(data)
    if bulk is not None:
        assert as_readings(bulk) == plain


def test_bulk_decoder_takes_emulator_records_and_refuses_what_it_cannot_vouch_for(tmp_path):
    line = b'{"device":"gh-1","ts":1732600000.123,"temp":21.4,"hum":40.2,"door":true}\n'
    assert _bulk(line * 3) is not None
    for odd in (b'{"device":"a","ts":1,"t":[1]}\n', b'{"device":"a","ts":1,"t":1 2}\n',
                b'{"device":"a","ts":"2026-01-01T00:00:00Z"}\n', b'{"device":"a"}\n',
                b'[1]\n', b'{"device":"a","ts":1e12}\n', line + b'\n' + line):
        assert _bulk(odd) is None, odd
    rec = tmp_path / "r.jsonl"
    rec.write_bytes(line + b'{"device": "gh-2", "ts": "soon"}\n')
    with pytest.raises(ValueError, match=r":2: ts 'soon' is not epoch seconds nor RFC 3339$"):
        list(read_columns(rec))


numbers = st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                    st.floats(-1e6, 1e6).map(lambda x: round(x, 3)),
                    st.integers(-10**17, 10**17), st.booleans(), st.none())


@st.composite
def records(draw: st.DrawFn) -> bytes:
    """What `devices simulate --record` writes: compact lines, one layout."""
    keys = draw(st.lists(names.filter(lambda k: k not in ("device", "ts", "seq", "gateway")),
                         max_size=4, unique=True))
    lines = []
    for _ in range(draw(st.integers(1, 20))):
        row: dict = {"device": draw(names), "ts": draw(st.one_of(
            st.floats(0, 1e10), st.floats(0, 1e10).map(lambda x: round(x, 3)),
            st.integers(0, 10**10)))}
        row.update({k: draw(numbers) for k in keys})
        lines.append(orjson.dumps(row) + b"\n")
    return b"".join(lines)


@settings(max_examples=300, deadline=None)
@given(records())
def test_scan_agrees_with_the_plain_decoder(data):
    plain = as_readings(_from_rows(_jsonl_rows(data, "f", 1)))
    scan = _scan(data)
    if b" " not in data and b"\\" not in data:  # no spaces, no escapes: the scan's case
        assert scan is not None
    if scan is not None:
        assert as_readings(scan) == plain
        assert scan.devices == list(dict.fromkeys(r[0] for r in plain))


def test_scan_reads_records_and_refuses_what_is_not_json():
    line = b'{"device":"gh-1","ts":1732600000.123,"temp":-21.4,"hum":null,"door":true}\n'
    cols = _scan(line * 2 + line.replace(b"gh-1", b"gh-2"))
    assert cols is not None and cols.devices == ["gh-1", "gh-2"]
    assert cols.value.tolist() == [-21.4, 1.0] * 3 and cols.metrics == ["temp", "hum", "door"]
    for bad in (b"01", b"+1", b"1.", b".5", b"-", b"1e", b"nan", b"Infinity", b"1_0", b"tru",
                b'"1"', b"1-2"):
        odd = line + line.replace(b"-21.4", bad)
        assert _scan(odd) is None, bad
        if bad != b'"1"':  # a number in a string is read by the plain decoder
            with pytest.raises(ValueError, match=":2: "):
                decode_jsonl(odd, "f")  # the plain decoder words the error
    assert _scan(line + line.replace(b'"hum"', b'"hun"')) is None  # another layout
    # Lines are found from the quotes: a newline between tokens (JSON whitespace) or in a
    # number never passes for a line end, nor does a line with a key of another length.
    for cut in (b'"gh-1",', b'"ts":', b"-21.4", b":null,", b"true"):
        broken = line.replace(cut, cut[:2] + b"\n" + cut[2:])
        assert _scan(line + broken) is None, broken
        assert _scan(broken + line) is None, broken
    assert _scan(line + line.replace(b'"door"', b'"doors"')) is None
    for name in (b"gh\x01", b"g\x1fh-1-long-name", b""):  # control characters, empty
        assert _scan(line + line.replace(b"gh-1", name)) is None, name
    long = _scan(line + line.replace(b"gh-1", b"greenhouse-1"))
    assert long is not None and long.devices == ["gh-1", "greenhouse-1"]
    assert _scan(line + line.replace(b"-21.4", b"1e3")).value.tolist()[2] == 1000.0


def test_chunks_split_at_line_ends(tmp_path):
    rec = greenhouse_record(tmp_path / "gh.jsonl", seconds=60, devices=3)
    whole = as_readings(next(read_columns(rec)))
    pieces = [r for cols in read_columns(rec, chunk_bytes=100) for r in as_readings(cols)]
    assert pieces == whole and len(whole) == 36


# -- the staged (fast) path against tick by tick -------------------------------------------

FAULT_RULES = """
groups:
  - name: north
    match: {device: "d-*", labels: {zone: north}}
    rules:
      - alert: Hot
        expr: avg(temp, 20s) > 25
        clear: avg(temp, 20s) < 23
        for: 4s
        actions: [{on: fire, command: {device: "{device}", action: fan}, cooldown: 30s}]
      - {alert: Silent, expr: "absent(temp, 8s)"}
      - {alert: Flaky, expr: "temp > 26", flapping: {transitions: 3, window: 60s}}
  - name: all
    match: {device: "*"}
    rules:
      - {alert: Busy, expr: "count(temp, 10s) > 6"}
      - {alert: Draw, expr: "rate(energy, 30s) > 0.8 or delta(energy, 1m) < 0"}
      - {alert: Odd, expr: "zscore(temp, 2m) > 2 and std(hum, 1m) > 1"}
      - {alert: Peak, expr: "max(temp, 1h) - min(temp, 5m) > 9 and sum(door, 30s) >= 2"}
      - {alert: Dry, expr: "hum < 42 and last(temp, 30s) > 20"}
"""


def faulty_record(path: Path, seed: int) -> Path:
    """Readings of 12 devices with the emulator's faults: skewed clocks, gaps, late and
    repeated readings, missing metrics, bools and nulls."""
    rng = np.random.default_rng(seed)
    lines: list[dict] = []
    energy = np.zeros(12)
    for s in range(600):
        if 200 <= s < 260:
            continue  # the whole site is silent for a minute
        for d in range(12):
            if rng.random() < 0.3 or (d == 3 and 300 <= s < 340):
                continue
            energy[d] = 0.0 if rng.random() < 0.003 else energy[d] + rng.uniform(0, 1.2)
            row: dict = {"device": f"d-{d}", "ts": round(T0 + s + float(rng.uniform(0, 1)), 3),
                         "temp": round(float(24 + 3 * np.sin(s / 40 + d) + rng.normal(0, 1)), 2),
                         "hum": None if rng.random() < 0.1 else
                         round(float(45 + rng.normal(0, 3)), 1),
                         "energy": round(float(energy[d]), 3)}
            if d % 4 == 0:
                row["door"] = bool(rng.random() < 0.2)
            if rng.random() < 0.01:
                row["ts"] += 3600 * int(rng.choice([1, -1]))  # a skewed device clock
            if rng.random() < 0.01:
                row["ts"] -= 40  # late: past the 30 s tolerance
            lines.append(row)
            if rng.random() < 0.02:
                lines.append(dict(row))  # republished at once
            if rng.random() < 0.005:
                lines.append({"device": row["device"], "ts": row["ts"] + 0.5, "temp": None})
            if rng.random() < 0.01 and len(lines) > 200:
                lines.append(dict(lines[-int(rng.integers(2, 200))]))  # redelivered later
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    return path


@pytest.mark.parametrize("seed", [1, 2])
def test_staged_replay_gives_the_events_of_tick_by_tick(tmp_path, seed):
    rules = tmp_path / "rules.yaml"
    rules.write_text(FAULT_RULES)
    groups = load_rule_files([rules])
    rec = faulty_record(tmp_path / "r.jsonl", seed)
    labels = [("d-*", {"zone": "south"}), ("d-[0-7]", {"zone": "north"})]
    runs = {}
    for staged in (True, False):
        run = Replay(groups, interval=1.0, labels=labels, staged=staged)
        events = [e for cols in read_columns(rec, chunk_bytes=6000) for e in run.feed(cols)]
        events += run.finish()
        runs[staged] = (run, events)
    (fast, fast_events), (slow, slow_events) = runs[True], runs[False]
    assert fast_events == slow_events
    assert fast.summary.to_dict() == slow.summary.to_dict()
    assert fast.engine.snapshot() == slow.engine.snapshot()
    # The comparison means something: most chunks took the fast path, some (with repeats)
    # did not, and the recording exercised every fault and most rules.
    assert 0 < fast.chunks_staged < len(list(read_columns(rec, chunk_bytes=6000)))
    assert slow.chunks_staged == 0
    d = fast.summary.drops
    assert d.late and d.future and d.duplicate
    assert {rule for rule, _ in fast.summary.events} >= {
        "north/Hot", "north/Silent", "all/Busy", "all/Draw", "all/Dry"}


def test_errors_name_the_line_after_scanned_chunks(tmp_path):
    rec = greenhouse_record(tmp_path / "gh.jsonl", seconds=60, devices=3)  # 36 lines
    with rec.open("ab") as fh:
        fh.write(b'{"device":"gh-0","ts":"soon"}\n')
    with pytest.raises(ValueError, match=r"gh\.jsonl:37: ts 'soon' is not epoch seconds"):
        list(read_columns(rec, chunk_bytes=300))


@pytest.mark.parametrize("lines", [
    [b'{"device":"a","ts":true,"temp":31}'],                          # the scan's case
    [b'{"device":"a","ts":1800000000,"temp":31}', b'{"device":"a","ts":false,"temp":31}'],
    [b'{"device": "a", "ts": true, "temp": 31}'],                     # the bulk decoder's
])
def test_a_bool_ts_is_a_bad_line_as_in_ingest(tmp_path, lines):
    """`ts: true` was read as 1 s after the epoch; ingest dead-letters it (bad_timestamp)."""
    rec = tmp_path / "r.jsonl"
    rec.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ValueError, match=rf"r\.jsonl:{len(lines)}: ts (true|false) is a bool"):
        list(read_columns(rec))


def test_an_rfc3339_ts_is_read_as_ingest_reads_it(tmp_path):
    rec = tmp_path / "r.jsonl"
    rec.write_text('{"device":"a","ts":"2027-01-15T08:00:00Z","temp":31}\n'
                   '{"device":"a","ts":"2027-01-15T09:00:05+01:00","temp":32}\n')
    assert [(d, ts) for d, ts, _ in as_readings(next(read_columns(rec)))] == [
        ("a", 1_800_000_000.0), ("a", 1_800_000_005.0)]
    csv_rec = tmp_path / "r.csv"
    csv_rec.write_text("device,ts,temp\na,2027-01-15T08:00:00Z,31\n")
    assert as_readings(next(read_columns(csv_rec))) == [("a", 1_800_000_000.0, {"temp": 31.0})]
    rec.write_text('{"device":"a","ts":"2027-01-15T08:00:00","temp":31}\n')
    with pytest.raises(ValueError, match=r":1: ts '2027-01-15T08:00:00' has no time zone"):
        list(read_columns(rec))


@pytest.mark.parametrize(("text", "problem"), [
    ("device,ts,temp\na,1800000000,21\na,1800000001,inf\n",
     ":3: temp = 'inf' is not a finite number"),
    ("device,ts,temp\na,1800000000,nan\n", ":2: temp = 'nan' is not a finite number"),
    ("device,ts,temp\na,1800000000,21,extra\n", ":2: more columns than the header"),
    ("device,ts,device\na,1800000000,b\n", ":1: column 'device' appears twice in the header"),
    ("device,ts,temp,temp\na,1800000000,1,2\n",
     ":1: column 'temp' appears twice in the header"),
])
def test_bad_csv_is_one_line_naming_the_line(tmp_path, text, problem):
    rec = tmp_path / "r.csv"
    rec.write_text(text)
    out = gateway("rules", "replay", "--rules", str(GREENHOUSE), "--input", str(rec))
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: {rec}{problem}"
