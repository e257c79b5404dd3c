"""Rule engine throughput and tick latency against the reference evaluator, same run.

1,000 devices x 20 rules (thresholds, windowed aggregates, rate, zscore, absent) with
windows of 10 s, 1 m, 5 m, 10 m and 1 h, each at its own bucket resolution. Each
simulated second every device sends 4 metrics at ``--hz`` readings per second, then the
engine ticks once. The reference evaluator (plain Python) runs the same prefix of the
input, because it is far too slow for the whole run; both rates are per reading through
ingest and ticks.

    python bench/bench_engine.py [--devices 1000] [--seconds 60] [--hz 10]
                                 [--replay-readings 1000000]

Replay: ``gateway rules replay``'s path (JSONL file -> columns -> replay clock -> engine)
on a greenhouse recording of 1,000 devices, one reading (temp, hum) per device per second,
with the greenhouse rules and labels, against the per-reading path it replaced (orjson per
line, ``Engine.batch`` per tick) on a prefix of the same file in the same run, and against
the same replay ingesting tick by tick (``staged=False``; it must give the same events).
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import orjson  # noqa: E402

from bench.harness.table import print_measures  # noqa: E402
from gateway.engine import Batch, Engine  # noqa: E402
from gateway.engine.reference import ReferenceEvaluator  # noqa: E402
from gateway.engine.replay import Replay  # noqa: E402
from gateway.engine.rules import RuleFile  # noqa: E402
from gateway.recorded import read_columns  # noqa: E402
from gateway.rulefiles import load_rule_files  # noqa: E402

RULES = [
    ("Hot", "temp > 35", {}),
    ("HotAvg", "avg(temp, 60s) > 30", {"clear": "avg(temp, 60s) < 28", "for": "30s"}),
    ("HotPeak", "max(temp, 1h) > 40", {}),
    ("Frost", "min(temp, 5m) < 2", {}),
    ("TempSilent", "absent(temp, 10s)", {}),
    ("HumSilent", "absent(hum, 2m)", {}),
    ("Dry", "hum < 15 and avg(temp, 60s) > 25", {}),
    ("Damp", "avg(hum, 1h) > 90", {}),
    ("Draw", "rate(energy, 5m) * 3600 > 50", {}),
    ("Reset", "delta(energy, 10m) < 0", {}),
    ("Surge", "rate(energy, 60s) * 3600 > 100", {}),
    ("VibSpike", "zscore(vib, 10m) > 4 and count(vib, 10m) >= 20", {}),
    ("VibNoisy", "std(vib, 5m) > 3", {}),
    ("VibPeak", "max(vib, 10s) > 12", {}),
    ("VibHigh", "avg(vib, 1h) > 8", {}),
    ("TempJump", "abs(temp - avg(temp, 10m)) > 10", {}),
    ("FewReadings", "count(temp, 5m) < 10", {}),
    ("TempSwing", "std(temp, 10m) > 8", {}),
    ("HumOdd", "hum < 5 or hum > 98", {}),
    ("Warming", "avg(temp, 5m) - avg(temp, 60s) > 5", {}),
]
METRICS = ("temp", "hum", "energy", "vib")


def rule_groups() -> list:
    rules = [{"alert": a, "expr": e, **extra} for a, e, extra in RULES]
    return list(RuleFile.model_validate({"groups": [{"name": "bench", "rules": rules}]}).groups)


def second_of_input(rng: np.random.Generator, engine: Engine, devices: int, hz: int,
                    t0: float) -> Batch:
    n = devices * len(METRICS) * hz
    dev = np.repeat(np.arange(devices), len(METRICS) * hz)
    met = np.tile(np.repeat(np.array([engine.metric_id(m) for m in METRICS]), hz), devices)
    ts = t0 + np.tile(np.arange(hz) / hz, devices * len(METRICS)) + rng.uniform(0, 0.05, n)
    base = np.array([22.0, 50.0, 0.0, 2.0])[np.searchsorted(
        [engine.metric_id(m) for m in METRICS], met)]
    value = np.round(base + rng.normal(0, 3, n), 1)
    order = rng.permutation(n)  # arrival order is not time order
    return Batch(dev[order], met[order], ts[order], value[order])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--hz", type=int, default=10)
    ap.add_argument("--ref-seconds", type=int, default=6)
    ap.add_argument("--replay-readings", type=int, default=1_000_000,
                    help="readings in the replay figure; 0 skips it")
    args = ap.parse_args()
    rng = np.random.default_rng(7)
    groups = rule_groups()
    engine = Engine(groups)
    names = [f"dev-{i:04d}" for i in range(args.devices)]
    for name in names:
        engine.device_id(name)
    t0 = 1_732_600_000.0
    batches = [second_of_input(rng, engine, args.devices, args.hz, t0 + s)
               for s in range(args.seconds)]
    n_readings = sum(b.ts.size for b in batches)
    # What a long-running daemon does after start-up: set-up objects leave the collector's
    # view, so a tick's latency is the engine's, not a full GC pass over the input.
    gc.collect()
    gc.freeze()

    ingest_s, ticks, tick_events = 0.0, [], []
    for s, batch in enumerate(batches):
        now = t0 + s + 1
        start = time.perf_counter()
        engine.ingest(batch, now)
        ingest_s += time.perf_counter() - start
        start = time.perf_counter()
        n_events = len(engine.tick(now))
        ticks.append(time.perf_counter() - start)
        tick_events.append(n_events)
    events = sum(tick_events)
    total_s = ingest_s + sum(ticks)

    # Same prefix through engine and reference, ingest plus one tick per second.
    k = min(args.ref_seconds, args.seconds)
    prefix = batches[:k]
    metric_names = {engine.metric_id(m): m for m in METRICS}
    rows_prefix = [[(names[d], metric_names[m], t, v) for d, m, t, v in zip(
        b.device.tolist(), b.metric.tolist(), b.ts.tolist(), b.value.tolist(), strict=True)]
        for b in prefix]
    fresh = Engine(groups)
    for name in names:
        fresh.device_id(name)
    start = time.perf_counter()
    for s, batch in enumerate(prefix):
        fresh.ingest(batch, t0 + s + 1)
        fresh.tick(t0 + s + 1)
    engine_prefix_s = time.perf_counter() - start
    ref = ReferenceEvaluator(groups)
    start = time.perf_counter()
    for s, rows in enumerate(rows_prefix):
        ref.ingest(rows, t0 + s + 1)
        ref.tick(t0 + s + 1)
    ref_s = time.perf_counter() - start
    n_prefix = sum(b.ts.size for b in prefix)

    p50, p99 = np.percentile(np.array(ticks) * 1000, [50, 99])
    rate = n_readings / total_s
    speedup = (n_prefix / engine_prefix_s) / (n_prefix / ref_s)
    state_mb = engine.nbytes() / 1e6
    rows = [
        ("readings/s through engine (ingest+ticks)", f"{rate:,.0f}", ">= 1,000,000"),
        ("readings/s, ingest only", f"{n_readings / ingest_s:,.0f}", ""),
        (f"speed-up vs reference ({k} s prefix)", f"{speedup:,.0f}x", ">= 20x"),
        ("  reference readings/s", f"{n_prefix / ref_s:,.0f}", ""),
        ("tick latency p50 (ms)", f"{p50:.2f}", ""),
        ("tick latency p99 (ms)", f"{p99:.2f}", "<= 20"),
        ("engine state (MB)", f"{state_mb:.1f}", "<= 20"),
    ]
    print(f"{args.devices} devices x {len(RULES)} rules, {len(METRICS)} metrics at "
          f"{args.hz} Hz, {args.seconds} s simulated, {n_readings:,} readings, "
          f"{events} events")
    widths = sorted(set(engine.widths.items()), key=lambda kv: kv[1])
    print("bucket widths: " + ", ".join(f"{w:g} s ({', '.join(k for k, v in widths if v == w)})"
                                       for w in sorted({v for _, v in widths})))
    slow = int(np.argmax(ticks))
    print(f"slowest tick {ticks[slow] * 1000:.1f} ms with {tick_events[slow]} events; "
          f"events per tick median {int(np.median(tick_events))}, max {max(tick_events)}")
    print_measures(rows)
    if args.replay_readings:
        bench_replay(args.replay_readings)


def write_recording(path: Path, readings: int, devices: int = 1000) -> None:
    """What `devices simulate --record` writes: one JSON object per reading and line."""
    rng = np.random.default_rng(11)
    t0 = 1_732_600_000.0
    seconds = math.ceil(readings / devices)
    with path.open("wb") as fh:
        for s in range(seconds):
            n = min(devices, readings - s * devices)
            ts = np.round(t0 + s + rng.uniform(0, 0.9, n), 3)
            temp = np.round(24 + 8 * np.sin(s / 300 + np.arange(n)) + rng.normal(0, 1, n), 2)
            hum = np.round(45 + rng.normal(0, 5, n), 1)
            fh.write(b"".join(orjson.dumps({"device": f"gh-{d}", "ts": t, "temp": a, "hum": b})
                              + b"\n" for d, t, a, b in zip(range(n), ts.tolist(),
                                                            temp.tolist(), hum.tolist(),
                                                            strict=True)))


def old_replay(groups: list, path: Path, limit: int) -> int:
    """The per-reading replay this issue replaced: orjson per line, Engine.batch per tick."""
    engine = Engine(groups)
    for d in range(1000):
        engine.set_device_labels(f"gh-{d}", {"zone": "north"})
    events = 0
    pending: list = []
    next_tick = math.nan
    with path.open("rb") as fh:
        for i, line in enumerate(fh):
            if i >= limit:
                break
            row = orjson.loads(line)
            ts = float(row["ts"])
            metrics = {k: float(v) for k, v in row.items() if k not in ("device", "ts")}
            if math.isnan(next_tick):
                next_tick = math.ceil(ts)
            while ts > next_tick:
                engine.ingest(engine.batch(pending), next_tick)
                pending = []
                events += len(engine.tick(next_tick))
                next_tick += 1
            pending.append((row["device"], ts, metrics))
    engine.ingest(engine.batch(pending), next_tick)
    return events + len(engine.tick(next_tick))


def bench_replay(readings: int) -> None:
    groups = load_rule_files([ROOT / "rules" / "greenhouse.yaml"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "record.jsonl"
        write_recording(path, readings)
        size = path.stat().st_size
        gc.collect()
        start, cpu = time.perf_counter(), time.process_time()
        run = Replay(groups, interval=1.0, labels=[("gh-*", {"zone": "north"})])
        events = 0
        for cols in read_columns(path):
            events += sum(1 for _ in run.feed(cols))
        events += sum(1 for _ in run.finish())
        new_s, new_cpu = time.perf_counter() - start, time.process_time() - cpu
        # The same replay with each tick's readings ingested by their own call.
        start = time.perf_counter()
        slow = Replay(groups, interval=1.0, labels=[("gh-*", {"zone": "north"})],
                      staged=False)
        slow_events = [e for cols in read_columns(path) for e in slow.feed(cols)]
        slow_events += slow.finish()
        tick_s = time.perf_counter() - start
        if len(slow_events) != events or slow.summary.to_dict() != run.summary.to_dict():
            raise SystemExit("staged and tick-by-tick replay disagree")
        prefix = min(readings, 100_000)
        start = time.perf_counter()
        old_replay(groups, path, prefix)
        old_s = time.perf_counter() - start
    new_rate, old_rate = readings / new_s, prefix / old_s
    print(f"\nreplay: {readings:,} readings ({size / 1e6:.0f} MB JSONL, 1000 devices, temp+hum), "
          f"greenhouse rules with labels, {events} events, {run.summary.used:,} values used")
    print_measures([
        ("replay readings/s (file -> events)", f"{new_rate:,.0f}", ">= 1,000,000"),
        ("  per CPU second (this process)", f"{readings / new_cpu:,.0f}", ""),
        ("  metric values/s (2 per reading)", f"{2 * new_rate:,.0f}", ""),
        ("  tick-by-tick ingest (staged=False)", f"{readings / tick_s:,.0f}", ""),
        (f"  per-reading path, same file ({prefix:,})", f"{old_rate:,.0f}", ""),
        ("  speed-up", f"{new_rate / old_rate:,.1f}x", ""),
    ])


if __name__ == "__main__":
    main()
