"""Issue 8 semantics: missing metrics are undefined (no sample, no alert), duplicates count
once, and each window runs at its own resolution; engine and reference agree on each."""

from __future__ import annotations

from gateway.engine import Engine, EngineConfig
from gateway.engine.reference import ReferenceEvaluator
from tests.engine_helpers import feed, one_rule, run_both

CFG = EngineConfig(offline_after=None)


def fired(expr: str, steps, config: EngineConfig = CFG) -> list[tuple[float, str]]:
    got, want = run_both(one_rule(expr), steps, config)
    assert got == want
    return [(t, dev) for kind, t, _, dev, _ in got if kind == "fired"]


def test_not_over_a_metric_never_sent_does_not_fire():
    steps = [(100.0 + s, [("a", "c", 100.0 + s, 1.0), ("b", "t", 100.0 + s, 1.0)])
             for s in range(30)]
    # device a sends c (avg 1, so `not avg > 5` holds); b never sent c: no sample, no alert
    assert {dev for _, dev in fired("not avg(c, 20s) > 5", steps)} == {"a"}


def test_count_and_sum_of_a_metric_never_sent_are_undefined():
    steps = [(100.0 + s, [("a", "c", 100.0 + s, 1.0), ("b", "t", 100.0 + s, 1.0)])
             for s in range(5)]
    assert {dev for _, dev in fired("count(c, 20s) < 1", steps)} == set()
    assert {dev for _, dev in fired("sum(c, 20s) < 1", steps)} == set()
    # ... while a device that did send c and went quiet counts 0
    quiet = [*steps, (200.0, [("b", "t", 200.0, 1.0)])]
    assert {dev for _, dev in fired("count(c, 20s) < 1", quiet)} == {"a"}
    # absent() is the one function that speaks about missing data
    assert {dev for _, dev in fired("absent(c, 20s)", steps)} == {"b"}


def test_duplicate_readings_count_once():
    """Readings every 5 s, each delivered twice (in one batch and in the next one):
    count(temp, 1m) holds 12 readings at most, so `count > 12` never fires."""
    steps = []
    for s in range(0, 120, 5):
        t = 1000.0 + s
        row = ("d", "temp", t, 20.0)
        steps.append((t, [row, row]))  # twice in one delivery
        steps.append((t + 0.5, [row]))  # and redelivered
    assert fired("count(temp, 1m) > 12", steps) == []
    assert fired("count(temp, 1m) >= 12", steps) != []
    engine = Engine(one_rule("count(temp, 1m) > 12"), config=CFG)
    for now, rows in steps:
        feed(engine, rows, now)
    assert engine.drops.duplicate == 2 * len(steps) // 2


def test_reference_uses_the_same_resolution_per_window():
    groups = one_rule("avg(a, 20s) > 3.55 and b > 0")
    ref = ReferenceEvaluator(groups, config=CFG)
    rows = [("d", "a", float(t), 1.0 if t <= 7 else 4.0) for t in range(26)]
    rows.append(("d", "b", 25.0, 1.0))
    ref.ingest(rows, 25.0)
    assert [e[0] for e in ref.tick(25.0)] == ["fired"]  # 3.7 on 2 s buckets (3.08 on 60 s)
